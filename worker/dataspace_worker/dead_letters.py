"""What a worker's dead letter carries, and how dead letters are told in the log.

A request that failed for good (refused, poison, out of retries) is published to
``dataspace.dead`` with its original properties and why and whence in the
headers (docs/protocol.md, "Dead letters"); the pool (consumer.py) publishes it
confirmed and acks the request once the broker has it."""

from __future__ import annotations

import logging
import time

import pika
import pika.data

from dataspace_core.protocol import (
    DEAD_AT_HEADER,
    DEAD_BODY_SHA256_HEADER,
    DEAD_BODY_SIZE_HEADER,
    DEAD_BY_HEADER,
    DEAD_CODE_HEADER,
    DEAD_EXCHANGE_HEADER,
    DEAD_HEADERS_DROPPED_HEADER,
    DEAD_REASON_HEADER,
    DEAD_ROUTING_KEY_HEADER,
    PUBLISH_SEQ_HEADER,
)

from .delivery import APP_ID, Delivery
from .dispatch import Outcome
from .logs import Tally

#: the pool's logger: dead-letter lines read as they did before this module split off
log = logging.getLogger("dataspace_worker.consumer")

#: body bytes a dead letter keeps; a longer body is kept truncated, with its size and
#: SHA-256 (setting ``dead_letter_body``)
DEAD_LETTER_BODY = 1024 * 1024
#: encoded bytes of a request's own headers a dead letter copies (at most a quarter
#: of the connection's frame_max): with the worker's own headers and the short-string
#: properties, the dead letter's header frame stays far below one frame
DEAD_LETTER_HEADERS = 8 * 1024
#: the headers a dead letter's own information travels in (never copied from the request)
DEAD_LETTER_OWN = frozenset(
    {
        DEAD_REASON_HEADER,
        DEAD_CODE_HEADER,
        DEAD_EXCHANGE_HEADER,
        DEAD_ROUTING_KEY_HEADER,
        DEAD_BY_HEADER,
        DEAD_AT_HEADER,
        DEAD_BODY_SIZE_HEADER,
        DEAD_BODY_SHA256_HEADER,
        DEAD_HEADERS_DROPPED_HEADER,
        PUBLISH_SEQ_HEADER,
    }
)

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
        if name in DEAD_LETTER_OWN or size is None or used + size - 4 > budget:
            dropped.append(name)
            continue
        kept[name] = value
        used += size - 4
    if not dropped:
        return kept, ""
    names = ", ".join(ascii(n)[:66] for n in dropped[:20])
    more = f" and {len(dropped) - 20} more" if len(dropped) > 20 else ""
    return kept, f"{len(dropped)} header(s) not kept: {names}{more}"[:1000]
