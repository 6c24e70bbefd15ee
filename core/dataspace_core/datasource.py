"""The DataSource abstract base class: the storage interface every backend implements.

Both backends of this project implement it: ``dataspace_worker.postgres.PostgresDataSource``
(in process, on PostgreSQL) and ``dataspace_client.remote.RemoteDataSource`` (every call
an RPC over RabbitMQ to a worker that runs the former).  The behaviour each method
must have is in docs/api.md; the contract test suite runs it against both.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

from .catalog import named

#: What a DataSpace calls on its datasource: the decision engine's DataSource API
#: (the catalog's ``engine_api`` operations) and ``close``. A datasource class from
#: elsewhere (the engine's own, a site's) is accepted whatever its base class if it
#: has these; the methods this package adds (delete, mark_expired, mark_demented,
#: reap, publish) are optional.
REQUIRED_METHODS = ("close", *named(lambda spec: spec.engine_api))


def missing_methods(cls: type) -> list[str]:
    """The REQUIRED_METHODS that ``cls`` lacks (or has as non-callables)."""
    return [name for name in REQUIRED_METHODS if not callable(getattr(cls, name, None))]


def taskmanager_arguments(name, taskmanager_id, datestamp, taskmanager_name) -> dict:
    """``store_taskmanager``'s arguments, the name given as the engine's datasources
    take it (``name=``) or as this package's earlier releases did (``taskmanager_name=``)."""
    if name is not None and taskmanager_name is not None:
        raise TypeError("store_taskmanager: give the name once, as name= or taskmanager_name=")
    return {
        "taskmanager_name": taskmanager_name if name is None else name,
        "taskmanager_id": taskmanager_id,
        "datestamp": datestamp,
    }


def _keys_like(value) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, bytearray))


def demented_arguments(taskmanager_id, keys, generation_id) -> dict:
    """``mark_demented``'s arguments in either order: ``(taskmanager_id, keys,
    generation_id=None)`` (DataSpace's) or ``(taskmanager_id, generation_id, keys)``
    (how the engine's DataSpace calls its datasource). The two cannot be confused:
    keys is a list of str, generation_id an int or None."""
    if _keys_like(generation_id) and not _keys_like(keys):
        keys, generation_id = generation_id, keys
    return {"taskmanager_id": taskmanager_id, "keys": keys, "generation_id": generation_id}


class DataSource(abc.ABC):
    """Abstract storage backend of a DataSpace."""

    #: Name of the taskmanager table
    taskmanager_table = "taskmanager"
    #: Name of the dataproduct table
    dataproduct_table = "dataproduct"
    #: Name of the header table
    header_table = "header"
    #: Name of the metadata table
    metadata_table = "metadata"

    def __init__(self, config: dict):
        self.config = config

    # -- lifecycle ------------------------------------------------------------
    @abc.abstractmethod
    def connect(self):
        """Create a pool of connections to the store."""

    @abc.abstractmethod
    def close(self):
        """Close all connections to the store."""

    @abc.abstractmethod
    def reset_connections(self):
        """Drop any cached connections and reconnect."""

    # -- fire-and-forget (see producer.py) -------------------------------------
    def publish(self, operation: str, args: dict) -> str | None:
        """Hand over one write of ``producer.WRITES`` without waiting for its result.

        This default applies it at once (an in-process store has nothing to
        wait for) and returns None; ``RemoteDataSource`` publishes it and
        returns its message_id.
        """
        args = {k: v for k, v in args.items() if k != "self"}
        getattr(self, operation)(**args)
        return None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write given to ``publish`` is safe (here: already applied)."""
        return None

    @property
    def pending(self) -> int:
        """Writes given to ``publish`` and not yet safe."""
        return 0

    @abc.abstractmethod
    def create_tables(self):
        """Create (or migrate) the database tables; idempotent."""

    @abc.abstractmethod
    def get_schema(self, table=None):
        """Describe the columns of ``table``, or of every table when None."""

    # -- task managers --------------------------------------------------------
    @abc.abstractmethod
    def store_taskmanager(
        self, name=None, taskmanager_id=None, datestamp=None, *, taskmanager_name=None
    ):
        """Store a TaskManager row and return its new sequence_id (int).

        The name may also be given as ``taskmanager_name=`` (see taskmanager_arguments).
        """

    @abc.abstractmethod
    def get_taskmanager(self, taskmanager_name, taskmanager_id=None):
        """Return the TaskManager dict (newest of that name when no id); KeyError if none."""

    @abc.abstractmethod
    def get_taskmanagers(self, taskmanager_name=None, start_time=None, end_time=None):
        """Return TaskManager dicts ordered by datestamp, bounds inclusive; [] if none."""

    @abc.abstractmethod
    def get_last_generation_id(self, taskmanager_name, taskmanager_id=None):
        """Return the highest generation_id stored under that name (and id); KeyError if none."""

    # -- products -------------------------------------------------------------
    @abc.abstractmethod
    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        """Insert a product with its header and metadata, atomically."""

    @abc.abstractmethod
    def update(self, taskmanager_id, generation_id, key, value, header, metadata):
        """Replace an existing product, header and metadata; KeyError if absent."""

    @abc.abstractmethod
    def get_dataproduct(self, taskmanager_id, generation_id, key):
        """Return the value bytes of one product; KeyError if absent."""

    @abc.abstractmethod
    def get_dataproducts(self, taskmanager_id, key=None):
        """Return every product of a task manager (optionally one key) in insertion order."""

    @abc.abstractmethod
    def get_datablock(self, taskmanager_id, generation_id):
        """Return ``{key: value_bytes}`` for one generation."""

    @abc.abstractmethod
    def get_header(self, taskmanager_id, generation_id, key):
        """Return the header tuple of one product; KeyError if absent."""

    @abc.abstractmethod
    def get_metadata(self, taskmanager_id, generation_id, key):
        """Return the metadata tuple of one product; KeyError if absent."""

    @abc.abstractmethod
    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id):
        """Copy one generation, headers and metadata included, to a new generation."""

    @abc.abstractmethod
    def delete_data_older_than(self, days):
        """Delete task managers older than ``days`` days and, by cascade, their products."""

    # -- beyond the original: concrete so that third-party datasources still load --
    def delete(self, taskmanager_id, all_generations=False):
        """Delete the newest generation's products (or all); return how many products."""
        raise NotImplementedError(f"{type(self).__name__} does not implement delete")

    def mark_expired(self, taskmanager_id, generation_id, key, expiry_time):
        """Set the header expiration time of one product; KeyError if absent."""
        raise NotImplementedError(f"{type(self).__name__} does not implement mark_expired")

    def mark_demented(self, taskmanager_id, keys, generation_id=None):
        """Expire now the given keys of a generation (default the newest); return the count.

        Also takes the engine's order ``(taskmanager_id, generation_id, keys)``
        (see demented_arguments).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement mark_demented")
