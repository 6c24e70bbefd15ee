"""RemoteDataSource: the DataSource whose every method is an RPC to the worker pool.

Configure it as the DataSpace's datasource::

    {"dataspace": {"datasource": {
        "module": "dataspace_client.remote", "name": "RemoteDataSource",
        "config": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F"}}}}

Settings in ``config``: ``url`` (default the local broker; a list of URLs, or
URLs separated by commas, for a cluster's nodes: see ``urls.py``), ``timeout`` (seconds a
call waits for its reply, default 30), ``connect_timeout`` (default 10),
``app_id`` (shown in the management UI, default ``dataspace-client``),
``reap_timeout`` (seconds ``reap`` waits, default 3600), ``lanes`` (default false:
true sends every request that names a task manager through the workers'
ordering lanes, which the workers must have: their ``lanes`` setting; see
docs/scaling.md), ``fast_reads`` (default true: reads that go through no lane
take the fast read queue, ``read.<op>``; false sends them to the request queue,
as clients before it did; see docs/protocol.md, "Reads").

Arguments are checked here with the same checks the worker applies, so a bad call
raises TypeError/ValueError without a round trip; the worker's errors come back
as the same exception types the in-process store raises.

Processes: a RemoteDataSource made before a fork works in the child. The
child's copy forgets the parent's connection (its socket and I/O thread are the
parent's: nothing is said on it) and connects anew on its first call; the
parent's connection, and its unconfirmed fire-and-forget writes, stay the
parent's. A RemoteDataSource dropped without ``close()`` closes its connection
and stops its I/O thread when it is collected, after flushing its writes (up to
``timeout``; a WARNING says how many were left unconfirmed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from dataspace_core import validate
from dataspace_core.datasource import DataSource, demented_arguments, taskmanager_arguments
from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceError,
    DataSpacePublishError,
    DataSpaceRedeliveredError,
)
from dataspace_core.protocol import OPERATIONS, decode_reply, encode_request
from dataspace_core.urls import split_urls

from .rpc import NO_WORKER_CHECK, RpcClient

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_TIMEOUT = 30.0
DEFAULT_REAP_TIMEOUT = 3600.0

log = logging.getLogger(__name__)


def _positive(config: dict, name: str, default: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise DataSpaceConfigurationError(
            f"RemoteDataSource setting '{name}' must be a positive number of seconds, got {value!r}"
        )
    return float(value)


def _shut(client: RpcClient, timeout: float) -> None:
    """Flush ``client`` (up to ``timeout``), then close it; raises as ``close`` does."""
    try:
        _flush_before_close(client, timeout)
    finally:
        client.close()


def _flush_before_close(client: RpcClient, timeout: float) -> None:
    # A thread still holding the client may publish: refused from here on,
    # so the flush covers everything publish ever accepted.
    client.stop_publishing()
    if client.unsettled:
        client.flush(timeout)


def _shut_dropped(client: RpcClient, timeout: float) -> None:
    """``_shut`` for a RemoteDataSource collected without ``close()``: nobody is
    left to raise to, so what was not confirmed is said in one WARNING line.

    The count is taken before ``close``: closing lets the I/O thread run on, and
    confirms it reads meanwhile would make the line contradict itself."""
    try:
        try:
            _flush_before_close(client, timeout)
        except DataSpacePublishError as exc:
            log.warning(
                "RemoteDataSource dropped without close(): %d fire-and-forget writes "
                "refused by the broker were lost: %s",
                len(exc.failures),
                exc,
            )
        except DataSpaceError as exc:
            log.warning(
                "RemoteDataSource dropped without close(): %d fire-and-forget writes not "
                "confirmed by the broker within %g s may be lost (%s)",
                client.pending,
                timeout,
                exc,
            )
        finally:
            client.close()
    except Exception:  # a finalizer must not raise
        log.exception("RemoteDataSource dropped without close(): closing its client failed")


class _Link:
    """A RemoteDataSource's client and the process it belongs to.

    Its finalizer holds this, never the datasource (which could then never be
    collected); nothing the client's I/O thread holds refers to the datasource.
    """

    __slots__ = ("client", "pid", "timeout")

    def __init__(self, timeout: float):
        self.client: RpcClient | None = None
        self.pid = os.getpid()
        self.timeout = timeout

    def forget_inherited(self) -> None:
        """In a forked child: forget the parent's client without a word on the wire
        (``RpcClient.abandon``); its unconfirmed writes stay the parent's."""
        client, self.client = self.client, None
        self.pid = os.getpid()
        if client is not None:
            client.close()  # in a forked child: abandon()

    def release(self) -> None:
        """The finalizer: close the client of a RemoteDataSource that was collected.

        In a forked child whose copy never ran, the client is the parent's: forgotten, not closed.
        """
        if self.pid != os.getpid():
            self.forget_inherited()
            return
        client, self.client = self.client, None
        if client is None:
            return
        if client.on_io_thread():
            # collected on the I/O thread (a cyclic collection can run anywhere):
            # it cannot wait there for the confirms it alone receives
            threading.Thread(
                target=_shut_dropped,
                args=(client, self.timeout),
                name="dataspace-rpc-release",
                daemon=True,
            ).start()
        else:
            _shut_dropped(client, self.timeout)


#: every live RemoteDataSource of this process, for the after-fork hook
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for source in list(_LIVE):
        try:
            source._check_process()
        except Exception:  # pragma: no cover - never let one break the others
            log.exception("RemoteDataSource: forgetting the parent's connection failed")


os.register_at_fork(after_in_child=_after_fork_in_child)


class RemoteDataSource(DataSource):
    """A DataSource that sends each call through RabbitMQ to a dataspace worker."""

    def __init__(self, config: dict):
        if not isinstance(config, Mapping):
            raise DataSpaceConfigurationError("RemoteDataSource config must be a dict")
        super().__init__(config)
        self.url = config.get("url", DEFAULT_URL)
        if not isinstance(self.url, (str, list, tuple)):
            raise DataSpaceConfigurationError(
                "RemoteDataSource setting 'url' must be a URL, or a list of URLs (a cluster)"
            )
        try:
            split_urls(self.url)
        except ValueError as exc:
            raise DataSpaceConfigurationError(f"RemoteDataSource setting 'url': {exc}") from None
        self.timeout = _positive(config, "timeout", DEFAULT_TIMEOUT)
        self.connect_timeout = _positive(config, "connect_timeout", 10.0)
        self.reap_timeout = _positive(config, "reap_timeout", DEFAULT_REAP_TIMEOUT)
        self.no_worker_check = _positive(config, "no_worker_check", NO_WORKER_CHECK)
        self.app_id = str(config.get("app_id", "dataspace-client"))
        self.lanes = config.get("lanes", False)
        if not isinstance(self.lanes, bool):
            raise DataSpaceConfigurationError(
                "RemoteDataSource setting 'lanes' must be true or false"
            )
        self.fast_reads = config.get("fast_reads", True)
        if not isinstance(self.fast_reads, bool):
            raise DataSpaceConfigurationError(
                "RemoteDataSource setting 'fast_reads' must be true or false"
            )
        self.batches = config.get("batches", True)
        if not isinstance(self.batches, bool):
            raise DataSpaceConfigurationError(
                "RemoteDataSource setting 'batches' must be true or false"
            )
        self._link = _Link(self.timeout)
        self._connect_lock = threading.Lock()
        weakref.finalize(self, self._link.release)
        _LIVE.add(self)
        self.connect()

    # -- lifecycle ------------------------------------------------------------
    @property
    def _client(self) -> RpcClient | None:
        """The client of this process (None until connected): in a forked child,
        never the parent's."""
        self._check_process()
        return self._link.client

    @_client.setter
    def _client(self, client: RpcClient | None) -> None:
        self._check_process()
        self._link.client = client

    def _check_process(self) -> None:
        """In a child forked since the client was made: forget the parent's client
        (not closed: its connection is the parent's) and take fresh locks (one
        held by a parent thread at the fork stays held here); the next call connects."""
        if self._link.pid != os.getpid():
            self._connect_lock = threading.Lock()
            self._link.forget_inherited()

    def connect(self):
        self._check_process()
        with self._connect_lock:
            if self._link.client is None:
                self._link.client = RpcClient(
                    self.url,
                    app_id=self.app_id,
                    timeout=self.timeout,
                    connect_timeout=self.connect_timeout,
                    no_worker_check=self.no_worker_check,
                    batches=self.batches,
                )
            return self._link.client

    def close(self):
        """Wait (up to ``timeout``) for published writes to be confirmed, then close.

        Raises DataSpaceTimeoutError or DataSpacePublishError, after closing, if
        some published writes were not confirmed or were refused: they may be lost.
        In a forked child it closes only what the child opened: the parent's
        connection is left alone.
        """
        self._check_process()
        with self._connect_lock:
            client, self._link.client = self._link.client, None
        if client is not None:
            _shut(client, self.timeout)

    def reset_connections(self):
        """Close the connection and open a new one. In a forked child (the engine
        calls this on a cached datasource, as it may be one) the parent's
        connection is only forgotten, and the child connects anew."""
        self.close()
        self.connect()

    def _call(self, operation: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """Check ``args`` (a method's ``locals()`` will do), send, decode the reply."""
        op = OPERATIONS[operation]
        checked = validate.check(operation, args)
        body = encode_request(op, checked)
        client = self._client or self.connect()
        routing_key, lane = self._route(op, checked)
        timeout = client.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        reply = client.call(operation, routing_key, body, timeout=timeout, lane=lane)
        try:
            return decode_reply(op, reply)
        except DataSpaceRedeliveredError:
            # A worker may have died running it: once more, through the request
            # queue, whose delivery limit ends a read that keeps killing workers;
            # within what is left of the call's time
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            reply = client.call(operation, op.routing_key, body, timeout=left)
            return decode_reply(op, reply)

    def _route(self, op, checked: dict, call: bool = True) -> tuple[str, str | None]:
        """Routing key and lane: by task manager through the ordering lanes when
        ``lanes`` is on and the request names one; a read called for its reply
        through the fast read queue (``fast_reads``); else the operation's own key."""
        key = op.lane_argument
        if self.lanes and key and checked.get(key) is not None:
            return op.lane_routing_key, str(checked[key])
        if call and self.fast_reads and op.fast_read:
            return op.read_routing_key, None
        return op.routing_key, None

    # -- fire-and-forget ------------------------------------------------------
    def publish(self, operation: str, args: dict) -> str:
        """Check ``args``, publish the write, return its message_id without waiting
        for it (see producer.py)."""
        op = OPERATIONS[operation]
        checked = validate.check(operation, args)
        body = encode_request(op, checked)
        routing_key, lane = self._route(op, checked, call=False)
        client = self._client or self.connect()
        return client.publish(operation, routing_key, body, lane=lane)

    def flush(self, timeout: float | None = None) -> None:
        client = self._client
        if client is not None:
            client.flush(timeout)

    @property
    def pending(self) -> int:
        client = self._client
        return client.pending if client is not None else 0

    # -- the DataSource API ---------------------------------------------------
    def create_tables(self):
        return self._call("create_tables", locals())

    def get_schema(self, table=None):
        return self._call("get_schema", locals())

    def store_taskmanager(
        self, name=None, taskmanager_id=None, datestamp=None, *, taskmanager_name=None
    ):
        args = taskmanager_arguments(name, taskmanager_id, datestamp, taskmanager_name)
        return self._call("store_taskmanager", args)

    def get_taskmanager(self, taskmanager_name, taskmanager_id=None):
        return self._call("get_taskmanager", locals())

    def get_taskmanagers(self, taskmanager_name=None, start_time=None, end_time=None):
        return self._call("get_taskmanagers", locals())

    def get_last_generation_id(self, taskmanager_name, taskmanager_id=None):
        return self._call("get_last_generation_id", locals())

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        return self._call("insert", locals())

    def update(self, taskmanager_id, generation_id, key, value, header, metadata):
        return self._call("update", locals())

    def get_dataproduct(self, taskmanager_id, generation_id, key):
        return self._call("get_dataproduct", locals())

    def get_dataproducts(self, taskmanager_id, key=None):
        return self._call("get_dataproducts", locals())

    def get_datablock(self, taskmanager_id, generation_id):
        return self._call("get_datablock", locals())

    def get_header(self, taskmanager_id, generation_id, key):
        return self._call("get_header", locals())

    def get_metadata(self, taskmanager_id, generation_id, key):
        return self._call("get_metadata", locals())

    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id):
        return self._call("duplicate_datablock", locals())

    def delete_data_older_than(self, days):
        return self._call("delete_data_older_than", locals())

    def reap(self, days, timeout: float | None = None):
        """Send one retention message to the reaper and wait for its result.

        Waits up to ``timeout`` seconds, default the ``reap_timeout`` setting (one
        hour): a large reap takes minutes, far longer than an ordinary call.

        The worker's reaper consumer (one active across all workers) deletes task
        managers older than ``days`` days in bounded batches and returns
        ``{"taskmanagers": n, "dataproducts": m, "batches": b, "seconds": s}``.
        """
        return self._call("reap", {"days": days}, timeout or self.reap_timeout)

    def delete(self, taskmanager_id, all_generations=False):
        return self._call("delete", locals())

    def mark_expired(self, taskmanager_id, generation_id, key, expiry_time):
        return self._call("mark_expired", locals())

    def mark_demented(self, taskmanager_id, keys, generation_id=None):
        return self._call("mark_demented", demented_arguments(taskmanager_id, keys, generation_id))
