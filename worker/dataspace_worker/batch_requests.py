"""A batch delivery (``dataspace_core.batches``) as the requests the dispatcher
runs, and their outcomes as the one outcome the batch is settled by.

Each item runs as if it had come alone, with its own message_id as idempotency
key; a batch's items are a database batch of their own (one transaction, and
after a failure each alone: ``Consumer._handle_with_batches``). The batch is
one message to the broker, so it is settled once: acked when every item is
applied (or replayed), requeued when the store was unavailable for any of them
(the applied ones then replay), and dead-lettered when any failed for good,
as a batch of those only, with a reason naming them: a replay of it applies
only what failed, however late.
"""

from __future__ import annotations

from dataspace_core import batches
from dataspace_core.protocol import (
    BATCH_CONTENT_TYPE,
    ROUTING_PREFIX,
    ProtocolError,
    batched_operation,
    content_type,
)

from .delivery import Delivery
from .dispatch import Outcome, Request, refusal
from .logs import printable

#: failed items named in a batch's reason, at most
NAMED_FAILURES = 5


def is_batch(delivery: Delivery) -> bool:
    return delivery.routing_key.startswith(batches.BATCH_ROUTING_PREFIX)


def requests_of(delivery: Delivery, max_body: int) -> list[Request]:
    """The requests a batch carries, each routed as if published alone
    (``data.<op>``: a body naming another operation is refused as usual);
    ProtocolError when the batch itself breaks the protocol."""
    props = delivery.properties
    operation = batched_operation(delivery.routing_key)
    if operation is None:
        raise ProtocolError(
            f"routing key {printable(delivery.routing_key)} names no operation a batch may carry"
        )
    if props.content_type != BATCH_CONTENT_TYPE:
        raise ProtocolError(f"a batch's content_type must be {BATCH_CONTENT_TYPE!r}")
    if props.reply_to:
        raise ProtocolError("a batch gets no reply: it must have no reply_to")
    if len(delivery.body) > max_body:
        raise ProtocolError(f"batch of {len(delivery.body)} bytes is over the limit of {max_body}")
    key = ROUTING_PREFIX + operation
    return [
        Request(body, message_id, content_type(body), props.headers, key, props.user_id)
        for message_id, body in batches.decode(delivery.body)
    ]


def split(delivery: Delivery, requests: list[Request]) -> Outcome:
    """The outcome of a batch delivered again: not run, but published again as its
    requests one by one (``DeadLetterPublisher.publish_split``) and acked once the
    broker has them all. The worker that took it first may have died running it:
    a request that kills workers then reaches the delivery limit alone, instead of
    taking the batch's other requests to the dead-letter queue with it."""
    operation = batched_operation(delivery.routing_key) or "?"
    items = tuple((r.message_id, r.body) for r in requests)
    return Outcome(b"", "split", operation, split=items)


def refused(delivery: Delivery, error: ProtocolError) -> Outcome:
    """The outcome of a batch refused whole (it breaks the protocol)."""
    return refusal(batched_operation(delivery.routing_key) or "?", error)


def outcome_of(delivery: Delivery, requests: list[Request], outcomes: list[Outcome]) -> Outcome:
    """The batch's one outcome from its items' (see the module docstring)."""
    operation = batched_operation(delivery.routing_key) or "?"
    items, parts = len(outcomes), tuple(outcomes)
    if any(o.retry for o in outcomes):
        return Outcome(None, "unavailable", operation, parts=parts)
    failed = [(r, o) for r, o in zip(requests, outcomes, strict=True) if o.code != "ok"]
    if not failed:
        replayed = all(o.replayed for o in outcomes)
        return Outcome(b"", "ok", operation, replayed=replayed, parts=parts)
    named = "; ".join(
        f"{printable(r.message_id)}: {o.code}: {o.reason}" for r, o in failed[:NAMED_FAILURES]
    )
    more = f"; and {len(failed) - NAMED_FAILURES} more" if len(failed) > NAMED_FAILURES else ""
    first = failed[0][1]
    reason = f"{len(failed)} of the batch's {items} requests failed: {named}{more}"
    dead_body = batches.encode([(r.message_id, r.body) for r, _ in failed])
    return Outcome(first.body, first.code, operation, reason, parts=parts, dead_body=dead_body)
