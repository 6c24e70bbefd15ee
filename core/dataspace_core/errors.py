"""Exceptions callers of the DataSpace API catch.

The four ``DataSpace*Error`` names come from the original API and keep their
meaning.  The service adds subclasses so a caller can tell a timeout or an
unavailable broker from a plain failure, while ``except DataSpaceError`` still
catches everything the store raises that is not a ``KeyError``/``ValueError``/
``TypeError`` about the caller's own arguments.
"""

from __future__ import annotations


class DataSpaceError(Exception):
    """A request to the store failed."""


class DataSpaceConfigurationError(DataSpaceError):
    """The configuration given to DataSpace, a datasource or a Reaper is invalid."""


class DataSpaceConnectionError(DataSpaceError):
    """The broker or the database could not be reached.  Retrying later may work."""

    retryable = True


class DataSpaceRedeliveredError(DataSpaceConnectionError):
    """A read came back to a worker after its first delivery went unanswered: the
    worker that took it may have died running it, so it is not run again on the
    fast read queue (which has no delivery limit). ``RemoteDataSource`` sends such a
    read once more through the request queue, whose delivery limit ends a read
    that keeps killing workers (docs/protocol.md, "Reads")."""


class DataSpaceRefusedError(DataSpaceConfigurationError, DataSpaceConnectionError):
    """The broker refused this client for a reason retrying cannot cure: its
    credentials, its vhost, a certificate. Configuration to fix; also a
    DataSpaceConnectionError, which is what a refusal raised before."""

    retryable = False


class DataSpaceExistsError(DataSpaceError):
    """The object being created already exists."""


class DataSpaceTimeoutError(DataSpaceError):
    """A request got no answer within its timeout.

    Whether a write was applied is unknown; requests carry an idempotency key
    so that sending the same request again is safe.
    """

    retryable = True

    def __init__(self, operation: str, timeout: float):
        self.operation = operation
        self.timeout = timeout
        super().__init__(f"{operation}: no reply within {timeout:g} s")


class DataSpaceNoWorkerError(DataSpaceTimeoutError):
    """No worker consumes the queue a request went to: the call gave up early.

    A kind of timeout (code catching DataSpaceTimeoutError keeps working): the
    request stays queued until its expiration (the call's timeout) and runs if a
    worker starts before then, so whether a write was applied is unknown, and
    sending it again with the same message_id is safe.
    """

    def __init__(self, operation: str, timeout: float, queue: str, broker: str):
        super().__init__(operation, timeout)
        self.queue = queue
        self.args = (
            f"{operation}: no worker consumes {queue} on the broker at {broker}: start "
            "dataspace-worker on this vhost (the request stays queued until its timeout "
            "and runs if a worker starts by then)",
        )


class DataSpacePublishError(DataSpaceError):
    """Fire-and-forget requests the broker refused for good (none of them was stored).

    ``failures`` lists one line per request: its operation, message_id and why.
    """

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(f"{len(failures)} published requests refused: {failures[0]}{more}")


class DataSpaceRequestError(DataSpaceError):
    """The service refused a request as malformed (an error reply with a code).

    ``code`` is the protocol's error code (see docs/protocol.md).
    """

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


class DataSpaceTooLargeError(DataSpaceRequestError):
    """The reply would be larger than the broker's max_message_size (code
    ``too_large``): read the products one at a time (``get_dataproduct`` per key)."""

    def __init__(self, message: str):
        super().__init__("too_large", message)


class InvalidMetadataError(Exception):
    """Errors due to invalid Metadata."""
