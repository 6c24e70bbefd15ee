"""DataSpace: the decision engine's entry point to the store.

It validates its configuration, loads the configured datasource class by module
and name, and delegates every call to it.  The datasource decides where the data
lives: in process on PostgreSQL, or behind RabbitMQ.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from dataspace_core.datasource import DataSource, missing_methods
from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceExistsError,
)

from .producer import Producer

__all__ = [
    "DataSpace",
    "DataSpaceConfigurationError",
    "DataSpaceConnectionError",
    "DataSpaceError",
    "DataSpaceExistsError",
]


def _datasource_settings(config: Any) -> dict:
    if not isinstance(config, Mapping) or "dataspace" not in config:
        raise DataSpaceConfigurationError("Configuration is missing dataspace information")
    dataspace = config["dataspace"]
    if not isinstance(dataspace, Mapping):
        raise DataSpaceConfigurationError(
            "Invalid dataspace configuration: dataspace key must correspond to a dictionary"
        )
    source = dataspace.get("datasource")
    if not isinstance(source, Mapping) or not {"module", "name", "config"} <= set(source):
        raise DataSpaceConfigurationError(
            "Invalid dataspace configuration: datasource needs 'module', 'name' and 'config'"
        )
    return source


def load_datasource(source: dict) -> DataSource:
    """Import ``source["module"]``, take class ``source["name"]`` and build it with ``config``."""
    try:
        module = importlib.import_module(source["module"])
    except ImportError as exc:
        raise DataSpaceConfigurationError(
            f"Invalid dataspace configuration: cannot import {source['module']!r}: {exc}"
        ) from None
    where = f"{source['module']}.{source['name']}"
    cls = getattr(module, source["name"], None)
    if not isinstance(cls, type):
        raise DataSpaceConfigurationError(
            f"Invalid dataspace configuration: {where} is not a class"
        )
    # Any class will do, as in the engine, if it has what a DataSpace calls.
    missing = missing_methods(cls)
    if missing:
        raise DataSpaceConfigurationError(
            f"Invalid dataspace configuration: datasource {where} lacks {', '.join(missing)}"
        )
    return cls(source["config"])


def _optional(datasource, method: str):
    """A method this package adds to the engine's API, which a datasource class
    from elsewhere may lack: say so instead of an AttributeError."""
    found = getattr(datasource, method, None)
    if found is None:
        raise NotImplementedError(
            f"datasource {type(datasource).__name__} does not implement {method}"
        )
    return found


class DataSpace:
    """Collection of datablocks; the interface to the store that holds them."""

    def __init__(self, config: dict):
        source = _datasource_settings(config)
        self.config = config
        self.allow_pickle = bool(config["dataspace"].get("allow_pickle", True))
        self.datasource = load_datasource(source)

    def __enter__(self) -> DataSpace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self):
        self.datasource.close()

    def producer(self) -> Producer:
        """Fire-and-forget writes for decoupled producers (see ``producer.Producer``)::

        with space.producer() as producer:   # flushes on leaving the block
            for key, value in products:
                producer.insert(tm, generation, key, value, header, metadata)
        """
        return Producer(self.datasource)

    def store_taskmanager(self, name, taskmanager_id, datestamp=None):
        return self.datasource.store_taskmanager(name, taskmanager_id, datestamp)

    def get_taskmanager(self, taskmanager_name, taskmanager_id=None):
        return self.datasource.get_taskmanager(taskmanager_name, taskmanager_id)

    def get_taskmanagers(self, taskmanager_name=None, start_time=None, end_time=None):
        return self.datasource.get_taskmanagers(taskmanager_name, start_time, end_time)

    def get_last_generation_id(self, taskmanager_name, taskmanager_id=None):
        return self.datasource.get_last_generation_id(taskmanager_name, taskmanager_id)

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        self.datasource.insert(taskmanager_id, generation_id, key, value, header, metadata)

    def update(self, taskmanager_id, generation_id, key, value, header, metadata):
        self.datasource.update(taskmanager_id, generation_id, key, value, header, metadata)

    def get_dataproduct(self, taskmanager_id, generation_id, key):
        return self.datasource.get_dataproduct(taskmanager_id, generation_id, key)

    def get_dataproducts(self, taskmanager_id, key=None):
        return self.datasource.get_dataproducts(taskmanager_id, key)

    def get_datablock(self, taskmanager_id, generation_id):
        return self.datasource.get_datablock(taskmanager_id, generation_id)

    def get_header(self, taskmanager_id, generation_id, key):
        return self.datasource.get_header(taskmanager_id, generation_id, key)

    def get_metadata(self, taskmanager_id, generation_id, key):
        return self.datasource.get_metadata(taskmanager_id, generation_id, key)

    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id):
        return self.datasource.duplicate_datablock(taskmanager_id, generation_id, new_generation_id)

    def delete_data_older_than(self, days):
        return self.datasource.delete_data_older_than(days)

    def get_schema(self, table=None):
        """Describe the columns of ``table`` (or of every table): see DataSource.get_schema."""
        return _optional(self.datasource, "get_schema")(table)

    def delete(self, taskmanager_id, all_generations=False):
        """Delete the newest generation's products, or every generation's; return the count.

        The task manager row stays, so its sequence_id remains valid.
        """
        return _optional(self.datasource, "delete")(taskmanager_id, all_generations)

    def mark_expired(self, taskmanager_id, generation_id, key, expiry_time):
        """Set the header expiration time (int seconds) of one product; KeyError if absent."""
        return _optional(self.datasource, "mark_expired")(
            taskmanager_id, generation_id, key, expiry_time
        )

    def mark_demented(self, taskmanager_id, keys, generation_id=None):
        """Mark ``keys`` of a generation (default: the newest) as no longer valid.

        Their header expiration time is moved to now (never later than it was), so
        ``DataBlock.is_expired`` reports them expired.  A key that is absent raises
        KeyError and nothing changes.  Returns how many products were marked.
        """
        return _optional(self.datasource, "mark_demented")(taskmanager_id, keys, generation_id)
