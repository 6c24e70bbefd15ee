"""Calls that wait for a reply: sent, waited for, and sent again after a lost link.

A caller registers its call under the link's lock, publishes the request itself
while the I/O thread waits for the broker (io_lock.py), or has the I/O thread
publish it when that is busy, and waits on the call's own signal (``Done``),
which the reply (``Call.answer``), a return, a channel error or a lost
connection (``Call.fail``) sets. A call the
connection dropped under (``ConnectionLost``) is sent again with the same
message_id until its deadline: the worker applies a write once whatever the
number of copies. A call still unanswered after ``no_worker_check`` seconds asks
the broker whether any worker consumes its queue at all.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pika.exceptions import AMQPError, ChannelClosedByBroker

from dataspace_core.errors import (
    DataSpaceConnectionError,
    DataSpaceNoWorkerError,
    DataSpaceTimeoutError,
)
from dataspace_core.protocol import READ_ROUTING_PREFIX, queue_for, slow_routing_key

from .link import Link
from .messages import request_properties

log = logging.getLogger("dataspace_client.rpc")

#: seconds a call waits for its reply before asking whether any worker consumes its
#: queue (RemoteDataSource's ``no_worker_check``): a worker answers a request in
#: milliseconds, so a call still waiting after this may be waiting for no one
NO_WORKER_CHECK = 2.0
#: seconds to wait for the broker's answer to that question
NO_WORKER_PROBE_TIMEOUT = 2.0

#: where a request goes: exchange, routing key, and its lane key (or None)
Route = tuple[str, str, str | None]


class ConnectionLost(DataSpaceConnectionError):
    """The connection dropped under a call; sending the request again is safe."""


class FastReadFailed(ConnectionLost):
    """A fast read came back unroutable, or got no reply within ``no_worker_check``
    seconds: it goes again through the request queue (a read may run twice)."""


class ReadReturned(FastReadFailed):
    """A fast read came back unroutable (no ``dataspace.reads``: workers older than
    it, or its node just went down)."""


class ReadUnanswered(FastReadFailed):
    """A fast read got no reply within ``no_worker_check`` seconds: lost with its
    queue's node, or waiting in a queue nobody consumes (workers rolled back)."""


class Done:
    """A signal set once, for the one thread that waits on it: what a
    ``threading.Event`` does for a call, on a bare lock (held until set) instead
    of a condition, a waiter's lock and a lock to guard them, made and taken at
    every call. Set from any thread, any number of times."""

    __slots__ = ("_lock", "_set")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(RuntimeError):  # released already: set before
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Whether it is set, waiting up to ``timeout`` seconds for it."""
        if self._set:
            return True
        if self._lock.acquire(timeout=timeout):
            with contextlib.suppress(RuntimeError):  # a later set() released it
                self._lock.release()  # open again for a later wait
            return True
        return self._set


@dataclass
class Call:
    """One request waiting for its reply; ``done`` is set once it has one, or failed."""

    operation: str
    deadline: float
    done: Done = field(default_factory=Done)
    body: bytes | None = None
    error: BaseException | None = None

    def answer(self, body: bytes) -> None:
        if not self.done.is_set():
            self.body = body
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class Calls:
    """The calls waiting for their reply, by correlation_id (guarded by the link's lock)."""

    def __init__(
        self,
        link: Link,
        *,
        app_id: str,
        no_worker_check: float,
        queued: Callable[[], bool] = lambda: False,
    ):
        """``queued()`` (under the link's lock): whether fire-and-forget requests
        wait to be published; a call published on the caller's thread would pass
        them, so it goes through the I/O thread then (Publications.queued)."""
        self.link = link
        self.queued = queued
        self.app_id = app_id
        self.no_worker_check = no_worker_check
        self._waiting: dict[str, Call] = {}

    def get(self, correlation_id: str | None) -> Call | None:
        """The call waiting under ``correlation_id``, if any (under the link's lock)."""
        return self._waiting.get(correlation_id)

    def in_flight(self) -> list[Call]:
        """Every call waiting now (under the link's lock)."""
        return list(self._waiting.values())

    def call(
        self, operation: str, route: Route, body: bytes, message_id: str, timeout: float
    ) -> bytes:
        """Send the request and return the reply's body, sending it again after each
        lost connection until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._attempt(operation, route, body, message_id, deadline, timeout)
            except FastReadFailed as failed:
                # the request queue serves every read too, with its delivery limit
                # and its replication: once more through it
                exchange, routing_key, lane = route
                route = (exchange, slow_routing_key(routing_key), lane)
                log.debug("%s; sending it to %s", failed, route[1])
            except ConnectionLost as lost:
                if self.link.closing or time.monotonic() >= deadline:
                    raise DataSpaceConnectionError(str(lost)) from None
                log.info("%s: %s; sending it again (message_id %s)", operation, lost, message_id)

    def _attempt(self, operation, route, body, message_id, deadline, timeout) -> bytes:
        correlation_id = uuid.uuid4().hex
        call = Call(operation, deadline)
        link = self.link
        with link.lock:
            ready = link.lock.wait_for(
                lambda: link.open or link.closing, max(0.0, deadline - time.monotonic())
            )
            if link.closing:
                raise DataSpaceConnectionError(f"{operation}: the client is closed")
            if not ready:
                raise DataSpaceConnectionError(
                    f"{operation}: not connected to the broker at {link.masked_url} "
                    f"within {timeout:g} s: {link.last_error}"
                )
            self._waiting[correlation_id] = call
            connection = link.connection
        # Registered under the lock: a connection loss from now on fails the call
        # (and its caller sends it again), one before it we saw as the link down.
        publish = lambda: self._publish(correlation_id, message_id, operation, route, body)  # noqa: E731

        def publish_here() -> bool:
            """Publish on this thread (the I/O thread waits: io_lock.py), unless that
            could reorder requests or use a channel that is not the link's."""
            with link.lock:
                if not self._here_now(call, connection):
                    return False
            publish()
            return True

        try:
            if not link.io.try_run(connection, publish_here):  # hand it over
                with link.lock:
                    if link.open and not link.closing:
                        link.run_on_io_thread(publish)
                    else:
                        call.fail(ConnectionLost(f"{operation}: {link.last_error}"))
            if not self._wait(call, route[1], deadline, timeout):
                raise DataSpaceTimeoutError(operation, timeout)
        finally:
            with link.lock:
                self._waiting.pop(correlation_id, None)
        if call.error is not None:
            raise call.error
        return call.body

    def _here_now(self, call: Call, connection) -> bool:
        """Whether a call's request may leave from its caller's thread now (under
        the link's lock, with the I/O thread waiting): the link is up on the
        connection the call was registered on, with an open channel (not one being
        recycled or opened again, whose confirms are numbered afresh at
        ``link_up``), the call not failed meanwhile, no fire-and-forget request
        waiting to go first, and no other call in flight (the I/O thread sends a
        busy client's requests together, which costs the broker less CPU than one
        small read per request: bench/cpu.py)."""
        link = self.link
        channel = link.channel
        return (
            link.open
            and not link.closing
            and link.connection is connection
            and channel is not None
            and channel.is_open
            and not call.done.is_set()
            and not self.queued()
            and len(self._waiting) == 1
        )

    def _wait(self, call: Call, routing_key: str, deadline: float, timeout: float) -> bool:
        """Wait for the reply until ``deadline``; after ``no_worker_check`` seconds
        without one, ask the broker whether any worker consumes the request's queue,
        and give up at once (DataSpaceNoWorkerError) if none does. A fast read still
        unanswered then is sent again through the request queue instead
        (ReadUnanswered): a read changes nothing, and one in ``dataspace.reads`` is
        lost with its node or waits for nobody once the workers are rolled back."""
        first = min(self.no_worker_check, deadline - time.monotonic())
        if call.done.wait(max(0.0, first)):
            return True
        if routing_key.startswith(READ_ROUTING_PREFIX) and time.monotonic() < deadline:
            raise ReadUnanswered(f"{call.operation}: no reply within {first:g} s")
        queue = queue_for(routing_key)
        if queue is not None and time.monotonic() < deadline:
            wait = min(NO_WORKER_PROBE_TIMEOUT, max(0.0, deadline - time.monotonic()))
            if self.consumer_count(queue, wait) == 0 and not call.done.is_set():
                raise DataSpaceNoWorkerError(call.operation, timeout, queue, self.link.masked_url)
        return call.done.wait(max(0.0, deadline - time.monotonic()))

    def _publish(self, correlation_id, message_id, operation, route, body) -> None:
        """Publish a call's request (on the I/O thread, or on the caller's while the
        I/O thread waits: io_lock.py), unless its caller gave up meanwhile."""
        exchange, routing_key, lane = route
        with self.link.lock:
            call = self._waiting.get(correlation_id)
            channel = self.link.channel
        if call is None or call.done.is_set():  # the caller gave up, or it failed
            return
        properties = request_properties(
            app_id=self.app_id,
            operation=operation,
            body=body,
            message_id=message_id,
            lane=lane,
            timestamp=int(time.time()),
            correlation_id=correlation_id,
            # what is left of the caller's wait, as the request's time to live
            expires_in_ms=max(1, int((call.deadline - time.monotonic()) * 1000)),
            persistent=not routing_key.startswith(READ_ROUTING_PREFIX),
        )
        try:
            channel.basic_publish(
                exchange, routing_key, body, properties=properties, mandatory=True
            )
        except (AMQPError, AttributeError, OSError) as exc:
            call.fail(ConnectionLost(f"{operation}: publish failed: {exc}"))
            return
        with self.link.lock:
            self.link.unconfirmed.add(correlation_id)

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
            connection = self.link.connection
            if connection is None or not connection.is_open:
                done.set()
                return
            try:
                connection.channel(on_open_callback=on_open)
            except AMQPError:
                done.set()

        with self.link.lock:
            if not self.link.open or self.link.closing:
                return None
            self.link.run_on_io_thread(ask)
        done.wait(timeout)
        return answer[0] if answer else None
