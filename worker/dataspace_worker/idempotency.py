"""Exactly-once effect for write requests: the request log, keyed by message_id.

A write request is applied in one transaction that first claims its message_id
(``claim``), then writes, then stores its reply (``record``). A write whose
reply is known before it runs (one that returns nothing: its reply is "ok")
stores that reply with its claim, and needs no ``record``. A second delivery
of the same request (redelivery after a crash, a client re-sending after a
timeout) finds the claim and gets the stored reply: nothing is written twice.
Two deliveries running at once serialize on the claim's unique index: the second
waits until the first commits (and then replays its reply) or rolls back (and
then applies the request itself).

``apply_one`` and ``apply_many`` run requests this way inside the transaction
``PostgresDataSource.execute_many`` opened: each claimed, run (its body from
``queries.BODIES``) and its reply recorded. A batch takes as few statements as it
can: one claim for all, consecutive inserts as one, one record for the replies
not known in advance. Small inserts, the common write, take one statement for
claims and rows together, outside a transaction (``apply_claimed_inserts``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2

from dataspace_core.protocol import ProtocolError

from . import queries

CLAIM = """
INSERT INTO dataspace_request (message_id, operation, reply) VALUES (%s, %s, %s)
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


class ReusedMessageId(ProtocolError):
    """A message_id already used by a request of another operation."""


def claim(cur, message_id: str, operation: str, reply: bytes | None = None) -> bytes | None:
    """Claim ``message_id``; None if it is ours, else the reply stored by the first claim.

    ``reply``, when the request's reply is known already, is stored with the claim.

    A message_id seen with another operation is a client bug (ids must be unique
    per request): refused, rather than answered with a reply of the wrong shape.
    """
    cur.execute(CLAIM, (message_id, operation, _binary(reply)))
    if cur.fetchone() is not None:
        return None
    cur.execute(STORED_REPLY, (message_id,))
    first_operation, reply = cur.fetchone()
    if first_operation != operation:
        raise ReusedMessageId(
            f"message_id {message_id!r:.80} was already used by a {first_operation} request"
        )
    return bytes(reply)


CLAIM_MANY = """
INSERT INTO dataspace_request (message_id, operation, reply)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[])
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id
"""
STORED_REPLIES = (
    "SELECT message_id, operation, reply FROM dataspace_request WHERE message_id = ANY(%s)"
)
RECORD_MANY = """
UPDATE dataspace_request r SET reply = v.reply
FROM unnest(%s::text[], %s::bytea[]) AS v (message_id, reply)
WHERE r.message_id = v.message_id
"""


def claim_many(cur, claims: list[tuple[str, str, bytes | None]]) -> dict[str, bytes]:
    """``claim`` for many ``(message_id, operation, reply)`` in one statement (ids distinct).

    Returns the stored replies of the ids claimed before; the rest are ours now.
    """
    if not claims:
        return {}
    cur.execute(
        CLAIM_MANY,
        ([c[0] for c in claims], [c[1] for c in claims], [_binary(c[2]) for c in claims]),
    )
    ours = {row[0] for row in cur.fetchall()}
    return stored_replies(
        cur,
        {message_id: operation for message_id, operation, _ in claims if message_id not in ours},
    )


def stored_replies(cur, seen: dict[str, str]) -> dict[str, bytes]:
    """The replies stored for message_ids claimed before (``{message_id: operation}``
    as the new request has it); a reused id of another operation is refused."""
    if not seen:
        return {}
    cur.execute(STORED_REPLIES, (list(seen),))
    stored = {}
    for message_id, first_operation, reply in cur.fetchall():
        if first_operation != seen[message_id]:
            raise ReusedMessageId(
                f"message_id {message_id!r:.80} was already used by a {first_operation} request"
            )
        stored[message_id] = bytes(reply)
    return stored


def record_many(cur, replies: list[tuple[str, bytes]]) -> None:
    """``record`` for many ``(message_id, reply)`` pairs in one statement."""
    if replies:
        cur.execute(
            RECORD_MANY, ([r[0] for r in replies], [psycopg2.Binary(r[1]) for r in replies])
        )


def _binary(reply: bytes | None):
    return None if reply is None else psycopg2.Binary(reply)


def record(cur, message_id: str, reply: bytes) -> None:
    cur.execute(RECORD, (psycopg2.Binary(reply), message_id))


def sweep(cur, older_than_seconds: float, limit: int = 10_000) -> int:
    """Delete up to ``limit`` records older than ``older_than_seconds``; return how many."""
    cur.execute(SWEEP, (older_than_seconds, limit))
    return cur.rowcount


# -- applying requests at most once ------------------------------------------------
#: an operation's result -> its reply body
Encode = Callable[[Any], bytes]


@dataclass(frozen=True)
class Prepared:
    """One request, checked and ready to run."""

    operation: str
    #: ``queries.BODIES[operation]``: (cursor, checked) -> result
    body: Callable[[Any, dict], Any]
    #: the arguments, checked and normalized
    checked: dict
    encode: Encode
    #: the idempotency key (the request's message_id), None for a read
    request_id: str | None

    def known_reply(self) -> bytes | None:
        """The reply of an operation that returns nothing, known before it runs."""
        return self.encode(None) if self.operation in queries.RETURN_NOTHING else None


def apply_one(cur, request: Prepared) -> tuple[bytes, bool]:
    """One request inside the caller's transaction: ``(reply, replayed)``."""
    known = request.known_reply()
    if request.request_id is not None:
        stored = claim(cur, request.request_id, request.operation, known)
        if stored is not None:
            return stored, True
    result = request.body(cur, request.checked)
    if known is not None:
        return known, False
    reply = request.encode(result)
    if request.request_id is not None:
        record(cur, request.request_id, reply)
    return reply, False


def claims_in_one_statement(requests: list[Prepared]) -> bool:
    """Whether ``apply_claimed_inserts`` can run these: small inserts, each with
    its message_id (the worker's common write, one request or a batch of them)."""
    return all(
        r.operation == "insert" and r.request_id is not None and queries.inline_value(r.checked)
        for r in requests
    )


def apply_claimed_inserts(cur, requests: list[Prepared]) -> list[tuple[bytes, bool]]:
    """Small inserts and their claims in one statement, run outside a transaction
    (``queries.insert_claimed``): ``(reply, replayed)`` for each, in order.

    The statement is atomic by itself, so each insert still commits with its
    claim. What differs from ``apply_many``: a message_id reused by another
    operation is found after the statement committed the rest of the batch; the
    error then sends each request of the batch to run alone (``Dispatcher``),
    where the committed ones replay their stored reply.
    """
    known = [r.known_reply() for r in requests]
    claimed = queries.insert_claimed(
        cur, [(r.request_id, reply, r.checked) for r, reply in zip(requests, known, strict=True)]
    )
    stored = stored_replies(
        cur, {r.request_id: r.operation for r in requests if r.request_id not in claimed}
    )
    return [
        (reply, False) if r.request_id in claimed else (stored[r.request_id], True)
        for r, reply in zip(requests, known, strict=True)
    ]


def apply_many(cur, requests: list[Prepared]) -> list[tuple[bytes, bool]]:
    """Many requests inside the caller's transaction, in order: ``(reply, replayed)``
    for each."""
    known = [r.known_reply() for r in requests]
    stored = claim_many(
        cur,
        [
            (r.request_id, r.operation, reply)
            for r, reply in zip(requests, known, strict=True)
            if r.request_id is not None
        ],
    )
    results: list[tuple[bytes, bool] | None] = [None] * len(requests)
    inserts: list[int] = []  # a run of consecutive inserts, applied together
    recorded: list[tuple[str, bytes]] = []

    def done(index: int, result) -> None:
        request = requests[index]
        reply = known[index] if known[index] is not None else request.encode(result)
        results[index] = (reply, False)
        if request.request_id is not None and known[index] is None:
            recorded.append((request.request_id, reply))

    def apply_inserts() -> None:
        if inserts:
            queries.insert_many(cur, [requests[i].checked for i in inserts])
            for i in inserts:
                done(i, None)
            inserts.clear()

    for index, request in enumerate(requests):
        if request.request_id in stored:
            results[index] = (stored[request.request_id], True)
        elif request.operation == "insert":
            inserts.append(index)
        else:
            apply_inserts()
            done(index, request.body(cur, request.checked))
    apply_inserts()
    record_many(cur, recorded)
    return results
