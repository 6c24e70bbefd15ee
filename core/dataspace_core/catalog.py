"""Every operation of the service, described once.

One ``OperationSpec`` per operation says everything the code needs to know
about it: its parameters in call order and the check of each, whether it
writes, how it is routed through the ordering lanes, whether its reply is known
before it runs, which client accounts may send it, where it appears in the
programming interface, and how its bytes and its result travel. Everything
else is derived from ``CATALOG``:

- ``validate.SIGNATURES`` and ``validate.check`` (the argument checks);
- ``protocol.OPERATIONS`` (the wire: routing keys, lanes, codecs);
- ``datasource.REQUIRED_METHODS`` and ``producer.WRITES``;
- in the worker: ``queries.RETURN_NOTHING`` and the broker accounts' topic
  permissions (``definitions.READ_OPS``, ``WRITE_OPS``, ``DELETE_OPS``).

The methods themselves (``DataSource``, ``RemoteDataSource``,
``PostgresDataSource``, ``DataSpace``, ``Producer``) stay written out, because
a method with real parameters is what a reader and an IDE want to see;
``tests/test_operation_table.py`` checks each against this table. docs/protocol.md
("Adding an operation") says what a new operation takes.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import checks
from .checks import blob, days, generation_id, header, key, keys, metadata, name, sequence_id
from .checks import taskmanager_uuid as uuid

#: value -> normalized value; raises TypeError or ValueError
Check = Callable[[Any], Any]
#: bytes -> what stands for them in a reply's JSON (a frame reference, or base64)
Pack = Callable[[bytes], Any]
#: the reverse, on the client
Unpack = Callable[[Any], bytes]


# -- parameter checks beyond the plain value checks --------------------------------
def optional(check: Check) -> Check:
    """``check``, or None passed through."""
    return lambda value: None if value is None else check(value)


def _expiry(value: Any) -> int:
    return checks.whole_seconds(value, "expiry_time")


def _datestamp(value: Any):
    return checks.moment(value, "datestamp")


def _start(value: Any):
    return checks.moment(value, "start_time")


def _end(value: Any):
    return checks.moment(value, "end_time")


def _all_generations(value: Any) -> bool:
    return checks.flag(value, "all_generations")


def _table(value: Any):
    return checks.table(value, checks.TABLES)


# -- result codecs: how a result's bytes travel (worker encodes, client decodes) -----
def _same(value: Any, _codec=None) -> Any:
    return value


def _value(value: Any, codec) -> Any:
    return codec(value)


def _products(products: list[dict], codec) -> list[dict]:
    return [{**p, "value": codec(p["value"])} for p in products]


def _block(block: dict, codec) -> dict:
    return {k: codec(v) for k, v in block.items()}


def _decode_taskmanager(row: dict, _unpack=None) -> dict:
    return {**row, "datestamp": _dt.datetime.fromisoformat(row["datestamp"])}


def _decode_taskmanagers(rows: list[dict], _unpack=None) -> list[dict]:
    return [_decode_taskmanager(r) for r in rows]


def _to_tuple(value: list, _unpack=None) -> tuple:
    return tuple(value)


# -- who may send it: the client accounts of definitions.py ------------------------
#: every client account may read
READERS = frozenset({"reader", "writer", "maintainer"})
#: data a decision engine or producer writes
WRITER = frozenset({"writer"})
#: deletes, schema and retention: the maintainer's
MAINTAINER = frozenset({"maintainer"})

#: the argument that names the task manager by its ``sequence_id``: ordering lanes route by it
BY_TASKMANAGER = "taskmanager_id"


@dataclass(frozen=True, eq=False)
class OperationSpec:
    """One operation, as every part of the code sees it (one object per operation:
    compared and hashed by identity)."""

    name: str
    #: parameter -> check, in call order (the wire's names)
    checks: Mapping[str, Check]
    #: changes data: needs a message_id (its idempotency key) and a writing account
    write: bool
    #: the client accounts (definitions.py roles) whose topic permissions let it through
    callers: frozenset[str]
    #: the argument ordering lanes route by (a sequence_id), or None: never by lane
    #: (it names a task manager by its UUID, or many task managers, or none)
    lane_argument: str | None = None
    #: returns None: its reply is known before it runs, so a batch need not record it
    returns_nothing: bool = False
    #: False for work that commits in many short transactions of its own (a reap): run
    #: as a plain call, outside the idempotency record
    transactional: bool = True
    #: served by the reaper's queue (routing key ``admin.reap``), not the request queue;
    #: a worker's maintenance job: the DataSource base class and DataSpace lack it
    by_reaper: bool = False
    #: in the decision engine's own DataSource API: a datasource class must have it
    #: (``datasource.REQUIRED_METHODS``)
    engine_api: bool = False
    #: a ``DataSpace`` method (through ``_optional`` unless ``engine_api``)
    on_dataspace: bool = True
    #: a ``Producer`` may send it without waiting for its reply
    fire_and_forget: bool = False
    #: a method's own name for a parameter where the engine's API names it otherwise
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: parameters whose value is bytes (framed after the JSON on the wire)
    binary: tuple[str, ...] = ()
    #: worker side: (result, pack) -> JSON-able
    encode_result: Callable[[Any, Pack], Any] = _same
    #: client side: (JSON, unpack) -> result
    decode_result: Callable[[Any, Unpack], Any] = _same

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter names in call order, as they travel."""
        return tuple(self.checks)

    @property
    def method_params(self) -> tuple[str, ...]:
        """Parameter names in call order, as the methods name them."""
        return tuple(self.aliases.get(p, p) for p in self.checks)


_PRODUCT = {"taskmanager_id": sequence_id, "generation_id": generation_id, "key": key}
_WRITE = {**_PRODUCT, "value": blob, "header": header, "metadata": metadata}
_NAMED = {"taskmanager_name": name, "taskmanager_id": optional(uuid)}


def _read(name: str, params: dict, **facts) -> OperationSpec:
    return OperationSpec(name, params, write=False, callers=READERS, engine_api=True, **facts)


_SPECS = (
    OperationSpec(
        "store_taskmanager",
        {"taskmanager_name": name, "taskmanager_id": uuid, "datestamp": _datestamp},
        write=True,
        callers=WRITER,
        engine_api=True,
        aliases={"taskmanager_name": "name"},
    ),
    _read("get_taskmanager", _NAMED, decode_result=_decode_taskmanager),
    _read(
        "get_taskmanagers",
        {"taskmanager_name": optional(name), "start_time": _start, "end_time": _end},
        decode_result=_decode_taskmanagers,
    ),
    _read("get_last_generation_id", _NAMED),
    OperationSpec(
        "insert",
        _WRITE,
        write=True,
        callers=WRITER,
        lane_argument=BY_TASKMANAGER,
        returns_nothing=True,
        engine_api=True,
        fire_and_forget=True,
        binary=("value",),
    ),
    OperationSpec(
        "update",
        _WRITE,
        write=True,
        callers=WRITER,
        lane_argument=BY_TASKMANAGER,
        returns_nothing=True,
        engine_api=True,
        fire_and_forget=True,
        binary=("value",),
    ),
    _read(
        "get_dataproduct",
        _PRODUCT,
        lane_argument=BY_TASKMANAGER,
        encode_result=_value,
        decode_result=_value,
    ),
    _read(
        "get_dataproducts",
        {"taskmanager_id": sequence_id, "key": optional(key)},
        lane_argument=BY_TASKMANAGER,
        encode_result=_products,
        decode_result=_products,
    ),
    _read(
        "get_datablock",
        {"taskmanager_id": sequence_id, "generation_id": generation_id},
        lane_argument=BY_TASKMANAGER,
        encode_result=_block,
        decode_result=_block,
    ),
    _read("get_header", _PRODUCT, lane_argument=BY_TASKMANAGER, decode_result=_to_tuple),
    _read("get_metadata", _PRODUCT, lane_argument=BY_TASKMANAGER, decode_result=_to_tuple),
    OperationSpec(
        "duplicate_datablock",
        {
            "taskmanager_id": sequence_id,
            "generation_id": generation_id,
            "new_generation_id": generation_id,
        },
        write=True,
        callers=WRITER,
        lane_argument=BY_TASKMANAGER,
        returns_nothing=True,
        engine_api=True,
        fire_and_forget=True,
    ),
    OperationSpec(
        "delete_data_older_than",
        {"days": days},
        write=True,
        callers=MAINTAINER,
        engine_api=True,
    ),
    OperationSpec(
        "delete",
        {"taskmanager_id": sequence_id, "all_generations": _all_generations},
        write=True,
        callers=MAINTAINER,
        lane_argument=BY_TASKMANAGER,
        fire_and_forget=True,
    ),
    OperationSpec(
        "mark_expired",
        {**_PRODUCT, "expiry_time": _expiry},
        write=True,
        callers=WRITER,
        lane_argument=BY_TASKMANAGER,
        returns_nothing=True,
        fire_and_forget=True,
    ),
    OperationSpec(
        "mark_demented",
        {"taskmanager_id": sequence_id, "keys": keys, "generation_id": optional(generation_id)},
        write=True,
        callers=WRITER,
        lane_argument=BY_TASKMANAGER,
        fire_and_forget=True,
    ),
    OperationSpec("get_schema", {"table": _table}, write=False, callers=READERS),
    OperationSpec("create_tables", {}, write=True, callers=MAINTAINER, on_dataspace=False),
    OperationSpec(
        "reap",
        {"days": days},
        write=True,
        callers=MAINTAINER,
        transactional=False,
        by_reaper=True,
        on_dataspace=False,
    ),
)

#: operation name -> its description, in the order the API documents them
CATALOG: Mapping[str, OperationSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def named(predicate: Callable[[OperationSpec], bool]) -> tuple[str, ...]:
    """The names of the operations for which ``predicate`` holds, in catalog order."""
    return tuple(name for name, spec in CATALOG.items() if predicate(spec))


#: operations whose result is None: their reply is known before they run
RETURN_NOTHING = frozenset(named(lambda spec: spec.returns_nothing))
