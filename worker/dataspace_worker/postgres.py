"""PostgresDataSource: the DataSpace store on PostgreSQL, used in process and by the worker.

Configure it as a DataSpace datasource::

    {"module": "dataspace_worker.postgres", "name": "PostgresDataSource",
     "config": {"dsn": "host=127.0.0.1 user=postgres dbname=dataspace"}}

Settings: ``dsn`` (libpq connection string or URL), ``pool_size`` (default 8),
``retry_timeout`` (seconds to keep retrying a lost database before raising
DataSpaceConnectionError, default 15; the worker passes None: until stopped),
``connect_timeout`` (seconds per connection attempt, default 5),
``create_tables`` (create the database if missing and migrate the schema on
connect, default true).

Each call is one transaction, run through the retry policy in ``retry.py``.
Database errors come out as the Python exceptions the API documents:
KeyError for missing rows, ValueError for values the database refuses,
DataSpaceExistsError for duplicates, DataSpaceConnectionError when the database
stays unreachable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors

from dataspace_client import validate
from dataspace_client.datasource import DataSource
from dataspace_client.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceExistsError,
)

from . import schema, sql
from .pool import ConnectionPool
from .retry import connection_retry, is_connection_error

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


def _translate(exc: psycopg2.Error) -> BaseException:
    """The API's exception for a database error that retrying will not cure."""
    diag = getattr(exc, "diag", None)
    first_line = (diag and diag.message_primary) or str(exc).strip() or type(exc).__name__
    if isinstance(exc, psycopg2.errors.UniqueViolation):
        return DataSpaceExistsError(f"already stored: {exc.diag.message_detail or first_line}")
    if isinstance(exc, psycopg2.errors.ForeignKeyViolation):
        return KeyError(f"no such task manager: {exc.diag.message_detail or first_line}")
    if isinstance(exc, psycopg2.errors.CheckViolation):
        return ValueError(f"value out of range: {first_line}")
    if isinstance(exc, (psycopg2.DataError, psycopg2.errors.ProgramLimitExceeded)):
        return ValueError(first_line)
    return DataSpaceError(f"database error: {first_line}")


class PostgresDataSource(DataSource):
    """The DataSource on PostgreSQL; thread-safe, one pool of connections."""

    def __init__(self, config: dict, stop_event: threading.Event | None = None):
        if not isinstance(config, dict):
            raise DataSpaceConfigurationError("PostgresDataSource config must be a dict")
        super().__init__(config)
        self.dsn = _setting(config, "dsn", DEFAULT_DSN, (str,))
        self.pool_size = _setting(config, "pool_size", 8, (int,), minimum=1)
        self.retry_timeout = _setting(
            config, "retry_timeout", 15.0, (int, float), minimum=0, optional=True
        )
        self.connect_timeout = _setting(config, "connect_timeout", 5, (int,), minimum=1)
        self._create = _setting(config, "create_tables", True, (bool,))
        self._stop_event = stop_event
        self._pool: ConnectionPool | None = None
        self.connect()

    # -- lifecycle ------------------------------------------------------------
    def connect(self):
        if self._pool is None:
            self._pool = ConnectionPool(
                self.dsn,
                self.pool_size,
                connect_timeout=self.connect_timeout,
                application_name="dataspace",
            )
        if self._create:
            self._retrying(lambda: schema.ensure_database(self.dsn, self.connect_timeout))
            self.create_tables()

    def close(self):
        if self._pool is not None:
            self._pool.close()

    def reset_connections(self):
        if self._pool is not None:
            self._pool.reopen()

    def create_tables(self):
        """Create or migrate the schema (idempotent; safe from several processes at once)."""
        return self._with_connection(schema.migrate)

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
            if is_connection_error(exc):
                raise DataSpaceConnectionError(
                    f"database unavailable: {str(exc).strip() or type(exc).__name__}"
                ) from None
            raise _translate(exc) from None
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

    def _transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction, committed when it returns."""

        def run(conn):
            with conn.cursor() as cur:
                result = work(cur)
            conn.commit()
            return result

        return self._with_connection(run)

    def _fetchone(self, query: str, params: dict):
        def work(cur):
            cur.execute(query, params)
            return cur.fetchone()

        return self._transaction(work)

    def _fetchall(self, query: str, params: dict):
        def work(cur):
            cur.execute(query, params)
            return cur.fetchall()

        return self._transaction(work)

    # -- task managers --------------------------------------------------------
    @staticmethod
    def _taskmanager(row) -> dict:
        return {
            "sequence_id": row[0],
            "taskmanager_id": row[1],
            "name": row[2],
            "datestamp": row[3],
        }

    def store_taskmanager(self, taskmanager_name, taskmanager_id, datestamp=None):
        args = validate.check("store_taskmanager", locals())
        return self._fetchone(sql.STORE_TASKMANAGER, args)[0]

    def get_taskmanager(self, taskmanager_name, taskmanager_id=None):
        args = validate.check("get_taskmanager", locals())
        row = self._fetchone(sql.GET_TASKMANAGER, args)
        if row is None:
            suffix = f" and id {taskmanager_id!r}" if taskmanager_id is not None else ""
            raise KeyError(f"no task manager named {taskmanager_name!r:.200}{suffix}")
        return self._taskmanager(row)

    def get_taskmanagers(self, taskmanager_name=None, start_time=None, end_time=None):
        args = validate.check("get_taskmanagers", locals())
        return [self._taskmanager(r) for r in self._fetchall(sql.GET_TASKMANAGERS, args)]

    def get_last_generation_id(self, taskmanager_name, taskmanager_id=None):
        args = validate.check("get_last_generation_id", locals())
        (generation,) = self._fetchone(sql.GET_LAST_GENERATION_ID, args)
        if generation is None:
            suffix = f" and id {taskmanager_id!r}" if taskmanager_id is not None else ""
            raise KeyError(f"no products for task manager {taskmanager_name!r:.200}{suffix}")
        return generation

    # -- products -------------------------------------------------------------
    @staticmethod
    def _write_params(args: dict) -> dict:
        return {
            **{k: args[k] for k in ("taskmanager_id", "generation_id", "key")},
            "value": psycopg2.Binary(args["value"]),
            **args["header"],
            **args["metadata"],
        }

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        params = self._write_params(validate.check("insert", locals()))

        def work(cur):
            cur.execute(sql.INSERT, params)

        self._transaction(work)

    def update(self, taskmanager_id, generation_id, key, value, header, metadata):
        params = self._write_params(validate.check("update", locals()))

        def work(cur):
            cur.execute(sql.UPDATE, params)
            if cur.fetchone() != (1, 1, 1):
                raise _Missing(self._product_missing(params))

        self._unwrap(work)

    @staticmethod
    def _product_missing(args: dict) -> str:
        return (
            f"no product {args['key']!r:.200} in generation {args['generation_id']} "
            f"of task manager {args['taskmanager_id']}"
        )

    def _unwrap(self, work):
        """Run a transaction whose work raises _Missing to roll back and report a KeyError."""
        try:
            return self._transaction(work)
        except _Missing as missing:
            raise KeyError(missing.args[0]) from None

    def get_dataproduct(self, taskmanager_id, generation_id, key):
        args = validate.check("get_dataproduct", locals())
        row = self._fetchone(sql.GET_DATAPRODUCT, args)
        if row is None:
            raise KeyError(self._product_missing(args))
        return bytes(row[0])

    def get_dataproducts(self, taskmanager_id, key=None):
        args = validate.check("get_dataproducts", locals())
        rows = self._fetchall(sql.GET_DATAPRODUCTS, args)
        return [
            {"taskmanager_id": r[0], "generation_id": r[1], "key": r[2], "value": bytes(r[3])}
            for r in rows
        ]

    def get_datablock(self, taskmanager_id, generation_id):
        args = validate.check("get_datablock", locals())
        return {key: bytes(value) for key, value in self._fetchall(sql.GET_DATABLOCK, args)}

    def get_header(self, taskmanager_id, generation_id, key):
        args = validate.check("get_header", locals())
        row = self._fetchone(sql.GET_HEADER, args)
        if row is None:
            raise KeyError(self._product_missing(args))
        return tuple(row)

    def get_metadata(self, taskmanager_id, generation_id, key):
        args = validate.check("get_metadata", locals())
        row = self._fetchone(sql.GET_METADATA, args)
        if row is None:
            raise KeyError(self._product_missing(args))
        return tuple(row)

    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id):
        args = validate.check("duplicate_datablock", locals())
        self._fetchone(sql.DUPLICATE_DATABLOCK, args)

    def delete_data_older_than(self, days):
        """Delete task managers older than ``days`` days; return what went.

        Returns ``{"taskmanagers": n, "dataproducts": m}``.
        """
        args = validate.check("delete_data_older_than", locals())

        def work(cur):
            cur.execute(sql.COUNT_PRODUCTS_OLDER_THAN, args)
            (products,) = cur.fetchone()
            cur.execute(sql.DELETE_OLDER_THAN, args)
            return {"taskmanagers": cur.rowcount, "dataproducts": products}

        return self._transaction(work)

    def delete(self, taskmanager_id, all_generations=False):
        args = validate.check("delete", locals())

        def work(cur):
            generation = None
            if not args["all_generations"]:
                cur.execute(sql.NEWEST_GENERATION, args)
                (generation,) = cur.fetchone()
                if generation is None:
                    return 0
            cur.execute(sql.DELETE_GENERATIONS, {**args, "generation_id": generation})
            return cur.fetchone()[0]

        return self._transaction(work)

    def mark_expired(self, taskmanager_id, generation_id, key, expiry_time):
        args = validate.check("mark_expired", locals())

        def work(cur):
            cur.execute(sql.MARK_EXPIRED, args)
            if cur.rowcount != 1:
                raise _Missing(self._product_missing(args))

        self._unwrap(work)

    def mark_demented(self, taskmanager_id, keys, generation_id=None):
        args = validate.check("mark_demented", locals())
        wanted = set(args["keys"])

        def work(cur):
            generation = args["generation_id"]
            if generation is None:
                cur.execute(sql.NEWEST_GENERATION, args)
                (generation,) = cur.fetchone()
                if generation is None:
                    raise _Missing(f"task manager {args['taskmanager_id']} has no products")
            cur.execute(
                sql.MARK_DEMENTED,
                {
                    **args,
                    "generation_id": generation,
                    "keys": sorted(wanted),
                    "now": int(time.time()),
                },
            )
            missing = wanted - {row[0] for row in cur.fetchall()}
            if missing:
                raise _Missing(
                    f"no product(s) {sorted(missing)!r:.400} in generation {generation} "
                    f"of task manager {args['taskmanager_id']}"
                )
            return len(wanted)

        return self._unwrap(work)

    def get_schema(self, table=None):
        """Columns of ``table`` as a list of dicts, or ``{table: columns}`` for all tables."""
        args = validate.check("get_schema", locals())
        tables = [args["table"]] if args["table"] else list(validate.TABLES)
        described: dict[str, list[dict]] = {t: [] for t in tables}
        for table_name, column, data_type, nullable, default in self._fetchall(
            sql.GET_SCHEMA, {"tables": tables}
        ):
            described[table_name].append(
                {"name": column, "type": data_type, "nullable": nullable, "default": default}
            )
        return described[args["table"]] if args["table"] else described


class _Missing(Exception):
    """Raised inside a transaction to roll it back and report a missing row."""
