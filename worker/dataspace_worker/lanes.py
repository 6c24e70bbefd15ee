"""Ordering lanes on the worker's side (docs/scaling.md): being counted among the
workers that serve lanes, and handing lanes to the others when this worker is the
single active consumer of more than its share.

Every worker subscribes to every lane queue; a lane queue's single active consumer
is its first subscriber, so the first worker would keep them all. Each worker also
consumes ``dataspace.lanes.workers`` (no messages): its consumer count is the number
of lane workers. ``WorkerPool.rebalance`` (run every few seconds) asks that count on
the census channel and closes the channels of the lanes beyond its share, which
subscribe again after a pause, at the back of their lines."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dataspace_core.amqp.patches import close_without_cancel

log = logging.getLogger("dataspace_worker.consumer")


def lanes_to_give(
    lanes: list, workers: int, window: float, now: float | None = None
) -> tuple[list, list]:
    """The lane consumers that delivered within ``window`` seconds (those this worker
    is the active one of), and those of them beyond its share, ``ceil(lanes /
    workers)``: the ones to give to the other workers."""
    share = -(-len(lanes) // max(1, workers))
    now = time.monotonic() if now is None else now
    active = [c for c in lanes if c.channel is not None and now - c.last_delivery < window]
    return active, active[share:]


def rebalance(
    lanes: list,
    census: LaneCensus | None,
    window: float,
    give_up_later: Callable[[list], None],
) -> list[int]:
    """Hand lanes to other workers when this one is active on more than its share.

    Single active consumer makes the first subscriber of a lane its consumer,
    so the first worker would keep every lane. Every worker subscribes to
    every lane and counts the workers (the consumer count of
    ``dataspace.lanes.workers``, which each of them consumes; a classic queue,
    which forgets the consumers of a node that goes down at once, where a
    quorum queue counts them until the node is back). If this worker
    received deliveries from more than ``ceil(lanes / workers)`` lanes within
    ``window`` seconds, it closes the extra lanes' channels (``give_up_later``,
    on the I/O thread: ``give_up``) and subscribes again after a pause, at the
    back of their lines: the broker makes the next worker active and returns
    what this one had not acked (a request it was still applying is fenced by
    its idempotency claim). Returns the lanes given away.
    """
    counted = census.count() if census is not None else None
    if counted is None:
        return []  # not counted now (reconnecting, or the queue went with its node)
    workers = max(1, counted)
    active, extra = lanes_to_give(lanes, workers, window)
    if extra:
        log.info(
            "active on %d of %d lanes with %d workers: handing lanes %s to the others",
            len(active),
            len(lanes),
            workers,
            [c.lane for c in extra],
        )
        give_up_later(extra)
    return [c.lane for c in extra]


def give_up(consumers: list) -> None:
    """Close the lanes' channels without cancelling: their unacked requests return to
    the lane before anything later (the order holds), the next worker becomes active,
    and each channel opens again after a pause (ConsumerChannels._on_channel_closed)."""
    for consumer in consumers:
        channel = consumer.channel
        if channel is not None and channel.is_open:
            consumer.yielding = True
            consumer.last_delivery = 0.0
            close_without_cancel(channel)


class LaneCensus:
    """The census channel: consuming ``dataspace.lanes.workers`` to be counted, and
    asking its consumer count (I/O thread, except ``count``)."""

    def __init__(
        self,
        queue,
        consumer_tag: Callable[[str], str],
        call_soon: Callable[[Callable[[], None]], bool],
        reopen_later: Callable[[float, Callable], None],
        still_wanted: Callable[[], bool],
        reopen_pause: float,
    ):
        self.queue = queue
        self._consumer_tag = consumer_tag
        self._call_soon = call_soon
        self._reopen_later = reopen_later
        #: whether a closed census channel is to be opened again (not stopping, and
        #: the connection still open: a new connection opens a new one)
        self._still_wanted = still_wanted
        self._reopen_pause = reopen_pause
        self._channel = None
        self._asked: list[threading.Event] = []

    def open(self, channel) -> None:
        """Be counted: consume the census queue, declared again first (it is
        transient: it goes when its node goes down, and the broker then cancels this
        consumer; the channel is opened again a second later)."""
        queue = self.queue
        channel.add_on_close_callback(self._closed)
        channel.add_on_cancel_callback(lambda _frame: channel.close())

        def consume(_frame) -> None:
            channel.basic_consume(
                queue.name,
                lambda *_delivery: None,
                auto_ack=True,
                consumer_tag=self._consumer_tag(queue.name),
            )
            self._channel = channel

        channel.queue_declare(
            queue.name, durable=queue.durable, arguments=queue.arguments, callback=consume
        )

    def _closed(self, channel, reason) -> None:
        if self._channel is channel:
            self._channel = None
            for asked in self._asked:  # unanswered: released without a count
                asked.set()
            self._asked.clear()
        if not self._still_wanted():
            return
        log.info("no longer counted among the lane workers (%s); again in a second", reason)
        self._reopen_later(self._reopen_pause, self.open)

    def count(self, timeout: float = 5.0) -> int | None:
        """The number of lane workers, asked on the census channel (a short-lived
        connection every few seconds would fill the broker's log and the management
        UI with connections); None if it cannot be had now. Any thread."""
        answer: list[int] = []
        done = threading.Event()

        def ask() -> None:
            channel = self._channel
            if channel is None or not channel.is_open:
                done.set()
                return

            def counted(frame) -> None:
                answer.append(frame.method.consumer_count)
                self._asked.remove(done)
                done.set()

            # A 404 closes the channel (declared again a second later): no answer.
            self._asked.append(done)
            channel.queue_declare(self.queue.name, passive=True, callback=counted)

        if not self._call_soon(ask) or not done.wait(timeout):
            return None
        return answer[0] if answer else None
