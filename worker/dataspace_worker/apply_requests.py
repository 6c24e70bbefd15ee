"""Requests applied inside one transaction, each at most once.

``PostgresDataSource.execute_many`` opens the transaction; here each request is
claimed in the request log (``idempotency.py``), run (its body from
``queries.BODIES``) and its reply recorded, so that a request delivered twice
replays its first reply instead of writing again. A batch takes as few
statements as it can: one claim for all, consecutive inserts as one, one record
for the replies not known in advance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import idempotency, queries

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
        stored = idempotency.claim(cur, request.request_id, request.operation, known)
        if stored is not None:
            return stored, True
    result = request.body(cur, request.checked)
    if known is not None:
        return known, False
    reply = request.encode(result)
    if request.request_id is not None:
        idempotency.record(cur, request.request_id, reply)
    return reply, False


def apply_many(cur, requests: list[Prepared]) -> list[tuple[bytes, bool]]:
    """Many requests inside the caller's transaction, in order: ``(reply, replayed)``
    for each."""
    known = [r.known_reply() for r in requests]
    stored = idempotency.claim_many(
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
    idempotency.record_many(cur, recorded)
    return results
