"""``RpcClient``: what callers use, and what ties its parts together.

The parts, each in a module of its own: the state every thread shares and its one
lock (``link.py``), calls that wait for a reply (``calls.py``), the
fire-and-forget window (``publications.py``), and the I/O thread's connection and
channel (``channel.py``). This class makes them, starts the I/O thread, resolves
the defaults of each request, and owns what is about the client as a whole:
closing it, and the process it belongs to (see the package's docstring on fork).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid

import pika

from dataspace_core.amqp.addresses import BrokerAddresses, broker_addresses
from dataspace_core.errors import DataSpaceConnectionError, DataSpaceRefusedError
from dataspace_core.protocol import EXCHANGE
from dataspace_core.urls import mask_password

from .calls import NO_WORKER_CHECK, NO_WORKER_PROBE_TIMEOUT, Calls
from .channel import RpcChannel
from .link import Link
from .messages import check_sendable
from .publications import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_BYTES,
    Publication,
    Publications,
)

log = logging.getLogger("dataspace_client.rpc")


class RpcClient:
    """Publishes requests and waits for their replies; safe to share between threads."""

    def __init__(
        self,
        url: str | list[str],
        *,
        app_id: str,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        exchange: str = EXCHANGE,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        no_worker_check: float = NO_WORKER_CHECK,
        batches: bool = True,
    ):
        self.url = url
        self.masked_url = mask_password(url)
        self.timeout = timeout
        self.exchange = exchange
        self.app_id = app_id
        self._pid = os.getpid()  # the process this client (and its I/O thread) belongs to
        addresses = _addresses(url, app_id, timeout, connect_timeout)
        self._link = Link(self.masked_url)
        self._state = self._link.lock  # guards the link, the calls and the publications
        self._publications = Publications(
            self._link,
            app_id=app_id,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
            batches=batches,
        )
        self._calls = Calls(
            self._link,
            app_id=app_id,
            no_worker_check=no_worker_check,
            queued=self._publications.queued,
        )
        self._channel = RpcChannel(
            self._link,
            self._calls,
            self._publications,
            addresses,
            consuming=lambda frame: self._on_consuming(frame),
        )
        self._thread = threading.Thread(
            target=self._channel.run, name="dataspace-rpc-io", daemon=True
        )
        self._thread.start()
        self._wait_for_first_connection(len(addresses), connect_timeout)

    def _wait_for_first_connection(self, rounds: int, connect_timeout: float) -> None:
        """Wait until connected, or until one attempt at each address failed."""
        with self._state:
            self._state.wait_for(
                lambda: self._link.open or self._channel.attempts >= rounds,
                rounds * (connect_timeout + 5),
            )
            connected = self._link.open
        if connected:
            return
        self.close()
        if self._channel.refused:
            raise DataSpaceRefusedError(
                f"the broker at {self.masked_url} refused this client: {self._link.last_error}"
            )
        raise DataSpaceConnectionError(
            f"cannot reach the broker at {self.masked_url}: {self._link.last_error}"
        )

    # -- calls -------------------------------------------------------------------------
    def call(
        self,
        operation: str,
        routing_key: str,
        body: bytes,
        timeout: float | None = None,
        message_id: str | None = None,
        exchange: str | None = None,
        lane: str | None = None,
    ) -> bytes:
        """Send one request and return the reply body; raises DataSpace*Error on failure.

        ``exchange``: where to publish it (default the client's: ``dataspace``);
        ``lane``: the task manager an ordering lane is chosen by (LANE_HEADER).

        If the connection drops while the call waits, the request is sent again
        on the new connection, with the same ``message_id`` (a fresh one when
        None), until the call's timeout: the worker applies a write once
        whatever the number of copies.
        """
        self._check_process(operation)
        timeout = self.timeout if timeout is None else timeout
        message_id = message_id or uuid.uuid4().hex
        check_sendable(operation, body, message_id)
        route = (exchange or self.exchange, routing_key, lane)
        return self._calls.call(operation, route, body, message_id, timeout)

    def consumer_count(self, queue: str, timeout: float = NO_WORKER_PROBE_TIMEOUT) -> int | None:
        """How many consumers ``queue`` has (0 for a queue that does not exist); None
        when the broker did not say within ``timeout`` or the client is not connected."""
        return self._calls.consumer_count(queue, timeout)

    # -- fire and forget ---------------------------------------------------------------
    def publish(
        self,
        operation: str,
        routing_key: str,
        body: bytes,
        message_id: str | None = None,
        timeout: float | None = None,
        exchange: str | None = None,
        lane: str | None = None,
    ) -> str:
        """Send a request that expects no reply; return its message_id at once.

        Waits only while the window of unconfirmed requests is full (up to
        ``timeout``, then DataSpaceTimeoutError). The request is kept and sent
        again until the broker confirms it; ``flush`` waits for that.
        """
        self._check_process(operation)
        timeout = self.timeout if timeout is None else timeout
        check_sendable(operation, body, message_id or "")
        publication = Publication(
            operation,
            routing_key,
            body,
            message_id or uuid.uuid4().hex,
            exchange or self.exchange,
            lane,
        )
        self._publications.add(publication, timeout)
        return publication.message_id

    @property
    def pending(self) -> int:
        """Fire-and-forget requests published and not yet confirmed by the broker
        (none in a forked child: those are the parent's)."""
        return 0 if self.forked else len(self._publications.pending)

    @property
    def unsettled(self) -> bool:
        """Whether ``flush`` has anything to wait for or to report."""
        return not self.forked and self._publications.unsettled

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker confirmed every request given to ``publish``.

        Raises DataSpacePublishError for requests the broker refused for good
        (no queue bound for them: they are dropped, and reported once), and
        DataSpaceTimeoutError if some are still unconfirmed after ``timeout``
        (they stay pending and are still being sent).
        """
        self._check_process("flush")
        self._publications.flush(self.timeout if timeout is None else timeout)

    def stop_publishing(self) -> None:
        """Refuse further ``publish`` calls (they raise DataSpaceConnectionError), so
        that a ``flush`` before ``close`` covers every request ever accepted: one
        accepted by another thread after the flush would be lost silently."""
        self._publications.stop()

    # -- the client as a whole -----------------------------------------------------------
    def _on_consuming(self, _frame) -> None:
        """A new channel consumes replies (I/O thread): the link is up, and every
        publication not yet confirmed goes again, in the order it was published."""
        with self._state:
            self._channel.link_up()
            self._publications.send_again()
            self._state.notify_all()
        log.debug("connected to %s", self.masked_url)

    def close(self) -> None:
        """Close the connection; calls in flight fail with DataSpaceConnectionError.

        In a forked child: forget the client instead (``abandon``).
        """
        if self.forked:
            self.abandon()
            return
        with self._state:
            self._link.closing = True
            self._link.closed.set()
            self._state.notify_all()
            connection = self._link.connection
            calls = self._calls.in_flight()
        for call in calls:
            call.fail(DataSpaceConnectionError(f"{call.operation}: the client is closed"))
        if connection is not None:
            with contextlib.suppress(Exception):  # its loop may be closed already
                connection.ioloop.add_callback_threadsafe(self._channel.close_connection)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)

    @property
    def forked(self) -> bool:
        """Whether this is a copy of the client in a child forked from its process."""
        return os.getpid() != self._pid

    def on_io_thread(self) -> bool:
        """Whether the calling thread is this client's I/O thread."""
        return threading.current_thread() is self._thread

    def _check_process(self, operation: str) -> None:
        if self.forked:
            raise DataSpaceConnectionError(
                f"{operation}: this broker client belongs to process {self._pid}, not to "
                f"this one ({os.getpid()}), forked from it: make a new client here "
                "(RemoteDataSource does so by itself)"
            )

    def abandon(self) -> None:
        """Forget this client in a child forked from its process, without a word on
        the wire: its connection is the parent's, which a Connection.Close (or a
        socket shutdown) from here would end under the parent. Nothing here takes
        the client's lock, which a parent thread may have held at the fork.

        The child's copy of the socket is pointed at /dev/null, so the child keeps
        no hold on the parent's TCP connection; the rest (the loop's own
        descriptors, the parent's unconfirmed writes) stays the parent's.
        """
        if not self.forked:
            raise RuntimeError("abandon() is for a forked child: close() the client instead")
        self._link.closing = True
        self._publications.refusing = True
        _detach_socket(self._link.connection)

    # -- settings, and what tests look at --------------------------------------------------
    @property
    def max_pending(self) -> int:
        return self._publications.max_pending

    @property
    def max_pending_bytes(self) -> int:
        return self._publications.max_pending_bytes

    @property
    def no_worker_check(self) -> float:
        return self._calls.no_worker_check

    @property
    def _connection(self) -> pika.SelectConnection | None:
        return self._link.connection

    @property
    def _open(self) -> bool:
        return self._link.open

    @property
    def _attempts(self) -> int:
        return self._channel.attempts

    @property
    def _pending(self) -> dict[str, Publication]:
        return self._publications.pending

    def __repr__(self) -> str:
        return f"RpcClient({self.masked_url}, open={self._link.open})"


def _addresses(
    url: str | list[str], app_id: str, timeout: float, connect_timeout: float
) -> BrokerAddresses:
    """The broker's addresses: several URLs are a cluster's nodes, tried in turn. A
    broker under a resource alarm blocks publishers: the connection gives up rather
    than buffer requests without bound (their calls are re-sent after reconnecting)."""
    try:
        return broker_addresses(
            url,
            name=f"{app_id} {socket.gethostname()}:{os.getpid()}",
            connect_timeout=connect_timeout,
            blocked_timeout=max(timeout, connect_timeout),
        )
    except ValueError as exc:
        raise DataSpaceConnectionError(str(exc)) from None


def _detach_socket(connection: pika.SelectConnection | None) -> None:
    """Point this process's copy of ``connection``'s socket at /dev/null (in a forked
    child: the connection itself stays the parent's)."""
    transport = getattr(connection, "_transport", None)
    sock = getattr(transport, "_sock", None)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        fd = sock.fileno()
        if fd >= 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
