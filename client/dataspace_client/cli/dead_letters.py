"""How the ``dead`` commands look at dataspace.dead: each dead letter as an entry
(``_dead_entry``), the filters, and ``_DeadLetters``.

The ``dead`` commands work over AMQP. Each looks at every dead letter (the first
65535: basic.qos counts in 16 bits) through one consumer whose prefetch window
holds them all, unacknowledged, and gives back those it keeps by cancelling it.
Measured on RabbitMQ 3.10.8 (``tests/test_dead_tools.py``), a quorum queue
delivers the messages given back before those never delivered, in the order they
were given back: a cancelled or closed consumer's (or a killed process's) in
their order, so a look at the whole queue leaves it as it was, while a look at
its first N after an earlier look at more moves those N behind the rest. A
basic.nack or basic.reject with requeue moved the message behind the others too,
and messages held by basic.get (what the management API's "Get messages" does)
came back in no particular order once more than a few were held. Whichever way,
every message looked at comes back marked redelivered, its ``x-delivery-count``
raised by one: only ``rabbitmq-queues peek`` on a broker node reads without
that. A message is removed (acked) only once it was matched (``purge``,
``drop``) or its copy was confirmed (``replay``); if the command dies half-way,
the broker gives the rest back, in order.
"""

from __future__ import annotations

import time

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker

from dataspace_core import batches
from dataspace_core.errors import DataSpaceConfigurationError
from dataspace_core.protocol import (
    BATCH_CONTENT_TYPE,
    DEAD_AT_HEADER,
    DEAD_BY_HEADER,
    DEAD_CODE_HEADER,
    DEAD_LETTER_QUEUE,
    DEAD_REASON_HEADER,
    DEAD_ROUTING_KEY_HEADER,
    ProtocolError,
)
from dataspace_core.urls import mask_password

from .broker import _close, _connect, _vhost
from .output import _iso, _safe, _text

PREVIEW_CHARS = 72
#: basic.qos prefetch_count is 16 bits: the most dead letters one consumer can hold
MAX_WINDOW = 65535
#: seconds without a delivery after which the dead letters asked for are not coming
LOOK_IDLE = 2.0
#: seconds to wait, when stopping, for deliveries the broker may still be sending
DRAIN_IDLE = 0.3


def _first_death(headers: dict) -> dict:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _original_routing_key(headers: dict) -> str | None:
    key = _text(headers.get(DEAD_ROUTING_KEY_HEADER))
    if key:
        return key
    keys = _first_death(headers).get("routing-keys")
    if isinstance(keys, list) and keys:
        return _text(keys[0]) or None
    return None


def _preview(body: bytes) -> str:
    """The start of a body on one line: as text when it is UTF-8, else a bytes literal."""
    head = body[: 4 * PREVIEW_CHARS]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        cut_in_a_character = len(body) > len(head) and exc.start >= len(head) - 3
        text = head[: exc.start].decode("utf-8") if cut_in_a_character else repr(head)
    text = _safe(" ".join(text.split()))
    if len(text) > PREVIEW_CHARS or len(body) > len(head):
        return text[:PREVIEW_CHARS] + "..."
    return text


def _batch_requests(content_type, body: bytes) -> list[str]:
    """The message_ids in a batch of fire-and-forget requests (batches.py), or []."""
    if content_type != BATCH_CONTENT_TYPE:
        return []
    try:
        return [message_id for message_id, _ in batches.decode(body)]
    except ProtocolError:
        return []


def _batch_preview(requests: list[str]) -> str:
    shown = ", ".join(requests[:3]) + (", ..." if len(requests) > 3 else "")
    return f"a batch of {len(requests)} requests: {shown}"


def _dead_entry(method, props, body: bytes) -> dict:
    headers = props.headers or {}
    death = _first_death(headers)
    routing_key = _original_routing_key(headers) or method.routing_key
    reason = _text(headers.get(DEAD_REASON_HEADER))
    by = _text(headers.get(DEAD_BY_HEADER))
    when = headers.get(DEAD_AT_HEADER)
    code = _text(headers.get(DEAD_CODE_HEADER))
    if reason is None and death:
        reason = _text(death.get("reason"))
        if death.get("queue"):
            reason = f"{reason} (queue {_text(death['queue'])}, count {death.get('count')})"
        by = "broker"
        when = death.get("time")
    if code is None and death:
        code = f"x-death:{_text(death.get('reason'))}"
    requests = _batch_requests(props.content_type, body)
    return {
        "message_id": props.message_id,
        "operation": props.type or routing_key,
        "type": props.type,
        "routing_key": routing_key,
        "code": code,
        "reason": reason,
        "dead_lettered_by": by,
        "time": _iso(when if when is not None else props.timestamp),
        "size": len(body),
        "content_type": props.content_type,
        "app_id": props.app_id,
        "preview": _batch_preview(requests) if requests else _preview(body),
        #: a batch's: the message_ids of the requests it holds (its failed ones)
        "requests": requests,
        "redelivered": bool(method.redelivered),
        "delivery_count": headers.get("x-delivery-count"),
    }


def _filtering(args) -> bool:
    return any(getattr(args, name, None) for name in ("message_id", "code", "operation", "reason"))


def _selected(entry: dict, args) -> bool:
    """Whether a dead letter matches every filter given (any of each one's values)."""
    if args.message_id and not {entry["message_id"], *entry["requests"]} & set(args.message_id):
        return False
    if args.code:
        code = entry["code"] or ""
        if code not in args.code and code.removeprefix("x-death:") not in args.code:
            return False
    if args.operation:
        key = entry["routing_key"] or ""
        names = {entry["type"], key, key.rpartition(".")[2]}
        if not names & set(args.operation):
            return False
    if args.reason:
        reason = (entry["reason"] or "").casefold()
        if not any(part.casefold() in reason for part in args.reason):
            return False
    return True


def _described(args) -> str:
    """The filters given, for a question or a summary."""
    parts = [
        f"{flag} {' or '.join(repr(v) for v in values)}"
        for flag, values in (
            ("message_id", args.message_id),
            ("code", args.code),
            ("operation", args.operation),
            ("reason holding", args.reason),
        )
        if values
    ]
    return " and ".join(parts)


def _dead_connection(args, purpose: str) -> tuple[pika.BlockingConnection, int]:
    """A connection, and how many dead letters wait (asked of the queue now)."""
    connection, _ = _connect(args, f"dead {purpose}")
    try:
        channel = connection.channel()
        present = channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count
        channel.close()
    except ChannelClosedByBroker as exc:
        _close(connection)
        if exc.reply_code == 404:
            raise DataSpaceConfigurationError(
                f"no queue {DEAD_LETTER_QUEUE} in vhost {_vhost(args)!r} at "
                f"{mask_password(args.url)} (check the vhost in the URL, or start a "
                "dataspace-worker there: it declares the topology)"
            ) from None
        raise DataSpaceConfigurationError(
            f"the broker refused to show {DEAD_LETTER_QUEUE}: {exc.reply_code} "
            f"{exc.reply_text} (this account needs read permission on it)"
        ) from None
    except BaseException:
        _close(connection)
        raise
    return connection, present


class _DeadLetters:
    """Every dead letter there (the first ``MAX_WINDOW``), in queue order, through one
    consumer whose prefetch window holds them all, unacknowledged.

    Why all of them, through a consumer (measured on RabbitMQ 3.10.8, module
    docstring): a quorum queue delivers what was given back before what was never
    delivered, in the order it was given back, and a consumer gives back what it
    holds in its order; so a look at the whole queue leaves it as it was, where a
    look at a part of it could move that part behind the rest. pika rejects (which
    moves a message behind the others) whatever it received and did not hand over
    when a consumer is cancelled, so before cancelling, ``close`` takes every
    delivery the broker may still send: one more for each ack made while looking.
    The queue takes back what a closed channel held a moment after the close: ``close``
    waits for that (briefly), so that the next command finds them all there.
    """

    def __init__(self, connection, present: int):
        self.connection = connection
        self.channel = connection.channel()
        self.count = present
        self.window = max(1, min(present, MAX_WINDOW))
        self.delivered = 0
        self.acked = 0
        self.channel.basic_qos(prefetch_count=self.window)

    def __iter__(self):
        seen = 0
        if self.count < 1:
            return
        for method, props, body in self.channel.consume(
            DEAD_LETTER_QUEUE, inactivity_timeout=LOOK_IDLE
        ):
            if method is None:  # fewer there than counted (gone meanwhile), or a full window
                return
            self.delivered += 1
            seen += 1
            yield method, props, body
            if seen >= self.count:
                return

    def ack(self, tag: int) -> None:
        self.channel.basic_ack(tag)
        self.acked += 1

    def close(self, remove: list[int] = ()) -> None:
        """Stop looking, remove (ack) ``remove``, give every other one back in order.
        On an error the connection's end gives them back the same way."""
        if not self.channel.is_open:
            return
        try:
            if self.delivered and self.delivered - self.acked < self.window:
                for method, _props, _body in self.channel.consume(
                    DEAD_LETTER_QUEUE, inactivity_timeout=DRAIN_IDLE
                ):
                    if method is None:
                        break
                    self.delivered += 1
                    if self.delivered - self.acked >= self.window:
                        break
            if self.count >= 1:  # a consumer was started
                self.channel.cancel()
            for tag in remove:
                self.ack(tag)
            self.channel.close()
            if self.delivered > self.acked:
                _wait_for_ready(self.connection, self.count - self.acked)
        except AMQPError:
            pass  # the connection went: the broker gives back what was not acked


def _wait_for_ready(connection, expected: int, timeout: float = 3.0) -> None:
    """Until dataspace.dead has ``expected`` messages ready again (or ``timeout``)."""
    channel = connection.channel()
    deadline = time.monotonic() + timeout
    while channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count < expected:
        if time.monotonic() > deadline:
            break
        connection.sleep(0.05)
    channel.close()


def _looked_at(seen: int, present: int) -> str:
    """What a summary adds when not every dead letter could be looked at."""
    if seen >= present:
        return ""
    return f" (looked at the first {seen} of {present}: at most {MAX_WINDOW} at a time)"
