"""Client library of the dataspace service: the decision engine's DataSpace API.

Everything a program written against the original API imports lives here; the
datasource named in the configuration decides where the data goes
(``dataspace_client.remote.RemoteDataSource`` over RabbitMQ, or
``dataspace_worker.postgres.PostgresDataSource`` in process).
"""

from dataspace_core.datasource import DataSource
from dataspace_core.errors import (
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
    InvalidMetadataError,
)

from .datablock import DataBlock, Header, Metadata, ProductRetriever
from .dataspace import DataSpace
from .processing_state import ProcessingState, State
from .producer import Producer
from .reaper import Reaper
from .values import PickleRefusedError, compress, decompress, zdumps, zloads

__version__ = "0.1.0"

__all__ = [
    "DataBlock",
    "DataSource",
    "DataSpace",
    "DataSpaceConfigurationError",
    "DataSpaceConnectionError",
    "DataSpaceError",
    "DataSpaceExistsError",
    "DataSpaceNoWorkerError",
    "DataSpaceRedeliveredError",
    "DataSpacePublishError",
    "DataSpaceRefusedError",
    "DataSpaceRequestError",
    "DataSpaceTimeoutError",
    "Header",
    "InvalidMetadataError",
    "Metadata",
    "PickleRefusedError",
    "ProcessingState",
    "Producer",
    "ProductRetriever",
    "Reaper",
    "State",
    "compress",
    "decompress",
    "zdumps",
    "zloads",
]
