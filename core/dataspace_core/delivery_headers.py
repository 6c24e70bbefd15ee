"""Headers the broker adds to a message on its way: what a message published
again (a dead letter replayed, a batch's requests after a redelivery) must not
carry over. RabbitMQ sets ``x-death`` and ``x-first-death-*``/``x-last-death-*``
when it dead-letters a message, and a quorum queue ``x-delivery-count`` when it
delivers one again: copied, they would describe a message that no longer exists."""

from __future__ import annotations

BROKER_DELIVERY_HEADERS = frozenset({"x-death", "x-delivery-count"})
BROKER_DELIVERY_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


def without_delivery_headers(headers: dict | None, also: frozenset = frozenset()) -> dict:
    """``headers`` less those the broker added on a dead-lettering or a redelivery
    (and the names in ``also``): what a message published again carries."""
    return {
        name: value
        for name, value in (headers or {}).items()
        if name not in BROKER_DELIVERY_HEADERS
        and name not in also
        and not name.startswith(BROKER_DELIVERY_HEADER_PREFIXES)
    }
