"""Batches: several fire-and-forget requests of one operation in one message.

A producer's small writes cost the broker and the worker about as much per
message as per byte: a batch carries up to ``MAX_ITEMS`` of them in one
message, published with routing key ``batch.<op>`` (bound to the request queue
by workers that read batches; an older worker binds none, so the broker returns
a batch unroutable and the client sends its requests one by one).

Each item is a whole request body, as it would travel alone (JSON or a frame),
with its own ``message_id``: the worker applies each once, as if it had come
alone, and the batch is acknowledged when all of them are. The body:

    BATCH_MAGIC, then for each item:
        its message_id's length (1 byte), the message_id (UTF-8),
        its body's length (4 bytes, big-endian), the body

docs/protocol.md, "Batches", says the rest (limits, failures, dead letters).
"""

from __future__ import annotations

from collections.abc import Iterator

from .protocol import BATCH_MAGIC, BATCH_ROUTING_PREFIX, ProtocolError

#: the binding of the request queue that takes batches
BATCH_BINDING = "batch.#"
#: requests one batch may carry: a worker refuses more. A batch's requests run in
#: one transaction; if it fails, each runs alone: this bounds what one message
#: can cost
MAX_ITEMS = 128
#: what a client puts in one batch, at most: requests, and bytes encoded. Under a
#: worker's "large delivery" (max_bytes_in_hand / (prefetch x its consumers of all
#: queues): 410 KiB with its defaults, 157 KiB with 4 consumers and 4 lanes), which
#: would lower its prefetch to 1 for a while
CLIENT_ITEMS = MAX_ITEMS
CLIENT_BYTES = 128 * 1024
#: a request body larger than this goes alone (a large value gains nothing)
CLIENT_ITEM_BYTES = 64 * 1024


def routing_key(operation: str) -> str:
    return BATCH_ROUTING_PREFIX + operation


def item_size(message_id: str, body: bytes) -> int:
    """The bytes one item takes in a batch."""
    return 5 + len(message_id.encode("utf-8")) + len(body)


def encode(items: list[tuple[str, bytes]]) -> bytes:
    """The body of a batch of ``(message_id, body)`` items."""
    parts = [BATCH_MAGIC]
    for message_id, body in items:
        mid = message_id.encode("utf-8")
        if not 0 < len(mid) < 256:
            raise ValueError(f"message_id of {len(mid)} bytes: a batch item needs 1 to 255")
        parts += [len(mid).to_bytes(1, "big"), mid, len(body).to_bytes(4, "big"), body]
    return b"".join(parts)


def decode(body: bytes) -> list[tuple[str, bytes]]:
    """The ``(message_id, body)`` items of a batch; ProtocolError for anything
    else than ``encode`` makes, or more than ``MAX_ITEMS`` items, or none."""
    items = list(_items(body))
    if not items:
        raise ProtocolError("a batch with no request in it")
    return items


def _items(body: bytes) -> Iterator[tuple[str, bytes]]:
    if body[: len(BATCH_MAGIC)] != BATCH_MAGIC:
        raise ProtocolError("not a batch: its body does not start as one")
    view, at, count = memoryview(body), len(BATCH_MAGIC), 0
    while at < len(body):
        count += 1
        if count > MAX_ITEMS:
            raise ProtocolError(f"a batch of more than {MAX_ITEMS} requests")
        size = body[at]
        mid_end = at + 1 + size
        if size == 0 or mid_end + 4 > len(body):
            raise ProtocolError(f"batch item {count}: cut short, or an empty message_id")
        try:
            message_id = str(view[at + 1 : mid_end], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"batch item {count}: its message_id is not UTF-8") from None
        length = int.from_bytes(view[mid_end : mid_end + 4], "big")
        at = mid_end + 4 + length
        if at > len(body):
            raise ProtocolError(f"batch item {count}: its body is cut short")
        yield message_id, bytes(view[mid_end + 4 : at])
