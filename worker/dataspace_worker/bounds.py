"""Bounds on what a client can make the worker publish or hold (docs/security.md).

A request's header table, its reply and its dead letter are all things a client
chooses the size of. Each is checked here, on the database thread, before the
I/O thread publishes anything: the broker answers a frame or a message over its
limits by closing the channel or the connection, again at every redelivery."""

from __future__ import annotations

import logging
from dataclasses import replace

from dataspace_core.errors import DataSpaceTooLargeError
from dataspace_core.limits import MAX_MESSAGE_BYTES
from dataspace_core.protocol import ProtocolError, encode_error

from . import metrics
from .dead_letters import DEAD_LETTER_BODY, table_size
from .delivery import Delivery, truncated
from .dispatch import Outcome

#: the pool's logger: the warning reads as it did before this module split off
log = logging.getLogger("dataspace_worker.consumer")

#: largest header table a request may carry, encoded (setting ``max_headers``)
MAX_HEADERS = 16 * 1024


#: the most bytes a field of these types takes in an AMQP table, besides its name
#: and text: type octet, length or value (pika's ``encode_value``)
_FIELD_BYTES = {str: 5, bytes: 5, int: 9, bool: 2, type(None): 1}


def headers_within(headers: dict | None, limit: int) -> bool:
    """Whether ``headers`` surely encode in at most ``limit`` bytes, counted without
    encoding them: four bytes a UTF-8 character at most, the widest encoding of each
    field. False when that bound is over the limit or a value is of another type
    (a table, a list, a time, a decimal, a float): ``table_size`` then encodes them."""
    if not headers:
        return True
    budget = limit - 4
    for name, value in headers.items():
        fixed = _FIELD_BYTES.get(type(value))
        if fixed is None or type(name) is not str:
            return False
        budget -= 1 + 4 * len(name) + fixed
        if type(value) is int and not -(2**63) <= value < 2**63:
            return False  # pika cannot encode it (a timestamp past 64 bits, decoded)
        if type(value) in (str, bytes):
            budget -= 4 * len(value) if type(value) is str else len(value)
        if budget < 0:
            return False
    return True


class RequestBounds:
    """The three size checks a handled batch goes through before it is settled."""

    def __init__(
        self,
        max_headers: int = MAX_HEADERS,
        max_message_size: int = MAX_MESSAGE_BYTES,
        dead_letter_body: int = DEAD_LETTER_BODY,
    ):
        """``max_headers``: the largest encoded header table a request may carry;
        ``max_message_size``: the broker's (a larger reply is replaced by a
        ``too_large`` error); ``dead_letter_body``: body bytes a dead letter keeps."""
        self.max_headers = max_headers
        self.max_message_size = max_message_size
        self.dead_letter_body = min(dead_letter_body, max_message_size)

    def oversized_headers(self, delivery: Delivery) -> Outcome | None:
        """A ``bad_request`` outcome for a request whose header table encodes larger
        than ``max_headers`` (not run; its dead letter does not copy the table), else
        None. A table near the broker's frame_max is fine to publish, but anything
        the worker built from it (a dead letter: the table and its own headers) would
        not fit in a frame: the broker would close the connection at each redelivery."""
        headers = delivery.properties.headers
        if headers_within(headers, self.max_headers):
            return None
        size = table_size(headers)
        if size is not None and size <= self.max_headers:
            return None
        reason = (
            f"header table of {size if size is not None else 'unencodable'} bytes is over "
            f"the limit of {self.max_headers}"
        )
        return Outcome(encode_error(ProtocolError(reason)), "bad_request", "?", reason=reason)

    def sendable(self, outcome: Outcome) -> Outcome:
        """``outcome``, or a ``too_large`` error in its place when its reply body is
        over the broker's max_message_size: the broker would refuse that reply by
        closing the channel, again at every redelivery. The request is settled
        with the error reply; it is never retried."""
        body = outcome.body
        if body is None or len(body) <= self.max_message_size:
            return outcome
        reason = (
            f"{outcome.operation}: the reply of {len(body)} bytes is over the broker's "
            f"max_message_size ({self.max_message_size} bytes); read the products one at "
            "a time: get_dataproduct(taskmanager_id, generation_id, key) for each key"
        )
        log.warning("%s", reason)
        metrics.REPLIES_TOO_LARGE.inc()
        error = encode_error(DataSpaceTooLargeError(reason))
        return Outcome(error, "too_large", outcome.operation, reason=reason)

    def keepable(self, delivery: Delivery, outcome: Outcome) -> Delivery:
        """``delivery``, with its body cut to ``dead_letter_body`` bytes (and its size
        and SHA-256 noted) when the request failed and may be dead-lettered: the dead
        letter keeps no more, and the whole body need not be held until it is
        confirmed. Runs on the database thread (hashing 100 MiB takes a while)."""
        if outcome.code == "ok" or outcome.retry or outcome.split or delivery.body_size is not None:
            return delivery
        if outcome.dead_body is not None:  # a batch: only its failed requests
            delivery = replace(delivery, body=outcome.dead_body)
        if len(delivery.body) <= self.dead_letter_body:
            return delivery
        return truncated(delivery, self.dead_letter_body)
