"""A request as the worker holds it between its delivery and its settlement, and
the reply properties made from it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cached_property

import pika

from dataspace_core.errors import DataSpaceRequestError
from dataspace_core.protocol import (
    BAD_REPLY_TO,
    OPERATIONS,
    OUTCOME_HEADER,
    PROTOCOL_VERSION,
    VERSION_HEADER,
    content_type,
    encode_error,
)

from . import __version__
from .dispatch import Outcome
from .reply_addresses import BadReplyTo, ReplyAddress, parse

APP_ID = f"dataspace-worker/{__version__}"


@dataclass(frozen=True)
class Delivery:
    channel: object  # pika.channel.Channel
    tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool = False
    #: set when ``body`` was cut to what a dead letter keeps: the original size and
    #: SHA-256 (hex) of the body as delivered (a batch's: of the batch of its failed
    #: requests that its dead letter keeps)
    body_size: int | None = None
    body_sha256: str | None = None

    @cached_property
    def reply_address(self) -> ReplyAddress | BadReplyTo | None:
        """``reply_to`` decoded once (reply_addresses.py), for the refusal before the
        request runs and for its reply after: the address, the BadReplyTo saying why
        it is none, or None when the request has no ``reply_to``."""
        reply_to = self.properties.reply_to
        if not reply_to:
            return None
        try:
            return parse(reply_to)
        except BadReplyTo as exc:
            return exc


def truncated(delivery: Delivery, keep: int) -> Delivery:
    """``delivery`` with its body cut to ``keep`` bytes, its size and SHA-256 noted."""
    body = delivery.body
    return replace(
        delivery,
        body=body[:keep],
        body_size=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


@dataclass(frozen=True)
class Unanswerable(Outcome):
    """A request refused for its ``reply_to``: dead-lettered, never answered."""

    @property
    def poison(self) -> bool:
        return True


def refused_reply_to(delivery: Delivery) -> Outcome | None:
    """The outcome of a request whose ``reply_to`` is given but no direct reply-to
    address (reply_addresses.py): refused before it runs, no reply published
    anywhere (the name could be any queue); None for the others."""
    refusal = delivery.reply_address
    if not isinstance(refusal, BadReplyTo):
        return None
    reason = str(refusal)
    operation = str(delivery.routing_key).rsplit(".", 1)[-1]
    return Unanswerable(
        encode_error(DataSpaceRequestError(BAD_REPLY_TO, reason)),
        BAD_REPLY_TO,
        operation if operation in OPERATIONS else "?",
        reason=reason,
    )


def reply_properties(delivery: Delivery, outcome: Outcome) -> pika.BasicProperties:
    """The properties of the reply to ``delivery``."""
    return pika.BasicProperties(
        content_type=content_type(outcome.body),
        correlation_id=delivery.properties.correlation_id,
        type=f"{outcome.operation}.reply",
        app_id=APP_ID,
        headers={VERSION_HEADER: PROTOCOL_VERSION, OUTCOME_HEADER: outcome.code},
    )
