"""What a worker's dead letter carries, and how dead letters are told in the log.

A request that failed for good (refused, poison, out of retries) is published to
``dataspace.dead`` with its original properties and why and whence in the
headers (docs/protocol.md, "Dead letters"); the pool (worker_pool.py, settle.py) publishes it
confirmed and acks the request once the broker has it. The same channel publishes
the requests of a batch delivered again one by one (``publish_split``), and the
batch is acked once the broker has them all."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika
import pika.data
import pika.spec

from dataspace_core.amqp.confirms import ConfirmTracker
from dataspace_core.delivery_headers import without_delivery_headers
from dataspace_core.protocol import (
    DEAD_AT_HEADER,
    DEAD_BODY_SHA256_HEADER,
    DEAD_BODY_SIZE_HEADER,
    DEAD_BY_HEADER,
    DEAD_CODE_HEADER,
    DEAD_EXCHANGE_HEADER,
    DEAD_HEADERS_DROPPED_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_OWN_HEADERS,
    DEAD_REASON_HEADER,
    DEAD_ROUTING_KEY_HEADER,
    EXCHANGE,
    PUBLISH_SEQ_HEADER,
    ROUTING_PREFIX,
    content_type,
)

from .delivery import APP_ID, Delivery, truncated
from .dispatch import Outcome
from .logs import Tally, printable

#: the pool's logger: dead-letter lines read as they did before this module split off
log = logging.getLogger("dataspace_worker.consumer")

#: body bytes a dead letter keeps; a longer body is kept truncated, with its size and
#: SHA-256 (setting ``dead_letter_body``)
DEAD_LETTER_BODY = 1024 * 1024
#: encoded bytes of a request's own headers a dead letter copies (at most a quarter
#: of the connection's frame_max): with the worker's own headers and the short-string
#: properties, the dead letter's header frame stays far below one frame
DEAD_LETTER_HEADERS = 8 * 1024

#: dead letters in the log: the first of a quiet spell in full, then a summary a
#: minute (a flood of bad requests is a few lines, not thousands)
DEAD_LETTERS = Tally(window=60.0)


def log_dead_letter_summary(force: bool = False) -> None:
    """Say how many requests were dead-lettered since the last full line, by code
    (run every few seconds by the worker, and once more as it stops)."""
    summary = DEAD_LETTERS.summary(force)
    if summary is not None:
        log.warning(
            "dead-lettered %d more requests since the last such line (%s); "
            "`dataspace dead list` shows them",
            *summary,
        )


def properties(
    delivery: Delivery, outcome: Outcome, budget: int = DEAD_LETTER_HEADERS
) -> pika.BasicProperties:
    """The original properties, persistent, with why and whence in the headers.

    Of the request's own headers, only those that fit in ``budget`` encoded bytes
    are copied (in their order; the names of the others are noted in
    ``x-dataspace-headers-dropped``): the dead letter's header frame must fit in
    the connection's frame_max, or the broker closes the connection. A body cut
    to ``dead_letter_body`` (``delivery.truncated``) carries its size and SHA-256."""
    original = delivery.properties
    headers, dropped = bounded_headers(original.headers, budget)
    headers.update(
        {
            DEAD_REASON_HEADER: outcome.reason[:1000],
            DEAD_CODE_HEADER: outcome.code,
            DEAD_EXCHANGE_HEADER: delivery.exchange,
            DEAD_ROUTING_KEY_HEADER: delivery.routing_key,
            DEAD_BY_HEADER: APP_ID,
            DEAD_AT_HEADER: int(time.time()),
        }
    )
    if dropped:
        headers[DEAD_HEADERS_DROPPED_HEADER] = dropped
    if delivery.body_size is not None:
        headers[DEAD_BODY_SIZE_HEADER] = delivery.body_size
        headers[DEAD_BODY_SHA256_HEADER] = delivery.body_sha256
    return pika.BasicProperties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        delivery_mode=pika.DeliveryMode.Persistent,
        correlation_id=original.correlation_id,
        message_id=original.message_id,
        reply_to=original.reply_to,
        type=original.type,
        app_id=original.app_id,
        timestamp=original.timestamp,
        headers=headers,
    )


def table_size(table: dict | None) -> int | None:
    """Encoded size of an AMQP field table, None if it cannot be encoded."""
    if not table:
        return 4
    try:
        return pika.data.encode_table([], table)
    except Exception:  # a value pika decoded but cannot encode again
        return None


def bounded_headers(original: dict | None, budget: int) -> tuple[dict, str]:
    """The request's headers that fit in ``budget`` encoded bytes, in order (the
    dead letter's own headers are never taken from it), and a note of the others."""
    kept: dict = {}
    dropped: list[str] = []
    used = 4
    for name, value in (original or {}).items():
        size = table_size({name: value})
        if name in DEAD_LETTER_OWN_HEADERS or size is None or used + size - 4 > budget:
            dropped.append(name)
            continue
        kept[name] = value
        used += size - 4
    if not dropped:
        return kept, ""
    names = ", ".join(ascii(n)[:66] for n in dropped[:20])
    more = f" and {len(dropped) - 20} more" if len(dropped) > 20 else ""
    return kept, f"{len(dropped)} header(s) not kept: {names}{more}"[:1000]


@dataclass
class Split:
    """A batch whose requests were published again one by one: settled when the
    last of their confirms is in, requeued if any was refused."""

    left: int
    refused: bool = False
    done: bool = False


@dataclass
class Settlement:
    """A request whose ack waits for the broker to confirm its dead letter (or, for
    a batch split, one of its requests published again)."""

    consumer: object  # database_thread.Consumer: its channel, and ``held`` to count it
    delivery: Delivery
    refused: bool = False
    split: Split | None = None


class DeadLetterPublisher:
    """Dead letters out on one channel in confirm mode, each request acked only once
    the broker has confirmed its dead letter, and requeued when the broker refused
    or returned it, or the channel closed first (I/O thread only).

    The pool opens the channel and decides what a closed one means (reconnect, or a
    new channel after a pause); this holds the bookkeeping: publish sequence numbers
    (also in ``PUBLISH_SEQ_HEADER``, to match a return to its request), the
    unconfirmed settlements, and ``multiple`` confirms."""

    def __init__(self, dead_letter_body: int, on_published: Callable[[], None]):
        self.dead_letter_body = dead_letter_body
        #: called after each publish (the pool reads its socket again for the confirm)
        self._on_published = on_published
        self.channel = None
        self._unconfirmed: ConfirmTracker[Settlement] = ConfirmTracker()

    def can_publish(self) -> bool:
        """Whether the channel is open (read from any thread: a hint, for whether to
        split a batch; ``publish_split`` requeues the batch if it closed since)."""
        channel = self.channel
        return channel is not None and channel.is_open

    @property
    def pending(self) -> bool:
        """Whether a dead letter awaits its confirm."""
        return bool(self._unconfirmed)

    def opened(self, channel) -> None:
        """``channel`` is the dead-letter channel from now on, in confirm mode."""
        self.channel = channel
        self._unconfirmed.restart()
        channel.add_on_return_callback(self.on_return)
        channel.confirm_delivery(ack_nack_callback=self.on_confirm)

    def closed(self, channel) -> None:
        """``channel`` closed: unconfirmed dead letters are in doubt, so their
        requests go back to the queue (handled again, dead-lettered again)."""
        if self.channel is not channel:
            return
        self.channel = None
        for settlement in self._unconfirmed.clear():
            delivery, consumer = settlement.delivery, settlement.consumer
            if settlement.split is not None:  # a split batch: requeued once
                if settlement.split.done:
                    continue
                settlement.split.done = True
            if delivery.channel is consumer.channel and delivery.channel.is_open:
                consumer.held -= 1
                delivery.channel.basic_nack(delivery.tag, requeue=True)

    def publish(self, consumer, delivery: Delivery, outcome: Outcome) -> None:
        """Publish ``delivery``'s dead letter to ``dataspace.dead``, mandatory and
        confirmed; the request's ack waits for the confirm. No channel: the request
        goes back to the queue to be tried again later."""
        channel = self.channel
        if channel is None or not channel.is_open:
            delivery.channel.basic_nack(delivery.tag, requeue=True)
            return
        if delivery.body_size is None and len(delivery.body) > self.dead_letter_body:
            delivery = truncated(delivery, self.dead_letter_body)  # not cut beforehand
        frame_max = getattr(channel.connection.params, "frame_max", 0) or 131072
        props = properties(delivery, outcome, min(DEAD_LETTER_HEADERS, frame_max // 4))
        props.headers[PUBLISH_SEQ_HEADER] = self._unconfirmed.next_tag
        # mandatory: a dead letter with no queue to go to must not be acked away
        channel.basic_publish(
            DEAD_LETTER_EXCHANGE, delivery.routing_key, delivery.body, props, mandatory=True
        )
        self._unconfirmed.add(Settlement(consumer, delivery))
        consumer.held += 1
        self._on_published()

    def publish_split(self, consumer, delivery: Delivery, outcome: Outcome) -> None:
        """Publish the requests of a batch delivered again (``outcome.split``) one by
        one, as ``data.<op>`` with their own message_ids, mandatory and confirmed;
        the batch's ack waits for the last confirm. No channel: the batch goes back
        to the queue (split at its next delivery)."""
        channel = self.channel
        if channel is None or not channel.is_open:
            delivery.channel.basic_nack(delivery.tag, requeue=True)
            return
        original = delivery.properties
        # the batch's own headers, bounded, without what the broker or a worker added
        kept, _ = bounded_headers(without_delivery_headers(original.headers), DEAD_LETTER_HEADERS)
        log.info(
            "batch %s delivered again: publishing its %d %s requests again one by one",
            printable(original.message_id),
            len(outcome.split),
            outcome.operation,
        )
        split = Split(len(outcome.split))
        for message_id, body in outcome.split:
            headers = dict(kept)
            headers[PUBLISH_SEQ_HEADER] = self._unconfirmed.next_tag
            props = pika.BasicProperties(
                content_type=content_type(body),
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message_id,
                type=outcome.operation,
                app_id=original.app_id,
                timestamp=original.timestamp,
                headers=headers,
            )
            channel.basic_publish(
                EXCHANGE, ROUTING_PREFIX + outcome.operation, body, props, mandatory=True
            )
            self._unconfirmed.add(Settlement(consumer, delivery, split=split))
        consumer.held += 1
        self._on_published()

    def on_return(self, _channel, method, props, _body) -> None:
        """A dead letter came back unroutable: requeue its request, not ack it."""
        seq = (props.headers or {}).get(PUBLISH_SEQ_HEADER)
        settlement = self._unconfirmed.get(seq)
        log.error(
            "a dead letter (or a split batch's request) came back unroutable (%s): are "
            "queues dataspace.dead and dataspace.requests bound?",
            method.reply_text,
        )
        if settlement is not None:
            settlement.refused = True

    def on_confirm(self, frame) -> None:
        """The broker's ack or nack of one dead letter, or (``multiple``) of every one
        up to it: ack their requests, or requeue them when refused or returned."""
        method = frame.method
        refused = isinstance(method, pika.spec.Basic.Nack)
        for settlement in self._unconfirmed.settle(method.delivery_tag, method.multiple):
            consumer, delivery = settlement.consumer, settlement.delivery
            split = settlement.split
            if split is not None:  # one of a split batch's requests: the last settles it
                split.left -= 1
                split.refused = split.refused or settlement.refused or refused
                if split.done or split.left > 0:
                    continue
                split.done = True
                settlement.refused = split.refused
            if delivery.channel is not consumer.channel or not delivery.channel.is_open:
                continue  # requeued when its channel closed
            consumer.held -= 1
            if settlement.refused or refused:
                log.warning(
                    "broker refused a dead letter (or a split batch's request); "
                    "requeueing its request"
                )
                delivery.channel.basic_nack(delivery.tag, requeue=True)
            else:
                delivery.channel.basic_ack(delivery.tag)
        channel = self.channel
        if refused and channel is not None and channel.is_open:
            # On RabbitMQ 3.10 a channel opened while the dead-letter queue had no
            # leader refuses every publish for good: use a new one.
            log.warning("dead-letter channel refused a publish; opening a new one")
            channel.close()
