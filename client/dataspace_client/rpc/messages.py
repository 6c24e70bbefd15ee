"""A request as it goes on the wire, the same for a call and a publication.

Both kinds carry the protocol version, are persistent and ``mandatory`` (a request
no queue is bound for comes back at once instead of vanishing); a call adds where
its reply goes (``reply_to``, ``correlation_id``) and how long it is waited for
(``expiration``: a request whose caller has given up is never run later).
"""

from __future__ import annotations

import pika

from dataspace_core.limits import MAX_MESSAGE_BYTES, MAX_SHORT_STRING
from dataspace_core.protocol import (
    DIRECT_REPLY_TO,
    FRAMES_HEADER,
    LANE_HEADER,
    PROTOCOL_VERSION,
    VERSION_HEADER,
    content_type,
)


def check_sendable(operation: str, body: bytes, message_id: str) -> None:
    """Refuse at once what the broker would refuse by closing the channel (and so,
    re-sent after every reopening, never get through)."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"{operation}: a request of {len(body)} bytes is over the broker's "
            f"max_message_size ({MAX_MESSAGE_BYTES} bytes)"
        )
    if len(message_id.encode("utf-8")) > MAX_SHORT_STRING:
        raise ValueError(f"{operation}: message_id is over {MAX_SHORT_STRING} bytes")


def request_headers(lane: str | None) -> dict:
    """A request's headers: the protocol version, frames read, and its lane key."""
    headers = {VERSION_HEADER: PROTOCOL_VERSION, FRAMES_HEADER: 1}
    if lane is not None:
        headers[LANE_HEADER] = lane
    return headers


def request_properties(
    *,
    app_id: str,
    operation: str,
    body: bytes,
    message_id: str,
    lane: str | None,
    timestamp: int,
    correlation_id: str | None = None,
    expires_in_ms: int | None = None,
    persistent: bool = True,
) -> pika.BasicProperties:
    """The AMQP properties of a request. With ``correlation_id`` it is a call: its
    reply comes over direct reply-to, and it expires after ``expires_in_ms`` (what
    is left of its caller's wait); without, a fire-and-forget publication.
    ``persistent`` False for a fast read: nothing to write to disk (a lost read is
    asked again)."""
    return pika.BasicProperties(
        content_type=content_type(body),
        delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
        correlation_id=correlation_id,
        message_id=message_id,
        reply_to=None if correlation_id is None else DIRECT_REPLY_TO,
        type=operation,
        app_id=app_id,
        timestamp=timestamp,
        expiration=None if expires_in_ms is None else str(expires_in_ms),
        headers=request_headers(lane),
    )
