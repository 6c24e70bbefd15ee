"""PostgresDataSource: the DataSpace store on PostgreSQL, used in process and by the worker.

Configure it as a DataSpace datasource::

    {"module": "dataspace_worker.postgres", "name": "PostgresDataSource",
     "config": {"dsn": "host=127.0.0.1 user=postgres dbname=dataspace"}}

Settings: ``dsn`` (libpq connection string or URL), ``pool_size`` (default 8),
``retry_timeout`` (seconds to keep retrying a lost database before raising
DataSpaceConnectionError, default 15; the worker passes None: until stopped),
``connect_timeout`` (seconds per connection attempt, default 5),
``create_tables`` (migrate the schema on connect, default true),
``create_database`` (create the database if missing, default: as
``create_tables``; the worker passes its own setting, false unless asked),
``application_name`` (as the server's ``pg_stat_activity`` shows the sessions,
default "dataspace"), ``reap_batch`` (rows per transaction when reaping,
default 5000).

The first connection tells configuration from an outage: a role, password, TLS
mode or database the server refuses raises DataSpaceConfigurationError at once
(retry.refusal says which and what to fix); a server that is down or starting
is retried (``retry_timeout``).

Each call is one transaction, run through the retry policy in ``retry.py``.
Database errors come out as the Python exceptions the API documents:
KeyError for missing rows, ValueError for values the database refuses,
DataSpaceExistsError for duplicates, DataSpaceConnectionError when the database
stays unreachable.

Processes: a PostgresDataSource made before a fork works in the child, which
drops the parent's sessions without ending them (``db_pool.drop_inherited``) and
opens its own on demand; the parent's sessions carry on. One dropped without
``close()`` closes its connections when it is collected.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors

from dataspace_core import validate
from dataspace_core.catalog import CATALOG
from dataspace_core.datasource import (
    DataSource,
    demented_arguments,
    taskmanager_arguments,
)
from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
)

from . import idempotency, queries, schema
from .db_errors import translate
from .db_pool import KEEPALIVES, ConnectionPool
from .health_connection import HealthConnection
from .idempotency import Prepared, apply_many, apply_one
from .reaping import Reaping
from .retry import connection_retry, is_connection_error, is_tls_refusal, refusal

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=dataspace"


def _setting(config: dict, name: str, default, kinds, minimum=None, optional=False):
    value = config.get(name, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise DataSpaceConfigurationError(
            f"PostgresDataSource setting '{name}' has the wrong type: {value!r}"
        )
    if minimum is not None and value < minimum:
        raise DataSpaceConfigurationError(
            f"PostgresDataSource setting '{name}' must be at least {minimum}, got {value!r}"
        )
    return value


#: bytes over which a transaction's connection is closed after it (see _transaction)
LARGE_TRANSACTION = 4 * 1024 * 1024


def _payload(value, depth: int = 0) -> int:
    """Bytes of the bytes values in a result (a reply, a value, lists and dicts of them)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if depth < 3:
        if isinstance(value, dict):
            value = value.values()
        if isinstance(value, (list, tuple, type({}.values()))):
            return sum(_payload(item, depth + 1) for item in value)
    return 0


def _release(pool: ConnectionPool, health: HealthConnection) -> None:
    """The finalizer of a PostgresDataSource collected without ``close()``: holds
    its pool and health connection, never the datasource. Both are fork-aware: in
    a forked child only the child's own connections are closed."""
    try:
        pool.close()
        health.close()
    except Exception:  # a finalizer must not raise
        log.exception("PostgresDataSource dropped without close(): closing its connections failed")


class _MeasuredCursor(psycopg2.extensions.cursor):
    """A cursor that remembers the longest statement it sent (``largest``), for
    ``in_transaction``: the last one (``query``) may be a short one after it."""

    largest = 0

    def execute(self, query, vars=None):
        try:
            return super().execute(query, vars)
        finally:
            self.largest = max(self.largest, len(self.query or b""))


def in_transaction(conn, work: Callable[[Any], T], autocommit: bool = False) -> T:
    """Run ``work(cursor)`` in one transaction, committed when it returns.

    ``autocommit``: ``work`` needs no transaction around its statements, each
    commits by itself: reads (a read's statements see what was committed before
    each of them, in a transaction or not, under READ COMMITTED, and reads in
    one batch are independent requests), and writes done in one statement
    (``idempotency.apply_claimed_inserts``). psycopg2 would send BEGIN before
    the first statement and COMMIT after: two more round trips to PostgreSQL.

    A connection whose transaction carried more than ``LARGE_TRANSACTION``
    bytes (its longest statement's text, or its result) is closed afterwards:
    libpq keeps its send and receive buffers at the largest size they ever
    reached, two bytes per byte of bytea, for the connection's life, which
    left a worker holding 32 MiB per pooled connection after 16 MiB
    products. One reconnection per large value costs far less than it.
    """
    if autocommit:
        conn.autocommit = True
    try:
        with conn.cursor(cursor_factory=_MeasuredCursor) as cur:
            result = work(cur)
            large = cur.largest > LARGE_TRANSACTION
        if not autocommit:
            conn.commit()
    finally:
        if autocommit and not conn.closed:
            conn.autocommit = False  # as the pool hands connections out
    if large or _payload(result) > LARGE_TRANSACTION:
        conn.close()  # the pool discards a closed connection
    return result


class PostgresDataSource(Reaping, DataSource):
    """The DataSource on PostgreSQL; thread-safe, one pool of connections."""

    def __init__(self, config: dict, stop_event: threading.Event | None = None):
        if not isinstance(config, Mapping):
            raise DataSpaceConfigurationError("PostgresDataSource config must be a dict")
        super().__init__(config)
        self.dsn = _setting(config, "dsn", DEFAULT_DSN, (str,))
        self.pool_size = _setting(config, "pool_size", 8, (int,), minimum=1)
        self.retry_timeout = _setting(
            config, "retry_timeout", 15.0, (int, float), minimum=0, optional=True
        )
        self.connect_timeout = _setting(config, "connect_timeout", 5, (int,), minimum=1)
        self._create = _setting(config, "create_tables", True, (bool,))
        self._create_database = _setting(config, "create_database", self._create, (bool,))
        self.application_name = _setting(config, "application_name", "dataspace", (str,))
        self.reap_batch = _setting(config, "reap_batch", 5000, (int,), minimum=1)
        self._stop_event = stop_event
        self._pool: ConnectionPool | None = None
        self._health = HealthConnection()
        self._new_pool()
        self.connect()

    # -- lifecycle ------------------------------------------------------------
    def _new_pool(self) -> None:
        self._pool = ConnectionPool(
            self.dsn,
            self.pool_size,
            connect_timeout=self.connect_timeout,
            application_name=self.application_name,
            **KEEPALIVES,
        )
        # closes the pool (and the health connection) of a datasource dropped without close()
        weakref.finalize(self, _release, self._pool, self._health)

    def connect(self):
        if self._pool is None:
            self._new_pool()
        self._first_connection()
        if self._create:
            self.create_tables()

    def _first_connection(self) -> None:
        """Reach the database once (creating it if asked), retrying an outage but
        not a refusal: a wrong role or password, a TLS mode the server does not
        offer or a missing database come back the same however long one waits."""

        def attempt():
            try:
                schema.ensure_database(self.dsn, self.connect_timeout, create=self._create_database)
            except psycopg2.OperationalError as exc:
                problem = refusal(exc)
                if problem is not None:
                    raise DataSpaceConfigurationError(problem) from None
                raise

        self._retrying(attempt)

    def close(self):
        """Close the connections; those in use are closed when given back. In a
        forked child only the child's own: the parent's sessions are left alone."""
        if self._pool is not None:
            self._pool.close()
        self._health.close()

    def reset_connections(self):
        """Drop the idle connections and open new ones on demand (in a forked child:
        the parent's are dropped without ending their sessions)."""
        if self._pool is not None:
            self._pool.reopen()

    def create_tables(self):
        """Create or migrate the schema (idempotent; safe from several processes at once)."""
        return self._run("create_tables", {})

    # -- transactions ---------------------------------------------------------
    def _with_connection(self, work: Callable[[Any], T]) -> T:
        """Run ``work(conn)`` on a pooled connection, through the retry policy."""
        return self._retrying(lambda: self._once(work))

    def _retrying(self, action: Callable[[], T]) -> T:
        """Run ``action()`` through the retry policy; map database errors to the API's."""
        try:
            for attempt in connection_retry(self.retry_timeout, self._stop_event):
                with attempt:
                    return action()
        except psycopg2.Error as exc:
            if is_tls_refusal(exc):
                raise DataSpaceConfigurationError(
                    "database TLS: the server's certificate was refused: "
                    f"{' '.join(str(exc).split())} (check sslrootcert and the host name)"
                ) from None
            if is_connection_error(exc):
                raise DataSpaceConnectionError(
                    f"database unavailable: {str(exc).strip() or type(exc).__name__}"
                ) from None
            raise translate(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, work: Callable[[Any], T]) -> T:
        conn = self._pool.acquire()
        broken = False
        try:
            return work(conn)
        except BaseException as exc:
            broken = is_connection_error(exc) or not isinstance(exc, Exception)
            if not conn.closed:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    broken = True
            raise
        finally:
            self._pool.release(conn, discard=broken or bool(conn.closed))

    def _transaction(self, work: Callable[[Any], T], autocommit: bool = False) -> T:
        """Run ``work(cursor)`` in one transaction on a pooled connection, through
        the retry policy (``in_transaction``); ``autocommit``: without one."""
        return self._with_connection(lambda conn: in_transaction(conn, work, autocommit))

    def _run(self, operation: str, args: dict) -> Any:
        checked = validate.check(operation, args)
        body = queries.BODIES[operation]
        one_statement = operation == "insert" and queries.inline_value(checked)
        return self._transaction(
            lambda cur: body(cur, checked),
            autocommit=one_statement or not CATALOG[operation].write,
        )

    def execute(
        self,
        operation: str,
        args: dict,
        encode: Callable[[Any], bytes],
        request_id: str | None = None,
    ) -> tuple[bytes, bool]:
        """Run one request and return ``(reply, replayed)``.

        With a ``request_id`` (the request's message_id, given for writes) the
        request is applied at most once: its id and ``encode(result)`` commit in
        the same transaction as its effect, and a later request with the same id
        gets that stored reply back (``replayed`` True) without writing again.
        """
        return self.execute_many([(operation, args, encode, request_id)])[0]

    def execute_many(
        self, requests: list[tuple[str, dict, Callable[[Any], bytes], str | None]]
    ) -> list[tuple[bytes, bool]]:
        """Run ``(operation, args, encode, request_id)`` requests in one transaction.

        Each is handled as by ``execute``; all commit together, or, if any
        raises, none does and the error propagates. (Small inserts run as one
        statement, ``idempotency.apply_claimed_inserts``: there a message_id
        reused by another operation is found after the others committed.) One
        commit for many requests is what makes the worker's batches cheap (the
        commit's WAL flush is the largest cost of a small write). Request ids
        must be distinct.
        """
        prepared = [
            Prepared(operation, queries.BODIES[operation], validate.check(operation, args), e, rid)
            for operation, args, e, rid in requests
        ]
        if idempotency.claims_in_one_statement(prepared):
            return self._transaction(
                lambda cur: idempotency.apply_claimed_inserts(cur, prepared), autocommit=True
            )
        read_only = not any(CATALOG[p.operation].write for p in prepared)
        if len(prepared) == 1:
            return self._transaction(lambda cur: [apply_one(cur, prepared[0])], read_only)
        return self._transaction(lambda cur: apply_many(cur, prepared), read_only)

    def ping(self, timeout: int = 2) -> bool:
        """Whether PostgreSQL answers ``SELECT 1`` now, on a connection of its own.

        For health checks: no retry, no wait for a pooled connection.
        """
        return self._health.ping(self.dsn, timeout)

    @property
    def pool_in_use(self) -> int:
        return self._pool.in_use if self._pool is not None else 0

    def sweep_request_log(self, older_than_seconds: float, limit: int = 10_000) -> int:
        """Forget idempotency records older than ``older_than_seconds`` (bounded batch)."""
        return self._transaction(lambda cur: idempotency.sweep(cur, older_than_seconds, limit))

    # -- the DataSource API: each call one transaction ------------------------
    def store_taskmanager(
        self, name=None, taskmanager_id=None, datestamp=None, *, taskmanager_name=None
    ):
        args = taskmanager_arguments(name, taskmanager_id, datestamp, taskmanager_name)
        return self._run("store_taskmanager", args)

    def get_taskmanager(self, taskmanager_name, taskmanager_id=None):
        return self._run("get_taskmanager", locals())

    def get_taskmanagers(self, taskmanager_name=None, start_time=None, end_time=None):
        return self._run("get_taskmanagers", locals())

    def get_last_generation_id(self, taskmanager_name, taskmanager_id=None):
        return self._run("get_last_generation_id", locals())

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        self._run("insert", locals())

    def update(self, taskmanager_id, generation_id, key, value, header, metadata):
        self._run("update", locals())

    def get_dataproduct(self, taskmanager_id, generation_id, key):
        return self._run("get_dataproduct", locals())

    def get_dataproducts(self, taskmanager_id, key=None):
        return self._run("get_dataproducts", locals())

    def get_datablock(self, taskmanager_id, generation_id):
        return self._run("get_datablock", locals())

    def get_header(self, taskmanager_id, generation_id, key):
        return self._run("get_header", locals())

    def get_metadata(self, taskmanager_id, generation_id, key):
        return self._run("get_metadata", locals())

    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id):
        self._run("duplicate_datablock", locals())

    def delete_data_older_than(self, days):
        """Delete task managers older than ``days`` days; return what went.

        Returns ``{"taskmanagers": n, "dataproducts": m}``.
        """
        return self._run("delete_data_older_than", locals())

    def delete(self, taskmanager_id, all_generations=False):
        return self._run("delete", locals())

    def mark_expired(self, taskmanager_id, generation_id, key, expiry_time):
        self._run("mark_expired", locals())

    def mark_demented(self, taskmanager_id, keys, generation_id=None):
        return self._run("mark_demented", demented_arguments(taskmanager_id, keys, generation_id))

    def get_schema(self, table=None):
        """Columns of ``table`` as a list of dicts, or ``{table: columns}`` for all tables."""
        return self._run("get_schema", locals())
