"""An RPC client over RabbitMQ that many threads can share.

pika is not thread-safe, so one I/O thread owns the connection and its channel;
caller threads hand it requests through ``add_callback_threadsafe`` and wait on
an event for the reply. This keeps heartbeats flowing while callers wait,
tracks publisher confirms asynchronously (a nack fails the call at once), and
publishes with ``mandatory`` so a request nobody can receive fails at once
instead of timing out. Replies come over direct reply-to: nothing to declare or
clean up, and measured as fast as a private reply queue here.

Each request carries the rest of its call's time budget as its AMQP
``expiration``: a request whose caller has given up is never run later.

When the connection drops, the I/O thread reconnects with bounded backoff, and
each call in flight is sent again, with the same message_id (so the worker
applies a write once), until the call's timeout; calls made while disconnected
wait for the reconnection up to their own timeout.

A client belongs to the process that made it: in a child forked from that
process its I/O thread does not exist, and its socket is the parent's. There
``call``, ``publish`` and ``flush`` raise DataSpaceConnectionError at once, and
``close`` forgets the client without a word on the wire (``RemoteDataSource``
makes a new client in the child instead).

``publish`` is the fire-and-forget path for decoupled producers: the request
goes out without ``reply_to`` and the caller goes on at once. The client keeps
each such request until the broker confirms it (on a quorum queue: stored on a
quorum of nodes), sends the unconfirmed ones again, in order and with the same
message_id, after a reconnection, and sends a nacked one again after a pause.
A window (``max_pending`` requests, ``max_pending_bytes``) bounds what it
holds: ``publish`` waits while the window is full. ``flush`` waits until
everything published was confirmed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker

from dataspace_core.amqp import patches  # noqa: F401  (one bad header must not break the connection)
from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.amqp.confirms import ConfirmTracker
from dataspace_core.amqp.failures import describe
from dataspace_core.amqp.patches import close_select_connection
from dataspace_core.amqp.reconnect import ConnectionCallbacks, ConnectionLoop
from dataspace_core.errors import (
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceNoWorkerError,
    DataSpacePublishError,
    DataSpaceRefusedError,
    DataSpaceTimeoutError,
)
from dataspace_core.limits import MAX_MESSAGE_BYTES, MAX_SHORT_STRING
from dataspace_core.protocol import (
    DIRECT_REPLY_TO,
    EXCHANGE,
    FRAMES_HEADER,
    LANE_HEADER,
    PROTOCOL_VERSION,
    VERSION_HEADER,
    content_type,
    queue_for,
)
from dataspace_core.urls import mask_password

log = logging.getLogger(__name__)

CHANNEL_REOPEN_DELAY = 1.0
#: seconds a call waits for its reply before asking whether any worker consumes its
#: queue (RemoteDataSource's ``no_worker_check``): a worker answers a request in
#: milliseconds, so a call still waiting after this may be waiting for no one
NO_WORKER_CHECK = 2.0
#: seconds to wait for the broker's answer to that question
NO_WORKER_PROBE_TIMEOUT = 2.0
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_PENDING_BYTES = 256 * 1024 * 1024


class _ConnectionLost(DataSpaceConnectionError):
    """The connection dropped under a call; sending the request again is safe."""


@dataclass
class _Call:
    operation: str
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    body: bytes | None = None
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass(eq=False)
class _Publication:
    """A fire-and-forget request, kept until the broker confirms it."""

    operation: str
    routing_key: str
    body: bytes
    message_id: str
    exchange: str
    lane: str | None = None


def _check_sendable(operation: str, body: bytes, message_id: str) -> None:
    """Refuse at once what the broker would refuse by closing the channel (and so,
    re-sent after every reopening, never get through)."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"{operation}: a request of {len(body)} bytes is over the broker's "
            f"max_message_size ({MAX_MESSAGE_BYTES} bytes)"
        )
    if len(message_id.encode("utf-8")) > MAX_SHORT_STRING:
        raise ValueError(f"{operation}: message_id is over {MAX_SHORT_STRING} bytes")


def _headers(lane: str | None) -> dict:
    """A request's headers: the protocol version, frames read, and its lane key."""
    headers = {VERSION_HEADER: PROTOCOL_VERSION, FRAMES_HEADER: 1}
    if lane is not None:
        headers[LANE_HEADER] = lane
    return headers


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
    ):
        self.url = url
        self.masked_url = mask_password(url)
        self.timeout = timeout
        self.exchange = exchange
        self.app_id = app_id
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.no_worker_check = no_worker_check
        self._pid = os.getpid()  # the process this client (and its I/O thread) belongs to

        try:
            # several URLs: a cluster's nodes, tried in turn. A broker under a
            # resource alarm blocks publishers: give up rather than buffer requests
            # without bound (their calls are re-sent after reconnecting).
            self._addresses = broker_addresses(
                url,
                name=f"{app_id} {socket.gethostname()}:{os.getpid()}",
                connect_timeout=connect_timeout,
                blocked_timeout=max(timeout, connect_timeout),
            )
        except ValueError as exc:
            raise DataSpaceConnectionError(str(exc)) from None
        # Everything below is guarded by _state (a Condition on one lock).
        self._state = threading.Condition()
        self._calls: dict[str, _Call] = {}
        # delivery tag -> correlation_id of a call, or the _Publication itself
        self._unconfirmed: ConfirmTracker[str | _Publication] = ConfirmTracker()
        # fire-and-forget requests not yet confirmed, by message_id, in publish order
        self._pending: dict[str, _Publication] = {}
        self._pending_bytes = 0
        self._outbox: deque[_Publication] = deque()  # to publish on the I/O thread
        self._drain_scheduled = False
        self._failures: list[str] = []  # publications refused for good, until flush
        self._recycling = False  # the channel is being closed to be opened again (I/O thread)
        self._open = False
        self._closing = False
        self._refusing = False  # stop_publishing() was called: publish raises
        self._attempts = 0  # connection attempts finished
        self._reached = False  # the current connection reached consuming (I/O thread)
        self._last_error = "not connected yet"
        #: the last attempt was refused for a reason retrying cannot cure (credentials,
        #: vhost, a certificate): configuration
        self._refused = False
        self._loop = ConnectionLoop(
            self._addresses,
            ConnectionCallbacks(
                self._on_connection_open,
                self._on_connection_open_error,
                self._on_connection_closed,
            ),
            stopped=lambda: self._closing,
            wait=time.sleep,
            lock=self._state,  # close() sees a new connection, or none is made
        )
        self._channel = None
        self._thread = threading.Thread(target=self._run, name="dataspace-rpc-io", daemon=True)
        self._thread.start()
        rounds = len(self._addresses)  # one attempt at each address before giving up
        with self._state:
            self._state.wait_for(
                lambda: self._open or self._attempts >= rounds, rounds * (connect_timeout + 5)
            )
            connected = self._open
        if not connected:
            self.close()
            if self._refused:
                raise DataSpaceRefusedError(
                    f"the broker at {self.masked_url} refused this client: {self._last_error}"
                )
            raise DataSpaceConnectionError(
                f"cannot reach the broker at {self.masked_url}: {self._last_error}"
            )

    # -- caller side --------------------------------------------------------------
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
        deadline = time.monotonic() + timeout
        message_id = message_id or uuid.uuid4().hex
        _check_sendable(operation, body, message_id)
        while True:
            try:
                return self._attempt(
                    operation,
                    (exchange or self.exchange, routing_key, lane),
                    body,
                    message_id,
                    deadline,
                    timeout,
                )
            except _ConnectionLost as lost:
                if self._closing or time.monotonic() >= deadline:
                    raise DataSpaceConnectionError(str(lost)) from None
                log.info("%s: %s; sending it again (message_id %s)", operation, lost, message_id)

    def _attempt(self, operation, route, body, message_id, deadline, timeout) -> bytes:
        correlation_id = uuid.uuid4().hex
        call = _Call(operation, deadline)
        with self._state:
            ready = self._state.wait_for(
                lambda: self._open or self._closing, max(0.0, deadline - time.monotonic())
            )
            if self._closing:
                raise DataSpaceConnectionError(f"{operation}: the client is closed")
            if not ready:
                raise DataSpaceConnectionError(
                    f"{operation}: not connected to the broker at {self.masked_url} "
                    f"within {timeout:g} s: {self._last_error}"
                )
            self._calls[correlation_id] = call
            # Under the lock: a connection loss either sees this call (and fails
            # it) or happened before (and we saw _open false).
            self._connection.ioloop.add_callback_threadsafe(
                lambda: self._publish(correlation_id, message_id, operation, route, body)
            )
        try:
            if not self._wait(call, route[1], deadline, timeout):
                raise DataSpaceTimeoutError(operation, timeout)
        finally:
            with self._state:
                self._calls.pop(correlation_id, None)
        if call.error is not None:
            raise call.error
        return call.body

    def _wait(self, call: _Call, routing_key: str, deadline: float, timeout: float) -> bool:
        """Wait for the reply until ``deadline``; after ``no_worker_check`` seconds
        without one, ask the broker whether any worker consumes the request's queue,
        and give up at once (DataSpaceNoWorkerError) if none does."""
        first = min(self.no_worker_check, deadline - time.monotonic())
        if call.done.wait(max(0.0, first)):
            return True
        queue = queue_for(routing_key)
        if queue is not None and time.monotonic() < deadline:
            wait = min(NO_WORKER_PROBE_TIMEOUT, max(0.0, deadline - time.monotonic()))
            if self.consumer_count(queue, wait) == 0 and not call.done.is_set():
                raise DataSpaceNoWorkerError(call.operation, timeout, queue, self.masked_url)
        return call.done.wait(max(0.0, deadline - time.monotonic()))

    def consumer_count(self, queue: str, timeout: float = NO_WORKER_PROBE_TIMEOUT) -> int | None:
        """How many consumers ``queue`` has, by a passive declare on a channel of its
        own (no permission needed); 0 for a queue that does not exist; None when the
        broker did not say within ``timeout`` or the client is not connected."""
        answer: list[int] = []
        done = threading.Event()

        def on_closed(_channel, reason) -> None:
            if isinstance(reason, ChannelClosedByBroker) and reason.reply_code == 404:
                answer.append(0)
            done.set()

        def on_declared(channel, frame) -> None:
            answer.append(frame.method.consumer_count)
            done.set()
            channel.close()

        def on_open(channel) -> None:
            channel.add_on_close_callback(on_closed)
            channel.queue_declare(
                queue, passive=True, callback=lambda frame: on_declared(channel, frame)
            )

        def ask() -> None:  # on the I/O thread
            connection = self._connection
            if connection is None or not connection.is_open:
                done.set()
                return
            try:
                connection.channel(on_open_callback=on_open)
            except AMQPError:
                done.set()

        with self._state:
            if not self._open or self._closing:
                return None
            self._connection.ioloop.add_callback_threadsafe(ask)
        done.wait(timeout)
        return answer[0] if answer else None

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
        _check_sendable(operation, body, message_id or "")
        publication = _Publication(
            operation,
            routing_key,
            body,
            message_id or uuid.uuid4().hex,
            exchange or self.exchange,
            lane,
        )
        with self._state:
            room = self._state.wait_for(
                lambda: self._closing or self._refusing or self._has_room(len(body)), timeout
            )
            if self._closing or self._refusing:
                raise DataSpaceConnectionError(f"{operation}: the client is closed")
            if not room:
                raise DataSpaceTimeoutError(operation, timeout)
            replaced = self._pending.get(publication.message_id)
            if replaced is not None:  # sent again by the caller: the newer copy counts
                self._pending_bytes -= len(replaced.body)
            self._pending[publication.message_id] = publication
            self._pending_bytes += len(body)
            self._outbox.append(publication)
            self._schedule_drain()
        return publication.message_id

    def _has_room(self, size: int) -> bool:
        """Whether the window takes one more request of ``size`` bytes (under _state);
        an empty window takes any one, however large."""
        if not self._pending:
            return True
        return len(self._pending) < self.max_pending and (
            self._pending_bytes + size <= self.max_pending_bytes
        )

    @property
    def pending(self) -> int:
        """Fire-and-forget requests published and not yet confirmed by the broker
        (none in a forked child: those are the parent's)."""
        return 0 if self.forked else len(self._pending)

    @property
    def unsettled(self) -> bool:
        """Whether ``flush`` has anything to wait for or to report."""
        return not self.forked and bool(self._pending or self._failures)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker confirmed every request given to ``publish``.

        Raises DataSpacePublishError for requests the broker refused for good
        (no queue bound for them: they are dropped, and reported once), and
        DataSpaceTimeoutError if some are still unconfirmed after ``timeout``
        (they stay pending and are still being sent).
        """
        self._check_process("flush")
        timeout = self.timeout if timeout is None else timeout
        with self._state:
            self._state.wait_for(lambda: not self._pending or self._closing, timeout)
            failures, self._failures = self._failures, []
            left = len(self._pending)
            closed = self._closing
        if failures:
            raise DataSpacePublishError(failures)
        if left and closed:
            raise DataSpaceConnectionError(
                f"flush: the client is closed with {left} published requests not confirmed "
                "by the broker: they may be lost"
            )
        if left:
            raise DataSpaceTimeoutError(
                f"flush ({left} requests not yet confirmed by the broker)", timeout
            )

    def stop_publishing(self) -> None:
        """Refuse further ``publish`` calls (they raise DataSpaceConnectionError), so
        that a ``flush`` before ``close`` covers every request ever accepted: one
        accepted by another thread after the flush would be lost silently."""
        with self._state:
            self._refusing = True
            self._state.notify_all()

    def _schedule_drain(self) -> None:
        """Have the I/O thread publish the outbox (under _state; once per batch)."""
        if self._open and self._outbox and not self._drain_scheduled:
            self._drain_scheduled = True
            self._connection.ioloop.add_callback_threadsafe(self._drain_outbox)

    def close(self) -> None:
        """Close the connection; calls in flight fail with DataSpaceConnectionError.

        In a forked child: forget the client instead (``abandon``).
        """
        if self.forked:
            self.abandon()
            return
        with self._state:
            self._closing = True
            self._state.notify_all()
            connection = self._connection
            calls = list(self._calls.values())
        for call in calls:
            call.fail(DataSpaceConnectionError(f"{call.operation}: the client is closed"))
        if connection is not None:
            with contextlib.suppress(Exception):  # its loop may be closed already
                connection.ioloop.add_callback_threadsafe(self._close_connection)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)

    # -- processes -----------------------------------------------------------------
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
        self._closing = True
        self._refusing = True
        transport = getattr(self._connection, "_transport", None)
        sock = getattr(transport, "_sock", None)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fd = sock.fileno()
            if fd >= 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                try:
                    os.dup2(devnull, fd)
                finally:
                    os.close(devnull)

    # -- I/O thread ----------------------------------------------------------------
    @property
    def _connection(self) -> pika.SelectConnection | None:
        return self._loop.connection

    def _run(self) -> None:
        self._loop.run(self._connection_ended)

    def _connection_ended(self, _connection, crash: BaseException | None) -> bool:
        """After a connection's loop: wake whoever waits for the first attempt;
        whether it got as far as consuming replies."""
        if crash is not None:
            self._lost(f"I/O loop failed: {crash}")
        with self._state:
            self._attempts += 1
            self._state.notify_all()
            reached, self._reached = self._reached, False
            return reached

    def _on_connection_open(self, connection) -> None:
        if self._closing:
            connection.close()
            return
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection, error) -> None:
        problem = describe(error)  # pika says only AMQPConnectionWorkflowFailed
        self._lost(problem.text)
        self._refused = problem.configuration
        connection.ioloop.stop()

    def _on_connection_closed(self, connection, reason) -> None:
        self._lost(f"connection closed: {reason}")
        connection.ioloop.stop()

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.basic_consume(
            DIRECT_REPLY_TO, self._on_reply, auto_ack=True, callback=self._on_consuming
        )

    def _on_consuming(self, _frame) -> None:
        with self._state:
            self._unconfirmed.restart()
            self._open = True
            self._reached = True
            # everything unconfirmed goes again, in the order it was first published
            self._outbox = deque(self._pending.values())
            self._drain_scheduled = False
            self._schedule_drain()
            self._state.notify_all()
        log.debug("connected to %s", self.masked_url)

    def _on_channel_closed(self, channel, reason) -> None:
        """A channel error from the broker fails the calls in flight and reopens the
        channel after a pause; a channel closed by its connection's end is left to
        ``_on_connection_closed`` (those calls are re-sent after reconnecting); one
        recycled after a refusal (``_recycle_channel``) comes back after a pause,
        and what was in flight on it is sent again."""
        if self._recycling and not self._closing:
            self._recycling = False
            self._lost(f"channel reopened after a refusal: {reason}")
            connection = self._connection
            if connection is not None and connection.is_open:
                connection.ioloop.call_later(CHANNEL_REOPEN_DELAY, self._reopen_channel)
            return
        if self._closing or not isinstance(reason, ChannelClosedByBroker):
            self._lost(f"channel closed: {reason}")
            return
        if reason.reply_code == 404:
            # No exchange: no worker ever declared the topology on this vhost.
            self._lost(
                f"channel closed by the broker: {reason.reply_text}; "
                "is a dataspace worker running against this vhost?",
                DataSpaceConnectionError,
            )
        else:
            self._lost(f"channel closed by the broker: {reason.reply_text}", DataSpaceError)
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.ioloop.call_later(CHANNEL_REOPEN_DELAY, self._reopen_channel)

    def _reopen_channel(self) -> None:
        connection = self._connection
        if connection is not None and connection.is_open and not self._closing:
            connection.channel(on_open_callback=self._on_channel_open)

    def _lost(self, reason: str, error_cls: type[DataSpaceError] = _ConnectionLost) -> None:
        """Mark the link down and fail every call in flight."""
        with self._state:
            self._open = False
            self._last_error = reason
            calls = list(self._calls.values())
            self._unconfirmed.clear()
        for call in calls:
            call.fail(error_cls(f"{call.operation}: {reason} (broker {self.masked_url})"))

    def _publish(self, correlation_id, message_id, operation, route, body) -> None:
        exchange, routing_key, lane = route
        with self._state:
            call = self._calls.get(correlation_id)
            channel = self._channel
        if call is None:  # the caller gave up before we got here
            return
        # what is left of the caller's wait, as the request's time to live
        remaining_ms = max(1, int((call.deadline - time.monotonic()) * 1000))
        properties = pika.BasicProperties(
            content_type=content_type(body),
            delivery_mode=pika.DeliveryMode.Persistent,
            correlation_id=correlation_id,
            message_id=message_id,
            reply_to=DIRECT_REPLY_TO,
            type=operation,
            app_id=self.app_id,
            timestamp=int(time.time()),
            expiration=str(remaining_ms),
            headers=_headers(lane),
        )
        try:
            channel.basic_publish(
                exchange, routing_key, body, properties=properties, mandatory=True
            )
        except (AMQPError, AttributeError, OSError) as exc:
            call.fail(_ConnectionLost(f"{operation}: publish failed: {exc}"))
            return
        with self._state:
            self._unconfirmed.add(correlation_id)

    def _drain_outbox(self) -> None:
        """Publish what ``publish`` queued (I/O thread)."""
        with self._state:
            self._drain_scheduled = False
            batch, self._outbox = self._outbox, deque()
            channel = self._channel
            open_ = self._open
        if not open_:
            return  # sent again from _pending once consuming
        timestamp = int(time.time())
        for publication in batch:
            properties = pika.BasicProperties(
                content_type=content_type(publication.body),
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=publication.message_id,
                type=publication.operation,
                app_id=self.app_id,
                timestamp=timestamp,
                headers=_headers(publication.lane),
            )
            try:
                channel.basic_publish(
                    publication.exchange,
                    publication.routing_key,
                    publication.body,
                    properties=properties,
                    mandatory=True,
                )
            except (AMQPError, AttributeError, OSError) as exc:
                log.info("publish failed (%s); sent again after reconnecting", exc)
                return
            with self._state:
                self._unconfirmed.add(publication)

    def _on_confirm(self, frame) -> None:
        method = frame.method
        nacked = isinstance(method, pika.spec.Basic.Nack)
        with self._state:
            items = self._unconfirmed.settle(method.delivery_tag, method.multiple)
            for item in items:
                if isinstance(item, _Publication) and not nacked:
                    if self._pending.get(item.message_id) is item:
                        del self._pending[item.message_id]
                        self._pending_bytes -= len(item.body)
            self._state.notify_all()
        if nacked:
            # The queue is full, or, measured on RabbitMQ 3.10 in a cluster, the
            # channel was opened while its quorum queue had no leader: the broker
            # then refuses every publish on that channel for good. Either way: a
            # new channel after a pause, and everything in flight sent again in
            # order (calls with their message_id, publications from _pending).
            self._recycle_channel(
                f"the broker refused {len(items)} request(s) (nack): the queue is full, "
                "or its leader moved"
            )

    def _recycle_channel(self, reason: str) -> None:
        """Close the channel, to open a new one after a pause (I/O thread)."""
        channel = self._channel
        if self._recycling or channel is None or not channel.is_open:
            return
        log.warning("%s; opening a new channel in %.1f s", reason, CHANNEL_REOPEN_DELAY)
        self._recycling = True
        channel.close()

    def _on_return(self, _channel, method, properties, _body) -> None:
        reason = (
            f"request unroutable ({method.reply_text}): no queue is "
            f"bound for '{method.routing_key}' on exchange '{method.exchange}'; "
            "is a dataspace worker running against this vhost?"
        )
        with self._state:
            call = self._calls.get(properties.correlation_id)
            publication = None if call else self._pending.pop(properties.message_id or "", None)
            if publication is not None:
                self._pending_bytes -= len(publication.body)
                self._failures.append(f"{publication.operation} {publication.message_id}: {reason}")
                self._state.notify_all()
        if call is not None:
            call.fail(DataSpaceConnectionError(f"{call.operation}: {reason}"))

    def _on_reply(self, _channel, _method, properties, body) -> None:
        with self._state:
            call = self._calls.get(properties.correlation_id)
        if call is not None and not call.done.is_set():
            call.body = body
            call.done.set()

    def _close_connection(self) -> None:
        close_select_connection(self._connection)

    def __repr__(self) -> str:
        return f"RpcClient({self.masked_url}, open={self._open})"
