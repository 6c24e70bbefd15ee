"""From a request message to a datasource call and a reply body.

The worker trusts nothing it receives: the body's size is checked first, then
it is parsed with orjson (never unpickled or evaluated), the operation must be
one of the protocol's, the arguments are bound to the method's signature and
checked again by the datasource. Values stay opaque bytes throughout.

Write requests run through ``PostgresDataSource.execute_many`` (a batch in one
transaction) or ``execute`` (one alone) with their message_id as idempotency
key, so a redelivered or re-sent write replays its first reply instead of
writing again.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

from dataspace_core import protocol, validate
from dataspace_core.errors import DataSpaceConnectionError, DataSpaceError
from dataspace_core.protocol import ProtocolError

from . import admission
from .admission import ArgumentCheck

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One request as delivered: what ``Dispatcher.handle_batch`` takes."""

    body: bytes
    message_id: str | None = None
    content_type: str | None = None
    headers: dict | None = None
    #: what it was published with: None for a request handed over in process
    routing_key: str | None = None
    #: the publishing account, when the message says (the broker checks it)
    user_id: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What to do with a request once handled."""

    body: bytes | None  # reply body, None when the request must be retried
    code: str  # "ok" or an error code from the protocol
    operation: str  # the operation, or "?" when the body named none we know
    reason: str = ""  # for a failed request: what was wrong
    replayed: bool = False  # a write seen before: its stored reply, nothing written
    #: a batch message's (batch_requests.py): each of its requests' own outcome
    parts: tuple[Outcome, ...] = ()
    #: a batch message's: the body its dead letter keeps instead of the delivered one
    #: (only the requests that failed)
    dead_body: bytes | None = None
    #: a batch message delivered again, not run: its requests ``(message_id, body)``,
    #: to be published again one by one (batch_requests.split)
    split: tuple[tuple[str, bytes], ...] = ()

    @property
    def poison(self) -> bool:
        """A malformed request: reply with the error and dead-letter it."""
        return self.code == "bad_request"

    def dead_letter(self, reply_to: str | None) -> bool:
        """Whether to keep the request in the dead-letter queue: a malformed one, or a
        failed one whose sender cannot be told (no ``reply_to``); never a batch split."""
        if self.split:
            return False
        return self.poison or (self.code != "ok" and not self.retry and not reply_to)

    @property
    def retry(self) -> bool:
        """The store was unavailable: requeue, another attempt may succeed."""
        return self.body is None

    @classmethod
    def unavailable(cls, operation: str) -> Outcome:
        """The store could not be reached: no reply, the request is tried again
        (settle.disposition makes that a requeue, or on a lane a give-back)."""
        return cls(None, "unavailable", operation)


@dataclass(frozen=True)
class _Pending:
    """A transactional request of a batch, checked, waiting to run."""

    index: int  # its place in the batch (and in the outcomes)
    op: protocol.Operation
    args: dict
    request_id: str | None  # its idempotency key (a write's message_id)
    frames: bool  # whether its reply may use binary frames

    def encoded(self):
        """What ``execute`` and ``execute_many`` take for it."""
        return (self.op.name, self.args, _encoder(self.op, self.frames), self.request_id)


class Parameters:
    """An operation's parameters, read once from its datasource method's signature.

    ``bind`` does what ``inspect.Signature.bind(**args)`` and ``apply_defaults``
    did for each request, with the same messages, in a tenth of the time (a
    request's arguments are all by name, and these methods take no ``*args``).
    """

    def __init__(self, signature: inspect.Signature):
        parameters = signature.parameters.values()
        if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters):
            raise TypeError(f"{signature}: only named parameters can be bound by name")
        self.names = tuple(p.name for p in parameters)
        self.defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        self.known = frozenset(self.names)

    def bind(self, args: dict) -> dict:
        """``args`` by parameter, in the signature's order, defaults filled in;
        TypeError for a missing or an unknown argument."""
        for name in self.names:
            if name not in args and name not in self.defaults:
                raise TypeError(f"missing a required argument: {name!r}")
        for name in args:
            if name not in self.known:
                raise TypeError(f"got an unexpected keyword argument {name!r}")
        defaults = self.defaults
        return {name: args[name] if name in args else defaults[name] for name in self.names}


class Dispatcher:
    """Runs requests against a PostgresDataSource."""

    def __init__(
        self,
        datasource,
        max_body: int = DEFAULT_MAX_BODY,
        operations=None,
        checks: dict[str, ArgumentCheck] | None = None,
    ):
        """``operations``: the names this dispatcher accepts (default: every data
        operation; the reaper's dispatcher takes only ``reap``). ``checks``: more
        checks of an operation's decoded arguments (admission.ArgumentCheck)."""
        self.datasource = datasource
        self.max_body = max_body
        self._checks = dict(checks or {})
        if operations is None:
            operations = [n for n in protocol.OPERATIONS if n != "reap"]
        self._signatures = {
            name: Parameters(inspect.signature(getattr(datasource, name))) for name in operations
        }

    def _parse(self, request: Request):
        """The operation and bound arguments of a request, every check passed: the
        one place where what a client wrote is checked, whatever the encoding."""
        body, content_type = request.body, request.content_type
        if len(body) > self.max_body:
            raise ProtocolError(f"body of {len(body)} bytes is over the limit of {self.max_body}")
        if content_type not in (None, "", protocol.CONTENT_TYPE, protocol.FRAME_CONTENT_TYPE):
            raise ProtocolError(
                f"content_type {content_type!r:.60} is not {protocol.CONTENT_TYPE!r} "
                f"or {protocol.FRAME_CONTENT_TYPE!r}"
            )
        op, args = protocol.decode_request(body)
        admission.operation_of(request.routing_key, op.name)
        if op.name not in self._signatures:
            raise ProtocolError(f"operation {op.name!r} is not served on this queue")
        try:
            arguments = self._signatures[op.name].bind(args)
        except TypeError as exc:
            raise ProtocolError(f"{op.name}: {exc}") from None
        check = self._checks.get(op.name)
        if check is not None:
            check(op.name, arguments)
        return op, arguments

    def _admit(self, request: Request):
        """``(message_id, operation, arguments, frames)`` of a request whose ids and
        body pass every check; raises ProtocolError for the first that fails."""
        message_id = admission.identifier("message_id", request.message_id)
        admission.identifier("correlation_id", request.correlation_id)
        op, args = self._parse(request)
        return message_id, op, args, protocol.accepts_frames(request.headers)

    def parsed(self, request: Request):
        """``(operation, checked arguments, frames)`` of a request that passes every
        check ``handle_batch`` makes, else None (``handle_batch`` then says why)."""
        try:
            _message_id, op, args, frames = self._admit(request)
            return op, validate.check(op.name, args), frames
        except Exception:  # refused, or a bug: the usual path answers it
            return None

    @staticmethod
    def _request_id(op, message_id: str | None) -> str | None:
        """A write's idempotency key (its message_id, required); None for a read."""
        if not op.write:
            return None
        if message_id is None:
            raise ProtocolError(
                f"{op.name}: a write request needs a message_id of 1 to "
                f"{admission.MAX_ID_LENGTH} bytes (its idempotency key)"
            )
        return message_id

    def handle(
        self, body: bytes, message_id: str | None = None, content_type=None, headers=None
    ) -> Outcome:
        return self.handle_batch([Request(body, message_id, content_type, headers)])[0]

    def handle_request(self, request: Request) -> Outcome:
        return self.handle_batch([request])[0]

    def handle_batch(self, requests: list[Request]) -> list[Outcome]:
        """Run requests in order and return their outcomes, in the same order.

        The transactional ones among them run in one database transaction (one
        commit for all: what makes a full prefetch window cheap). If any of them
        fails, that transaction rolls back and each runs again in a transaction
        of its own, so one bad request never fails or delays another's effect.
        """
        outcomes: list[Outcome | None] = [None] * len(requests)
        pending: list[_Pending] = []  # the transactional requests
        for index, request in enumerate(requests):
            operation = "?"
            try:
                message_id, op, args, frames = self._admit(request)
                operation = op.name
                request_id = self._request_id(op, message_id)
                if op.transactional:
                    pending.append(_Pending(index, op, args, request_id, frames))
                else:  # commits batch by batch itself; naturally idempotent
                    outcomes[index] = self._outcome_of(
                        operation, lambda op=op, a=args, f=frames: self._direct(op, a, f)
                    )
            except ProtocolError as exc:
                outcomes[index] = refusal(operation, exc)
            except Exception as exc:  # a bug, not the sender's fault: answer, don't die
                log.exception("%s: unexpected error", operation)
                outcomes[index] = _failed(operation, exc)
        ids = [p.request_id for p in pending if p.request_id is not None]
        if len(pending) > 1 and len(ids) == len(set(ids)):
            try:
                self._together(pending, outcomes)
            except DataSpaceConnectionError as exc:  # every one of them waits
                log.warning("store unavailable, %d requests will be retried: %s", len(ids), exc)
                for p in pending:
                    outcomes[p.index] = Outcome.unavailable(p.op.name)
        for p in pending:
            if outcomes[p.index] is None:
                outcomes[p.index] = self._outcome_of(p.op.name, lambda p=p: self._alone(p))
        return outcomes

    def _together(self, pending: list[_Pending], outcomes) -> None:
        """One transaction for every pending request; on failure, outcomes stay unset
        (each request then runs alone and the failing one reports its own error)."""
        try:
            results = self.datasource.execute_many([p.encoded() for p in pending])
        except DataSpaceConnectionError:
            raise
        except Exception as exc:
            log.debug("a batch of %d failed (%s); running each alone", len(pending), exc)
            return
        for p, (reply, replayed) in zip(pending, results, strict=True):
            outcomes[p.index] = Outcome(reply, "ok", p.op.name, replayed=replayed)

    def _direct(self, op, args, frames: bool) -> Outcome:
        result = getattr(self.datasource, op.name)(**args)
        return Outcome(protocol.encode_result(op, result, frames), "ok", op.name)

    def _alone(self, pending: _Pending) -> Outcome:
        reply, replayed = self.datasource.execute(*pending.encoded())
        return Outcome(reply, "ok", pending.op.name, replayed=replayed)

    @staticmethod
    def _outcome_of(operation: str, action) -> Outcome:
        """``action()``'s outcome, or the outcome of the error it raised. A
        ``DataSpaceConnectionError`` (the store is unavailable, or a reap was cut
        short) is the one error that means "try again later"."""
        try:
            return action()
        except DataSpaceConnectionError as exc:
            log.warning("%s: store unavailable, request will be retried: %s", operation, exc)
            return Outcome.unavailable(operation)
        except ProtocolError as exc:
            return refusal(operation, exc)
        except (KeyError, ValueError, TypeError, NotImplementedError, DataSpaceError) as exc:
            return _failed(operation, exc)
        except Exception as exc:
            log.exception("%s: unexpected error", operation)
            return _failed(operation, exc)


def _encoder(op, frames: bool):
    return lambda result: protocol.encode_result(op, result, frames)


def refusal(operation: str, exc: ProtocolError) -> Outcome:
    """The outcome of a request that breaks the protocol (``bad_request``, or the
    error's own code)."""
    message = protocol.error_message(exc)
    return Outcome(protocol.encode_error(exc), exc.code, operation, reason=message)


def _failed(operation: str, exc: BaseException) -> Outcome:
    return Outcome(
        protocol.encode_error(exc),
        protocol.error_code(exc),
        operation,
        reason=protocol.error_message(exc),
    )
