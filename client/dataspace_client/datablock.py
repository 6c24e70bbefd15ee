"""DataBlock, Header, Metadata and ProductRetriever: the decision engine's view of
one generation of one task manager's products."""

from __future__ import annotations

import threading
import time
import uuid
from collections import UserDict
from typing import TYPE_CHECKING, Any

from dataspace_core.errors import DataSpaceExistsError, InvalidMetadataError

from .values import compress, decode_value, decompress, encode_value, zdumps, zloads

if TYPE_CHECKING:
    from .dataspace import DataSpace

__all__ = [
    "DataBlock",
    "Header",
    "InvalidMetadataError",
    "Metadata",
    "ProductRetriever",
    "compress",
    "decompress",
    "zdumps",
    "zloads",
]

FIRST_GENERATION = 1


class Header(UserDict):
    """What a product is, who made it and until when it is valid (times in int seconds)."""

    default_data_lifetime = 1800
    required_keys = {
        "taskmanager_id",
        "create_time",
        "expiration_time",
        "scheduled_create_time",
        "creator",
        "schema_id",
    }

    def __init__(
        self,
        taskmanager_id,
        create_time=None,
        expiration_time=None,
        scheduled_create_time=None,
        creator="module",
        schema_id=None,
    ):
        super().__init__()
        now = time.time()
        if create_time is None:
            create_time = now
        if expiration_time is None:
            expiration_time = create_time + self.default_data_lifetime
        if scheduled_create_time is None:
            scheduled_create_time = now
        self.data = {
            "taskmanager_id": taskmanager_id,
            "create_time": int(create_time),
            "expiration_time": int(expiration_time),
            "scheduled_create_time": int(scheduled_create_time),
            "creator": creator,
            "schema_id": schema_id,
        }

    def is_valid(self) -> bool:
        """Check that the Header has the minimum required information."""
        return self.required_keys.issubset(self.data)


class Metadata(UserDict):
    """The state of a product within its generation."""

    valid_states = {"NEW", "START_BACKUP", "METADATA_UPDATE", "END_CYCLE"}
    required_keys = {
        "taskmanager_id",
        "state",
        "generation_id",
        "generation_time",
        "missed_update_count",
    }

    def __init__(
        self,
        taskmanager_id,
        state="NEW",
        generation_id=None,
        generation_time=None,
        missed_update_count=0,
    ):
        super().__init__()
        self._check_state(state)
        if generation_time is None:
            generation_time = time.time()
        self.data = {
            "taskmanager_id": taskmanager_id,
            "state": state,
            "generation_id": generation_id,
            "generation_time": int(generation_time),
            "missed_update_count": missed_update_count,
        }

    @classmethod
    def _check_state(cls, state) -> None:
        if state not in cls.valid_states:
            raise InvalidMetadataError(f"Invalid Metadata state: {state!r}")

    def set_state(self, state) -> None:
        """Set the state for the Metadata."""
        self._check_state(state)
        self.data["state"] = state


class ProductRetriever:
    """A callable that fetches one named product from a DataBlock."""

    def __init__(self, product_name, product_type, product_source):
        self.name = product_name
        self.type = product_type
        self.creator = product_source

    def __call__(self, datablock: DataBlock):
        return datablock[self.name]

    def __str__(self):
        fields = {"name": self.name, "type": self.type, "creator": self.creator}
        return f"Product retriever for {fields}"


class DataBlock:
    """One generation of one task manager's products, read and written through a DataSpace.

    Values are encoded as the original did (see ``dataspace_client.values``):
    dicts as literals, anything else pickled.
    """

    def __init__(
        self,
        dataspace: DataSpace,
        name: str,
        taskmanager_id: str | None = None,
        generation_id: int | None = None,
        sequence_id: int | None = None,
    ):
        self.dataspace = dataspace
        self.name = name
        self.lock = threading.RLock()
        self.taskmanager_id = taskmanager_id or str(uuid.uuid1()).upper()
        if sequence_id is None:
            sequence_id = dataspace.store_taskmanager(name, self.taskmanager_id)
        self.sequence_id = sequence_id
        if generation_id is None:
            try:
                generation_id = dataspace.get_last_generation_id(name, self.taskmanager_id)
            except KeyError:
                generation_id = FIRST_GENERATION
        self.generation_id = generation_id

    # -- keys -----------------------------------------------------------------
    def keys(self) -> tuple[str, ...]:
        """The generation's keys, read from the store at each call (as the engine's:
        another DataBlock, process or producer may have put some since)."""
        with self.lock:
            return tuple(self.dataspace.get_datablock(self.sequence_id, self.generation_id))

    def __contains__(self, key) -> bool:
        return key in self.keys()

    # -- values ---------------------------------------------------------------
    @property
    def _allow_pickle(self) -> bool:
        return getattr(self.dataspace, "allow_pickle", True)

    def put(self, key, value, header, metadata=None) -> None:
        """Put data into the DataBlock (insert, or update a key already present)."""
        self._setitem(key, value, header, metadata)

    def _setitem(self, key, value, header, metadata=None) -> None:
        """Store a product with its header and metadata."""
        stored = encode_value(value, self._allow_pickle)
        if metadata is None:
            metadata = Metadata(self.taskmanager_id, generation_id=self.generation_id)
        with self.lock:  # insert, or update what exists: no read of every key first
            try:
                self._insert(key, stored, header, metadata)
            except DataSpaceExistsError:
                self._update(key, stored, header, metadata)

    def _insert(self, key, stored, header, metadata) -> None:
        self.dataspace.insert(self.sequence_id, self.generation_id, key, stored, header, metadata)

    def _update(self, key, stored, header, metadata) -> None:
        self.dataspace.update(self.sequence_id, self.generation_id, key, stored, header, metadata)

    def __setitem__(self, key, value):
        raise TypeError("use DataBlock.put(key, value, header, metadata=None)")

    def __getitem__(self, key):
        stored = self.dataspace.get_dataproduct(self.sequence_id, self.generation_id, key)
        return decode_value(stored, self._allow_pickle)

    def get(self, key, default=None):
        """Return the value of ``key``; missing raises KeyError unless a default is given."""
        try:
            return self[key]
        except KeyError:
            if default is None:
                raise
            return default

    def get_dataproducts(self, key=None) -> list[dict[str, Any]]:
        """Every product of this task manager (all generations), values decoded."""
        products = self.dataspace.get_dataproducts(self.sequence_id, key)
        for product in products:
            product["value"] = decode_value(product["value"], self._allow_pickle)
        return products

    def get_header(self, key) -> Header:
        """Return the Header stored with ``key``."""
        row = self.dataspace.get_header(self.sequence_id, self.generation_id, key)
        return Header(
            row[0],
            create_time=row[4],
            expiration_time=row[5],
            scheduled_create_time=row[6],
            creator=row[7],
            schema_id=row[8],
        )

    def get_metadata(self, key) -> Metadata:
        """Return the Metadata stored with ``key``."""
        row = self.dataspace.get_metadata(self.sequence_id, self.generation_id, key)
        return Metadata(
            row[0],
            state=row[4],
            generation_id=row[2],
            generation_time=row[5],
            missed_update_count=row[6],
        )

    # -- task managers --------------------------------------------------------
    def get_taskmanager(self, taskmanager_name, taskmanager_id=None) -> dict:
        """Retrieve a TaskManager row as a dict (see DataSpace.get_taskmanager)."""
        return self.dataspace.get_taskmanager(taskmanager_name, taskmanager_id)

    def store_taskmanager(self, taskmanager_name, taskmanager_id) -> int:
        """Persist a TaskManager and return its sequence number."""
        return self.dataspace.store_taskmanager(taskmanager_name, taskmanager_id)

    # -- generations and expiry ---------------------------------------------
    def duplicate(self) -> DataBlock:
        """Return a copy holding the current generation and move this block to the next one.

        The products of the current generation are copied to generation + 1 in one
        transaction, so the store never shows half a generation.
        """
        with self.lock:
            copy = DataBlock(
                self.dataspace,
                self.name,
                taskmanager_id=self.taskmanager_id,
                generation_id=self.generation_id,
                sequence_id=self.sequence_id,
            )
            new_generation = self.generation_id + 1
            self.dataspace.duplicate_datablock(self.sequence_id, self.generation_id, new_generation)
            self.generation_id = new_generation
            return copy

    def mark_expired(self, expiration_time) -> None:
        """Set the expiration time of every product of this generation.

        A time at or before now makes them expired at once.
        """
        for key in self.keys():
            self.dataspace.mark_expired(
                self.sequence_id, self.generation_id, key, int(expiration_time)
            )

    def is_expired(self, key=None) -> bool:
        """Whether ``key`` (or, with no key, any product of this generation) is expired."""
        now = time.time()
        keys = [key] if key is not None else self.keys()
        for k in keys:
            row = self.dataspace.get_header(self.sequence_id, self.generation_id, k)
            if row[5] <= now:
                return True
        return False

    def __str__(self):
        products = self.dataspace.get_datablock(self.sequence_id, self.generation_id)
        return str(
            {
                "taskmanager_id": self.taskmanager_id,
                "generation_id": self.generation_id,
                "sequence_id": self.sequence_id,
                "keys": tuple(products),
                "dataproducts": {
                    k: decode_value(v, self._allow_pickle) for k, v in products.items()
                },
            }
        )

    __repr__ = __str__
