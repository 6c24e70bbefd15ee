"""The errors a DataSpace call can raise: defined in ``dataspace_core.errors``
(the worker raises the same ones), importable from here as before."""

from dataspace_core.errors import (  # noqa: F401
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceExistsError,
    DataSpaceNoWorkerError,
    DataSpacePublishError,
    DataSpaceRedeliveredError,
    DataSpaceRefusedError,
    DataSpaceRequestError,
    DataSpaceTimeoutError,
    DataSpaceTooLargeError,
    InvalidMetadataError,
)
