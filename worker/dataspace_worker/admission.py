"""What a client wrote into a request, checked before anything uses it.

Every field of a request message is written by a client, and a client account
may mean harm. The broker vouches for two things only: the routing key passed
the account's topic permissions, and ``user_id``, when set, is the account that
published. So the routing key, not the body, decides the operation (a body
naming another one is refused), and identifiers that end up in SQL, logs and
the operator's terminal are checked to be short printable text first.

Checks that depend on an operation's decoded arguments (whatever the body's
encoding, JSON or frame) are ``ArgumentCheck``s, run by the dispatcher after
decoding; the reaper's minimum retention is one (reaper.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dataspace_core import protocol
from dataspace_core.limits import MAX_SHORT_STRING
from dataspace_core.protocol import ProtocolError

#: longest accepted message_id / correlation_id (AMQP short strings: 255 bytes)
MAX_ID_LENGTH = MAX_SHORT_STRING

#: (operation, decoded arguments) -> None, or ProtocolError
ArgumentCheck = Callable[[str, dict[str, Any]], None]


def identifier(name: str, value: Any) -> str | None:
    """``value`` if it is absent or short printable text; else ProtocolError.

    pika hands over a short string that is not valid UTF-8 as bytes: such an id
    would reach SQL as ``bytea`` and a terminal as raw bytes.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be text, got {type(value).__name__}")
    if not value or len(value.encode("utf-8")) > MAX_ID_LENGTH:
        raise ProtocolError(f"{name} must be 1 to {MAX_ID_LENGTH} bytes long")
    if not value.isprintable():
        raise ProtocolError(f"{name} holds control characters")
    return value


def operation_of(routing_key: str | None, named: str) -> None:
    """Refuse a request whose body names another operation than its routing key.

    ``routing_key`` None means the request did not come through the broker (a
    direct call in process): nothing to compare with.
    """
    if routing_key is None:
        return
    routed = protocol.operation_named_by(routing_key)
    if routed is None:
        raise ProtocolError(
            f"routing key {routing_key!r:.80} names no operation "
            "(expected data.<operation>, lane.<operation>, read.<operation>, batch.<operation> "
            "or admin.reap)"
        )
    if routed != named:
        raise ProtocolError(
            f"the routing key names {routed!r} but the body {named!r}: "
            "the routing key decides the operation"
        )
