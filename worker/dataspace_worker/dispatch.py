"""From a request message to a datasource call and a reply body.

The worker trusts nothing it receives: the body's size is checked first, then
it is parsed with orjson (never unpickled or evaluated), the operation must be
one of the protocol's, the arguments are bound to the method's signature and
checked again by the datasource. Values stay opaque bytes throughout.

Write requests run through ``PostgresDataSource.execute`` with their
message_id as idempotency key, so a redelivered or re-sent write replays its
first reply instead of writing again.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

from dataspace_client import protocol
from dataspace_client.errors import DataSpaceConnectionError, DataSpaceError
from dataspace_client.protocol import ProtocolError

from .idempotency import MAX_ID_LENGTH

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    """What to do with a request once handled."""

    body: bytes | None  # reply body, None when the request must be retried
    code: str  # "ok" or an error code from the protocol
    operation: str  # the operation, or "?" when the body named none we know
    reason: str = ""  # for a failed request: what was wrong
    replayed: bool = False  # a write seen before: its stored reply, nothing written

    @property
    def poison(self) -> bool:
        """A malformed request: reply with the error and dead-letter it."""
        return self.code == "bad_request"

    def dead_letter(self, reply_to: str | None) -> bool:
        """Whether to keep the request in the dead-letter queue: a malformed one, or a
        failed one whose sender cannot be told (no ``reply_to``)."""
        return self.poison or (self.code != "ok" and not self.retry and not reply_to)

    @property
    def retry(self) -> bool:
        """The store was unavailable: requeue, another attempt may succeed."""
        return self.body is None


class Dispatcher:
    """Runs requests against a PostgresDataSource."""

    def __init__(self, datasource, max_body: int = DEFAULT_MAX_BODY, operations=None):
        """``operations``: the names this dispatcher accepts (default: every data
        operation; the reaper's dispatcher takes only ``reap``)."""
        self.datasource = datasource
        self.max_body = max_body
        if operations is None:
            operations = [n for n in protocol.OPERATIONS if n != "reap"]
        self._signatures = {
            name: inspect.signature(getattr(datasource, name)) for name in operations
        }

    def _parse(self, body: bytes, content_type: str | None):
        if len(body) > self.max_body:
            raise ProtocolError(f"body of {len(body)} bytes is over the limit of {self.max_body}")
        if content_type not in (None, "", protocol.CONTENT_TYPE):
            raise ProtocolError(
                f"content_type {content_type!r:.60} is not {protocol.CONTENT_TYPE!r}"
            )
        op, args = protocol.decode_request(body)
        if op.name not in self._signatures:
            raise ProtocolError(f"operation {op.name!r} is not served on this queue")
        try:
            bound = self._signatures[op.name].bind(**args)
        except TypeError as exc:
            raise ProtocolError(f"{op.name}: {exc}") from None
        bound.apply_defaults()
        return op, bound.arguments

    def handle(
        self, body: bytes, message_id: str | None = None, content_type=None, headers=None
    ) -> Outcome:
        operation = "?"
        try:
            op, args = self._parse(body, content_type)
            operation = op.name
            request_id = None
            if op.write:
                if not message_id or len(message_id) > MAX_ID_LENGTH:
                    raise ProtocolError(
                        f"{op.name}: a write request needs a message_id of 1 to "
                        f"{MAX_ID_LENGTH} characters (its idempotency key)"
                    )
                request_id = message_id
            if not op.transactional:  # commits batch by batch itself; naturally idempotent
                result = getattr(self.datasource, op.name)(**args)
                return Outcome(protocol.encode_result(op, result), "ok", operation)
            reply, replayed = self.datasource.execute(
                op.name, args, lambda result: protocol.encode_result(op, result), request_id
            )
            return Outcome(reply, "ok", operation, replayed=replayed)
        except DataSpaceConnectionError as exc:
            log.warning("%s: store unavailable, request will be retried: %s", operation, exc)
            return Outcome(None, "unavailable", operation)
        except ProtocolError as exc:
            message = protocol.error_message(exc)
            return Outcome(protocol.encode_error(exc), exc.code, operation, reason=message)
        except (KeyError, ValueError, TypeError, NotImplementedError, DataSpaceError) as exc:
            return _failed(operation, exc)
        except Exception as exc:
            log.exception("%s: unexpected error", operation)
            return _failed(operation, exc)


def _failed(operation: str, exc: BaseException) -> Outcome:
    return Outcome(
        protocol.encode_error(exc),
        protocol.error_code(exc),
        operation,
        reason=protocol.error_message(exc),
    )
