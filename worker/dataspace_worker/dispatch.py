"""From a request message to a datasource call and a reply body.

The worker trusts nothing it receives: the body is parsed with orjson (never
unpickled or evaluated), the operation must be one of the protocol's, the
arguments are bound to the method's signature and checked again by the
datasource.  Values stay opaque bytes throughout.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

from dataspace_client import protocol
from dataspace_client.errors import DataSpaceConnectionError, DataSpaceError
from dataspace_client.protocol import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What to do with a request once handled."""

    body: bytes | None  # reply body, None when the request must be retried
    code: str  # "ok" or an error code from the protocol
    operation: str  # the operation, or "?" when the body named none we know

    @property
    def poison(self) -> bool:
        """A malformed request: reply with the error and dead-letter it."""
        return self.code == "bad_request"

    @property
    def retry(self) -> bool:
        """The store was unavailable: requeue, another attempt may succeed."""
        return self.body is None


class Dispatcher:
    """Runs requests against a DataSource (normally a PostgresDataSource)."""

    def __init__(self, datasource):
        self.datasource = datasource
        self._signatures = {
            name: inspect.signature(getattr(datasource, name)) for name in protocol.OPERATIONS
        }

    def handle(self, body: bytes) -> Outcome:
        operation = "?"
        try:
            op, args = protocol.decode_request(body)
            operation = op.name
            try:
                bound = self._signatures[op.name].bind(**args)
            except TypeError as exc:
                raise ProtocolError(f"{op.name}: {exc}") from None
            result = getattr(self.datasource, op.name)(*bound.args, **bound.kwargs)
            return Outcome(protocol.encode_result(op, result), "ok", operation)
        except DataSpaceConnectionError as exc:
            log.warning("%s: store unavailable, request will be retried: %s", operation, exc)
            return Outcome(None, "unavailable", operation)
        except (KeyError, ValueError, TypeError, NotImplementedError, DataSpaceError) as exc:
            return Outcome(protocol.encode_error(exc), protocol.error_code(exc), operation)
        except Exception as exc:
            log.exception("%s: unexpected error", operation)
            return Outcome(protocol.encode_error(exc), protocol.error_code(exc), operation)
