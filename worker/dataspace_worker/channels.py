"""The pool's channels on its connection: the dead-letter channel, one channel per
consumer, and what happens when one opens, subscribes, is cancelled or closes.

Everything here runs on the pool's I/O thread. The pool's connection
(pool_connection.py) calls ``open`` when one opens; this opens the dead-letter channel
first (confirm mode), then the census channel and every consumer's channel, and
subscribes each as the intake allows (intake.py). A channel the broker closes
makes the pool reconnect; a lane's channel closed on purpose (handed to another
worker, or given back to retry a request) opens again after a pause."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from pika.exceptions import ChannelClosedByBroker

from dataspace_core.protocol import READS_QUEUE

from . import metrics
from .database_thread import Consumer
from .dead_letters import DeadLetterPublisher
from .delivery import Delivery
from .intake import Intake
from .lanes import LaneCensus, give_up

#: the pool's logger: the lines read as they did before this module split off
log = logging.getLogger("dataspace_worker.consumer")
#: seconds before a channel closed on purpose is opened again (a lane handed to
#: another worker, a dead-letter channel that refused a publish)
CHANNEL_REOPEN_PAUSE = 1.0
#: ... and a lane channel given back because a request of it must be retried
RETRY_REOPEN_PAUSE = 0.2


class ConsumerChannels:
    """Opens, subscribes, cancels and reopens the pool's channels (I/O thread)."""

    def __init__(
        self,
        consumers: list[Consumer],
        request_queue: str,
        *,
        intake: Intake,
        dead_letters: DeadLetterPublisher,
        give_back: Callable[[object], None],
        consumer_tag: Callable[[str], str],
        connection: Callable[[], object],
        reconnect: Callable[[str], None],
        stopping: threading.Event,
        consuming: threading.Event,
        masked_url: str,
        prefetch: int,
    ):
        """``give_back`` closes a lane's channel without a cancel
        (``Settler.give_back``); ``connection`` is the pool's connection now (or
        None); ``reconnect(reason)`` starts over; ``consuming`` is set once every
        consumer's subscription is confirmed; ``masked_url`` and ``prefetch`` are
        for the line that says so."""
        self.consumers = consumers
        self.lanes = [c for c in consumers if c.lane is not None]
        self.request_queue = request_queue
        #: the census channel's keeper, when there are lanes (set by the pool)
        self.census: LaneCensus | None = None
        #: fast reads run on the I/O thread, when the pool has them (inline_reads.py)
        self.inline = None
        self._intake = intake
        self._dead_letters = dead_letters
        self._give_back = give_back
        self._consumer_tag = consumer_tag
        self._connection = connection
        self._reconnect = reconnect
        self._stopping = stopping
        self._consuming = consuming
        self._masked_url = masked_url
        self._prefetch = prefetch

    # -- opening ------------------------------------------------------------------
    def open(self, connection) -> None:
        """A new connection: the dead-letter channel first, then the others."""
        connection.channel(on_open_callback=self._on_dead_channel_open)

    def _on_dead_channel_open(self, channel, with_consumers: bool = True) -> None:
        """The dead-letter channel first, then (on a new connection) the consumers'."""
        channel.add_on_close_callback(self._on_dead_channel_closed)
        self._dead_letters.opened(channel)
        if not with_consumers:
            return
        if self.census is not None:
            channel.connection.channel(on_open_callback=self.census.open)
        for consumer in self.consumers:
            channel.connection.channel(on_open_callback=partial(self._on_channel_open, consumer))

    def _on_dead_channel_closed(self, channel, reason) -> None:
        """Unconfirmed dead letters are in doubt: their requests go back to the queue.
        Closed by the broker: start over; closed here after a refusal: a new channel
        after a pause."""
        self._dead_letters.closed(channel)
        if self._stopping.is_set():
            return
        if isinstance(reason, ChannelClosedByBroker):
            self._reconnect(f"dead-letter channel closed by the broker: {reason}")
            return
        self.reopen_later(
            CHANNEL_REOPEN_PAUSE, partial(self._on_dead_channel_open, with_consumers=False)
        )

    def census_wanted(self) -> bool:
        """A closed census channel is opened again unless stopping or the connection
        is gone (a new connection opens a new one)."""
        connection = self._connection()
        return not self._stopping.is_set() and connection is not None and connection.is_open

    def reopen_later(self, pause: float, on_open) -> None:
        """Open a channel (``on_open`` gets it) after ``pause`` seconds, on this
        connection if it is still the pool's and open, and the pool not stopping."""
        connection = self._connection()
        if connection is None or not connection.is_open:
            return

        def reopen():
            if connection is self._connection() and connection.is_open:
                if not self._stopping.is_set():
                    connection.channel(on_open_callback=on_open)

        connection.ioloop.call_later(pause, reopen)

    def _on_channel_open(self, consumer: Consumer, channel) -> None:
        consumer.channel = channel
        consumer.held = 0
        consumer.given_back = None  # a new channel: nothing of it was given back
        channel.add_on_close_callback(partial(self._on_channel_closed, consumer))
        channel.add_on_cancel_callback(partial(self._on_cancelled, consumer))
        self._intake.track(channel)
        if self._shared(consumer):  # subscribed as the bytes in hand allow
            self._intake.watch_headers(channel)
            consumer.consumer_tag = None
            if self._stopping.is_set():
                consumer.inbox.put(None)
            self.resubscribe()
            return
        channel.basic_qos(
            prefetch_count=consumer.prefetch,
            callback=lambda _frame: self._consume(consumer, channel),
        )

    # -- subscribing -----------------------------------------------------------------
    def _shared(self, consumer: Consumer) -> bool:
        """A consumer of the request queue or of the fast read queue (not a lane, not
        the reaper): subscribed as the bytes in hand allow."""
        return consumer.lane is None and consumer.queue_name in (self.request_queue, READS_QUEUE)

    def resubscribe(self) -> None:
        """Subscribe each request queue consumer as ``Intake.wanted_prefetch`` says.

        RabbitMQ applies a channel's basic.qos to consumers subscribed after it only,
        so a consumer is cancelled and subscribed again with the new prefetch; what it
        holds is run and settled as usual. Lanes and the reaper are left alone: each
        is a single active consumer, and a cancel would hand it to another worker
        while this one still holds its earlier requests (their order would not hold);
        they stay bounded by their prefetch count."""
        if self._stopping.is_set():
            return
        for consumer in self.consumers:
            channel = consumer.channel
            if not self._shared(consumer) or channel is None or not channel.is_open:
                continue
            wanted = self._intake.wanted_prefetch(consumer.prefetch)
            tag = consumer.consumer_tag
            if tag is not None and consumer.granted == wanted:
                continue
            if tag is not None:
                consumer.consumer_tag = None
                channel.basic_cancel(tag, callback=lambda _frame: None)
                # pika rejects (requeues) what arrives between a cancel and its
                # cancel-ok; those are taken as usual instead (no redelivery, no
                # delivery count spent); pika forgets the consumer at the cancel-ok
                channel._cancelled.discard(tag)
            if wanted is not None:
                consumer.granted = wanted
                channel.basic_qos(prefetch_count=wanted)  # pika sends it, then the consume
                self._consume(consumer, channel)

    def _consume(self, consumer: Consumer, channel) -> None:
        if self._stopping.is_set():
            consumer.inbox.put(None)
            return
        if consumer.consumer_tag is not None or channel is not consumer.channel:
            return  # consuming already (resumed while its qos was on the way), or closed
        if self._intake.paused and self._shared(consumer):
            return  # over max_bytes_in_hand: Intake.released subscribes it again
        consumer.consumer_tag = tag = channel.basic_consume(
            consumer.queue_name,
            partial(self._on_message, consumer),
            consumer_tag=self._consumer_tag(consumer.queue_name),
            callback=lambda _frame: self._on_consuming(consumer, tag),
        )

    def _on_consuming(self, consumer: Consumer, tag: str) -> None:
        """A consume-ok: the pool is consuming once every consumer's subscription is
        confirmed (a tag is known before its consume-ok: a second worker started on
        that signal could otherwise become the single active consumer of a lane)."""
        consumer.confirmed_tag = tag
        if all(
            c.consumer_tag and c.confirmed_tag == c.consumer_tag and c.channel and c.channel.is_open
            for c in self.consumers
        ):
            if not self._consuming.is_set():
                requests = self.request_queue
                served = [c for c in self.consumers if c.queue_name == requests]
                others = sorted({c.queue_name for c in self.consumers} - {requests})
                log.info(
                    "consuming '%s' on %s with %d consumers, prefetch %d%s",
                    requests,
                    self._masked_url,
                    len(served),
                    self._prefetch,
                    "".join(f"; and '{q}'" for q in others),
                )
            self._consuming.set()

    def _on_message(self, consumer: Consumer, channel, method, properties, body) -> None:
        consumer.last_delivery = time.monotonic()
        if method.redelivered:
            metrics.REDELIVERED.inc()
        # a request delivered again may be what killed a worker: taken one at a time
        again = method.redelivered and consumer.queue_name == self.request_queue
        self._intake.took(channel, method.delivery_tag, len(body), bool(again))
        delivery = Delivery(
            channel,
            method.delivery_tag,
            method.exchange,
            method.routing_key,
            properties,
            body,
            bool(method.redelivered),
        )
        if not (consumer.inline and self.inline.try_run(consumer, delivery)):
            consumer.inbox.put(delivery)

    # -- closing -------------------------------------------------------------------
    def _on_cancelled(self, consumer: Consumer, _frame) -> None:
        """The broker cancelled a consumer (its queue was deleted, say)."""
        if not self._stopping.is_set():
            self._reconnect(f"the broker cancelled consumer {consumer.index}")

    def _on_channel_closed(self, consumer: Consumer, channel, reason) -> None:
        self._intake.channel_closed(channel)
        if consumer.channel is channel:
            consumer.channel = None
            consumer.consumer_tag = None
            consumer.held = 0
        if self._stopping.is_set():
            consumer.inbox.put(None)
            return
        if consumer.yielding:  # closed on purpose: back in the lane's line after a pause
            consumer.yielding = False
            pause = CHANNEL_REOPEN_PAUSE if consumer.given_back is None else RETRY_REOPEN_PAUSE
            self.reopen_later(pause, partial(self._on_channel_open, consumer))
            return
        if isinstance(reason, ChannelClosedByBroker):
            self._reconnect(f"consumer {consumer.index} channel closed by the broker: {reason}")

    def cancel_consumers(self) -> None:
        """Stopping: cancel every subscription; each database thread stops once it
        has run what its channel delivered before the cancel-ok."""
        self._intake.resume_reads()  # the cancel-oks and the close handshake need reading
        for consumer in self.consumers:
            if consumer.lane is not None:
                # A lane is not cancelled (the next worker would get its later
                # requests before those held here): it finishes the batch in hand,
                # then its channel is closed outright (close_lanes).
                consumer.stop_now = True
                consumer.inbox.put(None)
                continue
            channel, tag = consumer.channel, consumer.consumer_tag
            if channel is not None and channel.is_open and tag:
                channel.basic_cancel(tag, callback=lambda _f, c=consumer: c.inbox.put(None))
            else:
                consumer.inbox.put(None)

    def close_lanes(self) -> None:
        """Stopping: every lane's unacked window goes back to its lane, in order."""
        for consumer in self.lanes:
            channel = consumer.channel
            if channel is not None and channel.is_open:
                self._give_back(channel)

    def give_up_lanes(self, consumers: list[Consumer]) -> None:
        """Hand these lanes to other workers (``WorkerPool.rebalance``)."""
        self._intake.resume_reads()  # the channels' close-oks must be read
        give_up(consumers)
