"""Exactly-once effect for write requests: the request log, keyed by message_id.

A write request is applied in one transaction that first claims its message_id
(``claim``), then writes, then stores its reply (``record``). A second delivery
of the same request (redelivery after a crash, a client re-sending after a
timeout) finds the claim and gets the stored reply: nothing is written twice.
Two deliveries running at once serialize on the claim's unique index: the second
waits until the first commits (and then replays its reply) or rolls back (and
then applies the request itself).
"""

from __future__ import annotations

import psycopg2

from dataspace_client.protocol import ProtocolError

CLAIM = """
INSERT INTO dataspace_request (message_id, operation) VALUES (%s, %s)
ON CONFLICT (message_id) DO NOTHING
RETURNING 1
"""
STORED_REPLY = "SELECT operation, reply FROM dataspace_request WHERE message_id = %s"
RECORD = "UPDATE dataspace_request SET reply = %s WHERE message_id = %s"
# Bounded batches: one sweep never holds a long lock or a long transaction.
SWEEP = """
DELETE FROM dataspace_request WHERE message_id IN (
    SELECT message_id FROM dataspace_request
    WHERE applied_at < now() - make_interval(secs => %s)
    LIMIT %s
)
"""

#: longest accepted message_id (AMQP short strings are at most 255 bytes)
MAX_ID_LENGTH = 255


class ReusedMessageId(ProtocolError):
    """A message_id already used by a request of another operation."""


def claim(cur, message_id: str, operation: str) -> bytes | None:
    """Claim ``message_id``; None if it is ours, else the reply stored by the first claim.

    A message_id seen with another operation is a client bug (ids must be unique
    per request): refused, rather than answered with a reply of the wrong shape.
    """
    cur.execute(CLAIM, (message_id, operation))
    if cur.fetchone() is not None:
        return None
    cur.execute(STORED_REPLY, (message_id,))
    first_operation, reply = cur.fetchone()
    if first_operation != operation:
        raise ReusedMessageId(
            f"message_id {message_id!r:.80} was already used by a {first_operation} request"
        )
    return bytes(reply)


def record(cur, message_id: str, reply: bytes) -> None:
    cur.execute(RECORD, (psycopg2.Binary(reply), message_id))


def sweep(cur, older_than_seconds: float, limit: int = 10_000) -> int:
    """Delete up to ``limit`` records older than ``older_than_seconds``; return how many."""
    cur.execute(SWEEP, (older_than_seconds, limit))
    return cur.rowcount
