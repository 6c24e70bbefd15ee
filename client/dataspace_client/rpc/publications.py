"""The fire-and-forget window: requests published without a reply, kept until the
broker confirms them.

``publish`` puts a request in ``pending`` (by message_id, in publish order) and in
the outbox, which the I/O thread empties in one callback per batch. A confirm
removes it from ``pending``; a nack leaves it there, to go again on the next
channel, and every new channel sends all of ``pending`` again, in order and with
the same message_ids (``send_again``). A request returned unroutable is dropped
and reported once, by the next ``flush``. The window (``max_pending`` requests,
``max_pending_bytes``) bounds what is held: ``publish`` waits while it is full.
What one drain publishes goes in batches where it can (batching.py): a batch is
confirmed, or returned, as one message.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from pika.exceptions import AMQPError

from dataspace_core.errors import (
    DataSpaceConnectionError,
    DataSpacePublishError,
    DataSpaceTimeoutError,
)

from .batching import Batch, Batching
from .link import Link
from .messages import request_properties

log = logging.getLogger("dataspace_client.rpc")

DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_PENDING_BYTES = 256 * 1024 * 1024


@dataclass(eq=False)
class Publication:
    """A fire-and-forget request, kept until the broker confirms it."""

    operation: str
    routing_key: str
    body: bytes
    message_id: str
    exchange: str
    lane: str | None = None


class Publications:
    """Requests published and not yet confirmed (guarded by the link's lock)."""

    def __init__(
        self,
        link: Link,
        *,
        app_id: str,
        max_pending: int,
        max_pending_bytes: int,
        batches: bool = True,
    ):
        self.link = link
        self.batching = Batching(batches)
        self.app_id = app_id
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        #: not yet confirmed, by message_id, in publish order
        self.pending: dict[str, Publication] = {}
        self.pending_bytes = 0
        #: to publish on the I/O thread, and whether a callback to do so is scheduled
        self._outbox: deque[Publication] = deque()
        self._drain_scheduled = False
        #: refused for good, until ``flush`` reports them
        self._failures: list[str] = []
        #: ``stop()`` was called: ``add`` raises
        self.refusing = False

    # -- callers' side ---------------------------------------------------------------
    def add(self, publication: Publication, timeout: float) -> None:
        """Take ``publication`` into the window, waiting up to ``timeout`` for room."""
        link, size = self.link, len(publication.body)
        with link.lock:
            room = link.lock.wait_for(
                lambda: link.closing or self.refusing or self._has_room(size), timeout
            )
            if link.closing or self.refusing:
                raise DataSpaceConnectionError(f"{publication.operation}: the client is closed")
            if not room:
                raise DataSpaceTimeoutError(publication.operation, timeout)
            replaced = self.pending.get(publication.message_id)
            if replaced is not None:  # sent again by the caller: the newer copy counts
                self.pending_bytes -= len(replaced.body)
            self.pending[publication.message_id] = publication
            self.pending_bytes += size
            self._outbox.append(publication)
            self._schedule_drain()

    def _has_room(self, size: int) -> bool:
        """Whether the window takes one more request of ``size`` bytes (under the
        lock); an empty window takes any one, however large."""
        if not self.pending:
            return True
        return len(self.pending) < self.max_pending and (
            self.pending_bytes + size <= self.max_pending_bytes
        )

    def queued(self) -> bool:
        """Whether requests wait in the outbox to be published (under the lock)."""
        return bool(self._outbox)

    @property
    def unsettled(self) -> bool:
        """Whether ``flush`` has anything to wait for or to report."""
        return bool(self.pending or self._failures)

    def flush(self, timeout: float) -> None:
        """Wait until the broker confirmed every request in the window; raise for
        those refused for good, and for those still unconfirmed after ``timeout``."""
        link = self.link
        with link.lock:
            link.lock.wait_for(lambda: not self.pending or link.closing, timeout)
            failures, self._failures = self._failures, []
            left = len(self.pending)
            closed = link.closing
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

    def stop(self) -> None:
        """Refuse further requests (``add`` raises), waking whoever waits for room."""
        with self.link.lock:
            self.refusing = True
            self.link.lock.notify_all()

    # -- the I/O thread's side -------------------------------------------------------
    def send_again(self) -> None:
        """A new channel consumes (under the lock): everything unconfirmed goes again,
        in the order it was first published."""
        self._outbox = deque(self.pending.values())
        self.batching.in_flight.clear()
        self._drain_scheduled = False
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        """Have the I/O thread publish the outbox (under the lock; once per batch)."""
        if self.link.open and self._outbox and not self._drain_scheduled:
            self._drain_scheduled = True
            self.link.run_on_io_thread(self._drain)

    def _drain(self) -> None:
        """Publish what ``add`` queued (I/O thread)."""
        with self.link.lock:
            self._drain_scheduled = False
            batch, self._outbox = self._outbox, deque()
            channel = self.link.channel
            open_ = self.link.open
        if not open_:
            return  # sent again from pending once consuming
        timestamp = int(time.time())
        for message in self.batching.grouped(batch):
            body = message.body() if isinstance(message, Batch) else message.body
            properties = request_properties(
                app_id=self.app_id,
                operation=message.operation,
                body=body,
                message_id=message.message_id,
                lane=None if isinstance(message, Batch) else message.lane,
                timestamp=timestamp,
            )
            try:
                channel.basic_publish(
                    message.exchange,
                    message.routing_key,
                    body,
                    properties=properties,
                    mandatory=True,
                )
            except (AMQPError, AttributeError, OSError) as exc:
                log.info("publish failed (%s); sent again after reconnecting", exc)
                return
            with self.link.lock:
                self.link.unconfirmed.add(message)
                if isinstance(message, Batch):
                    self.batching.in_flight[message.message_id] = message

    def confirmed(self, message: Publication | Batch) -> None:
        """The broker acked ``message`` (under the lock): it leaves the window (a
        batch: each of its requests, unless the batch came back unroutable), unless
        a newer copy under its message_id took its place."""
        if isinstance(message, Batch):
            self.batching.in_flight.pop(message.message_id, None)
            self.batching.confirmed(message)
            if not message.returned:
                for publication in message.items:
                    self.confirmed(publication)
            return
        publication = message
        if self.pending.get(publication.message_id) is publication:
            del self.pending[publication.message_id]
            self.pending_bytes -= len(publication.body)

    def returned(self, message_id: str, reason: str) -> bool:
        """The broker returned the request ``message_id`` unroutable (under the lock):
        it is dropped, and reported by the next ``flush``. A batch returned stays
        pending, request by request (older workers): True when the channel must be
        recycled for them to go again in order, one by one."""
        batch = self.batching.in_flight.pop(message_id, None)
        if batch is not None:
            return self.batching.returned(batch)
        publication = self.pending.pop(message_id, None)
        if publication is not None:
            self.pending_bytes -= len(publication.body)
            self._failures.append(f"{publication.operation} {publication.message_id}: {reason}")
            self.link.lock.notify_all()
        return False
