"""Contract tests of DataBlock, Header, Metadata, ProductRetriever and the value helpers.

DataBlock tests run on both backends through the ``dataspace`` fixture.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import pickle
import random
import time
import uuid
import zlib

import pytest

from dataspace_client import (
    DataBlock,
    DataSpaceError,
    Header,
    InvalidMetadataError,
    Metadata,
    PickleRefusedError,
    ProductRetriever,
    compress,
    decompress,
    zdumps,
    zloads,
)
from tests.support import contract
from tests.support.contract import T0, fresh, new_uuid


@pytest.fixture
def space_factory(backend, request, pg_dsn):
    yield from contract.space_factory(backend, request, pg_dsn)


@dataclasses.dataclass(frozen=True)
class Point:
    """A custom class (module level, so that it pickles)."""

    x: int
    label: str


class Matrix:
    def __init__(self, rows):
        self.rows = [list(r) for r in rows]

    def __eq__(self, other):
        return isinstance(other, Matrix) and other.rows == self.rows


def _stored(space, block, key) -> bytes:
    return space.get_dataproduct(block.sequence_id, block.generation_id, key)


# -- DataBlock construction ------------------------------------------------------------------
def test_new_datablock_makes_uppercase_uuid1_and_stores_taskmanager(dataspace):
    name = fresh()
    block = DataBlock(dataspace, name)
    tm_uuid = block.taskmanager_id
    assert isinstance(tm_uuid, str)
    assert tm_uuid == tm_uuid.upper() and any(c.isalpha() for c in tm_uuid)
    assert len(tm_uuid) == 36
    assert uuid.UUID(tm_uuid).version == 1
    row = dataspace.get_taskmanager(name)
    assert row["taskmanager_id"] == tm_uuid
    assert block.sequence_id == row["sequence_id"]
    assert block.generation_id == 1
    assert block.name == name
    assert block.keys() == ()
    other = DataBlock(dataspace, fresh())
    assert other.taskmanager_id != tm_uuid


def test_datablock_with_given_ids(dataspace):
    name, tm_uuid = fresh(), new_uuid()
    first = DataBlock(dataspace, name, taskmanager_id=tm_uuid, generation_id=5)
    assert (first.taskmanager_id, first.generation_id) == (tm_uuid, 5)
    first.put("k", {"v": 1}, Header(tm_uuid))
    # no generation given: the last generation of that name and id is looked up,
    # and a new task manager row is stored
    second = DataBlock(dataspace, name, taskmanager_id=tm_uuid)
    assert second.generation_id == 5
    assert second.sequence_id > first.sequence_id
    assert dataspace.get_taskmanager(name)["sequence_id"] == second.sequence_id
    # another id of the same name has no products: first generation
    third = DataBlock(dataspace, name, taskmanager_id=new_uuid())
    assert third.generation_id == 1
    # with a sequence_id, no task manager is stored
    before = len(dataspace.get_taskmanagers(name))
    fourth = DataBlock(dataspace, name, tm_uuid, generation_id=5, sequence_id=first.sequence_id)
    assert len(dataspace.get_taskmanagers(name)) == before
    assert fourth.sequence_id == first.sequence_id
    assert fourth["k"] == {"v": 1}
    assert fourth.keys() == ("k",)


# -- put / get ----------------------------------------------------------------------------
def test_put_dict_is_stored_as_is(dataspace):
    block = DataBlock(dataspace, fresh())
    value = {
        "int": 1,
        "float": 2.5,
        "str": "text ' \" \\ 🚀",
        "bytes": b"\x00\xff",
        "list": [1, [2, 3]],
        "tuple": (1, "a"),
        "set": {1, 2},
        "none": None,
        "bool": True,
        "nested": {"a": {"b": {"c": -1}}},
        7: "int key",
    }
    block.put("d", value, Header(block.taskmanager_id))
    assert block["d"] == value
    raw = _stored(dataspace, block, "d")
    # a dict is kept as the engine keeps it: a (compressed) literal wrapper, not pickled
    assert ast.literal_eval(decompress(raw)) == {"pickled": False, "value": value}


@pytest.mark.parametrize(
    "value",
    [
        (1, "two", 3.0),
        {1, 2, 3},
        frozenset({"a"}),
        [1, {"x": 2}],
        "plain string",
        42,
        None,
        Point(3, "p"),
        Matrix([[1, 2], [3, 4]]),
        dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    ],
    ids=lambda v: type(v).__name__,
)
def test_put_non_dict_is_pickled(dataspace, value):
    block = DataBlock(dataspace, fresh())
    block.put("p", value, Header(block.taskmanager_id))
    got = block["p"]
    assert got == value and type(got) is type(value)
    wrapper = ast.literal_eval(decompress(_stored(dataspace, block, "p")))
    assert set(wrapper) == {"pickled", "value"} and wrapper["pickled"] is True
    assert pickle.loads(wrapper["value"]) == value


def test_put_dict_with_non_literal_values_is_refused(dataspace):
    block = DataBlock(dataspace, fresh())
    with pytest.raises(TypeError):
        block.put("bad", {"p": Point(1, "x")}, Header(block.taskmanager_id))
    assert "bad" not in block
    with pytest.raises(KeyError):
        dataspace.get_dataproduct(block.sequence_id, block.generation_id, "bad")


def test_put_existing_key_updates(dataspace):
    block = DataBlock(dataspace, fresh())
    tm = block.taskmanager_id
    block.put("k", {"v": 1}, Header(tm, create_time=T0))
    block.put("k", {"v": 2}, Header(tm, create_time=T0 + 5), Metadata(tm, "END_CYCLE", 1, T0))
    assert block["k"] == {"v": 2}
    assert block.keys() == ("k",)
    assert len(dataspace.get_dataproducts(block.sequence_id)) == 1
    assert block.get_header("k")["create_time"] == T0 + 5
    assert block.get_metadata("k")["state"] == "END_CYCLE"
    # a second DataBlock on the same generation learns the key from the store
    again = DataBlock(dataspace, block.name, tm, block.generation_id, block.sequence_id)
    assert "k" in again
    again.put("k", (3,), Header(tm))
    assert block["k"] == (3,)
    assert len(dataspace.get_dataproducts(block.sequence_id)) == 1


def test_put_without_metadata_makes_new_metadata(dataspace):
    block = DataBlock(dataspace, fresh(), generation_id=4)
    before = int(time.time())
    block.put("k", {"a": 1}, Header(block.taskmanager_id))
    after = int(time.time())
    md = block.get_metadata("k")
    assert md["state"] == "NEW"
    assert md["generation_id"] == 4
    assert md["missed_update_count"] == 0
    assert md["taskmanager_id"] == block.taskmanager_id
    assert before - 2 <= md["generation_time"] <= after + 2


def test_get_and_getitem(dataspace):
    block = DataBlock(dataspace, fresh())
    block.put("k", {"a": 1}, Header(block.taskmanager_id))
    assert block.get("k") == {"a": 1}
    assert block["k"] == {"a": 1}
    with pytest.raises(KeyError):
        block["missing"]
    with pytest.raises(KeyError):
        block.get("missing")
    assert block.get("missing", "fallback") == "fallback"
    assert block.get("k", "fallback") == {"a": 1}


def test_keys_and_contains(dataspace):
    block = DataBlock(dataspace, fresh())
    assert block.keys() == ()
    assert "a" not in block
    for key in ("b", "a", "c"):
        block.put(key, {"k": key}, Header(block.taskmanager_id))
    keys = block.keys()
    assert type(keys) is tuple
    assert keys == ("b", "a", "c")
    assert "a" in block and "c" in block
    assert "d" not in block
    # another generation of the same task manager does not share keys
    other = DataBlock(
        dataspace, block.name, block.taskmanager_id, block.generation_id + 1, block.sequence_id
    )
    assert other.keys() == ()
    assert "a" not in other


def test_str_is_a_dict_literal(dataspace):
    block = DataBlock(dataspace, fresh(), generation_id=3)
    block.put("x", {"n": 1, "s": "it's"}, Header(block.taskmanager_id))
    block.put("y", [1, 2], Header(block.taskmanager_id))
    parsed = ast.literal_eval(str(block))
    assert parsed == {
        "taskmanager_id": block.taskmanager_id,
        "generation_id": 3,
        "sequence_id": block.sequence_id,
        "keys": ("x", "y"),
        "dataproducts": {"x": {"n": 1, "s": "it's"}, "y": [1, 2]},
    }
    empty = ast.literal_eval(str(DataBlock(dataspace, fresh())))
    assert set(empty) == {"taskmanager_id", "generation_id", "sequence_id", "keys", "dataproducts"}
    assert empty["keys"] == () and empty["dataproducts"] == {}


def test_get_dataproducts_decodes_values(dataspace):
    block = DataBlock(dataspace, fresh())
    block.put("d", {"a": 1}, Header(block.taskmanager_id))
    block.put("p", Point(1, "x"), Header(block.taskmanager_id))
    products = block.get_dataproducts()
    assert [(p["key"], p["value"]) for p in products] == [("d", {"a": 1}), ("p", Point(1, "x"))]
    assert all(p["taskmanager_id"] == block.sequence_id for p in products)
    assert block.get_dataproducts("p") == [
        {
            "taskmanager_id": block.sequence_id,
            "generation_id": 1,
            "key": "p",
            "value": Point(1, "x"),
        }
    ]


def test_get_taskmanager_and_store_taskmanager_through_block(dataspace):
    block = DataBlock(dataspace, fresh())
    assert block.get_taskmanager(block.name)["sequence_id"] == block.sequence_id
    assert block.get_taskmanager(block.name, block.taskmanager_id)["name"] == block.name
    seq = block.store_taskmanager(block.name, "OTHER")
    assert type(seq) is int and seq > block.sequence_id
    assert block.get_taskmanager(block.name)["taskmanager_id"] == "OTHER"


# -- duplicate --------------------------------------------------------------------------------
def test_duplicate(dataspace):
    block = DataBlock(dataspace, fresh(), generation_id=2)
    tm = block.taskmanager_id
    block.put("a", {"v": "a"}, Header(tm, creator="ca"), Metadata(tm, "START_BACKUP", 2, T0))
    block.put("b", Point(2, "b"), Header(tm))

    copy = block.duplicate()

    assert isinstance(copy, DataBlock) and copy is not block
    assert copy.generation_id == 2
    assert block.generation_id == 3
    assert copy.sequence_id == block.sequence_id
    assert copy.taskmanager_id == block.taskmanager_id == tm
    assert copy.keys() == block.keys() == ("a", "b")
    assert copy["a"] == block["a"] == {"v": "a"}
    assert copy["b"] == block["b"] == Point(2, "b")
    seq = block.sequence_id
    assert dataspace.get_datablock(seq, 3) == dataspace.get_datablock(seq, 2)
    assert block.get_header("a") == copy.get_header("a")
    assert block.get_header("a")["creator"] == "ca"
    assert copy.get_metadata("a") == Metadata(tm, "START_BACKUP", 2, T0)
    assert block.get_metadata("a") == Metadata(tm, "START_BACKUP", 3, T0)
    assert dataspace.get_last_generation_id(block.name) == 3

    # the generations are now independent
    block.put("a", {"v": "new"}, Header(tm))
    block.put("c", {"v": "c"}, Header(tm))
    assert copy["a"] == {"v": "a"}
    assert "c" not in copy
    with pytest.raises(KeyError):
        copy["c"]
    assert block.keys() == ("a", "b", "c")
    again = block.duplicate()
    assert (again.generation_id, block.generation_id) == (3, 4)
    assert block["c"] == {"v": "c"}


# -- header / metadata round trip ---------------------------------------------------------
def test_get_header_and_metadata_equal_what_was_put(dataspace):
    block = DataBlock(dataspace, fresh(), generation_id=6)
    tm = block.taskmanager_id
    header = Header(
        tm,
        create_time=T0,
        expiration_time=T0 + 60,
        scheduled_create_time=T0 - 1,
        creator="source-x",
        schema_id=17,
    )
    metadata = Metadata(
        tm, state="METADATA_UPDATE", generation_id=6, generation_time=T0, missed_update_count=2
    )
    block.put("k", {"a": 1}, header, metadata)
    got_header, got_metadata = block.get_header("k"), block.get_metadata("k")
    assert isinstance(got_header, Header) and isinstance(got_metadata, Metadata)
    assert got_header == header
    assert got_metadata == metadata
    assert dict(got_header) == dict(header)
    default_header = Header(tm)
    block.put("d", {"b": 2}, default_header)
    assert block.get_header("d") == default_header
    with pytest.raises(KeyError):
        block.get_header("missing")
    with pytest.raises(KeyError):
        block.get_metadata("missing")


# -- expiry ---------------------------------------------------------------------------------
def test_is_expired_and_mark_expired(dataspace):
    block = DataBlock(dataspace, fresh())
    tm = block.taskmanager_id
    assert block.is_expired() is False  # no products
    now = int(time.time())
    block.put("a", {"a": 1}, Header(tm, create_time=now, expiration_time=now + 3600))
    block.put("b", {"b": 1}, Header(tm, create_time=now, expiration_time=now + 3600))
    assert block.is_expired() is False
    assert block.is_expired("a") is False

    dataspace.mark_expired(block.sequence_id, block.generation_id, "b", now - 10)
    assert block.is_expired("b") is True
    assert block.is_expired("a") is False
    assert block.is_expired() is True

    block.mark_expired(now + 7200)
    assert block.is_expired() is False
    assert block.get_header("a")["expiration_time"] == now + 7200
    assert block.get_header("b")["expiration_time"] == now + 7200

    block.mark_expired(time.time() - 1)
    assert block.is_expired("a") is True and block.is_expired("b") is True
    assert block.get_header("a")["expiration_time"] <= int(time.time())
    with pytest.raises(KeyError):
        block.is_expired("missing")


def test_mark_expired_only_touches_current_generation(dataspace):
    block = DataBlock(dataspace, fresh())
    tm = block.taskmanager_id
    far = int(time.time()) + 10**6
    block.put("a", {"a": 1}, Header(tm, expiration_time=far))
    copy = block.duplicate()
    block.mark_expired(100)
    assert block.is_expired("a") is True
    assert copy.is_expired("a") is False
    assert copy.get_header("a")["expiration_time"] == far


def test_mark_demented_makes_keys_expired(dataspace):
    block = DataBlock(dataspace, fresh())
    tm = block.taskmanager_id
    far = int(time.time()) + 10**6
    for key in ("a", "b", "c"):
        block.put(key, {"k": key}, Header(tm, expiration_time=far))
    assert dataspace.mark_demented(block.sequence_id, ["a", "c"]) == 2
    assert block.is_expired("a") is True
    assert block.is_expired("b") is False
    assert block.is_expired("c") is True
    assert block.is_expired() is True


# -- ProductRetriever -------------------------------------------------------------------------
def test_product_retriever(dataspace):
    block = DataBlock(dataspace, fresh())
    block.put("prices", {"spot": 0.1}, Header(block.taskmanager_id))
    retriever = ProductRetriever("prices", "dict", "PriceSource")
    assert retriever(block) == {"spot": 0.1}
    assert retriever.name == "prices"
    assert str(retriever) == (
        "Product retriever for {'name': 'prices', 'type': 'dict', 'creator': 'PriceSource'}"
    )
    with pytest.raises(KeyError):
        ProductRetriever("absent", "dict", "S")(block)


# -- allow_pickle = False -----------------------------------------------------------------------
def test_allow_pickle_false_refuses_pickled_products(dataspace, space_factory):
    trusting = DataBlock(dataspace, fresh())
    tm = trusting.taskmanager_id
    trusting.put("pickled", Point(9, "evil?"), Header(tm))
    trusting.put("plain", {"fine": True}, Header(tm))

    strict_space = space_factory(allow_pickle=False)
    assert strict_space.allow_pickle is False
    strict = DataBlock(
        strict_space, trusting.name, tm, trusting.generation_id, trusting.sequence_id
    )
    with pytest.raises(PickleRefusedError) as info:
        strict["pickled"]
    assert isinstance(info.value, DataSpaceError)
    with pytest.raises(PickleRefusedError):
        strict.get("pickled", "default")
    with pytest.raises(PickleRefusedError):
        strict.get_dataproducts()
    with pytest.raises(PickleRefusedError):
        strict.put("new", (1, 2), Header(tm))
    assert "new" not in trusting.keys() and "new" not in DataBlock(
        dataspace, trusting.name, tm, trusting.generation_id, trusting.sequence_id
    )
    # dicts still work both ways
    assert strict["plain"] == {"fine": True}
    strict.put("another", {"x": [1, 2]}, Header(tm))
    assert trusting["another"] == {"x": [1, 2]}
    # and the trusting space still reads the pickle
    assert trusting["pickled"] == Point(9, "evil?")


def test_allow_pickle_defaults_to_true(dataspace, space_factory):
    assert dataspace.allow_pickle is True
    assert space_factory(allow_pickle=True).allow_pickle is True


def test_undecodable_stored_value_raises_dataspace_error(dataspace):
    block = DataBlock(dataspace, fresh())
    dataspace.insert(
        block.sequence_id,
        block.generation_id,
        "raw",
        b"\x00not zlib",
        dict(Header(block.taskmanager_id)),
        dict(Metadata(block.taskmanager_id)),
    )
    with pytest.raises(DataSpaceError):
        block["raw"]


# -- value sizes through DataBlock --------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 100, 1024 * 1024], ids=["empty", "100B", "1MiB"])
def test_datablock_value_sizes(dataspace, size):
    block = DataBlock(dataspace, fresh())
    tm = block.taskmanager_id
    data = random.Random(size).randbytes(size)
    as_dict = {"payload": data, "size": size}
    block.put("dict", as_dict, Header(tm))
    block.put("pickled", bytearray(data), Header(tm))
    block.put("text", {"s": data.hex()}, Header(tm))
    assert block["dict"] == as_dict
    got = block["pickled"]
    assert type(got) is bytearray and got == data
    assert block["text"]["s"] == data.hex()


# -- Header ---------------------------------------------------------------------------------
def test_header_defaults():
    before = int(time.time())
    header = Header("TM")
    after = int(time.time())
    assert set(header) == Header.required_keys
    assert Header.required_keys == {
        "taskmanager_id",
        "create_time",
        "expiration_time",
        "scheduled_create_time",
        "creator",
        "schema_id",
    }
    assert header["taskmanager_id"] == "TM"
    assert before <= header["create_time"] <= after
    assert header["expiration_time"] == header["create_time"] + 1800
    assert before <= header["scheduled_create_time"] <= after
    assert header["creator"] == "module"
    assert header["schema_id"] is None
    for field in ("create_time", "expiration_time", "scheduled_create_time"):
        assert type(header[field]) is int
    assert Header.default_data_lifetime == 1800
    assert header.is_valid() is True


def test_header_explicit_values_become_ints():
    header = Header("TM", create_time=100.7)
    assert header["create_time"] == 100
    assert header["expiration_time"] == 1900
    header = Header(
        "TM",
        create_time=10.2,
        expiration_time=50.9,
        scheduled_create_time=5.5,
        creator="c",
        schema_id=3,
    )
    assert dict(header) == {
        "taskmanager_id": "TM",
        "create_time": 10,
        "expiration_time": 50,
        "scheduled_create_time": 5,
        "creator": "c",
        "schema_id": 3,
    }
    assert all(
        type(header[f]) is int for f in ("create_time", "expiration_time", "scheduled_create_time")
    )
    assert header == Header("TM", 10, 50, 5, "c", 3)
    assert header != Header("TM", 10, 51, 5, "c", 3)
    del header["creator"]
    assert header.is_valid() is False


# -- Metadata --------------------------------------------------------------------------------
def test_metadata_defaults_and_states():
    before = int(time.time())
    md = Metadata("TM")
    assert set(md) == Metadata.required_keys
    assert md["taskmanager_id"] == "TM"
    assert md["state"] == "NEW"
    assert md["generation_id"] is None
    assert md["missed_update_count"] == 0
    assert type(md["generation_time"]) is int
    assert before <= md["generation_time"] <= int(time.time())
    assert Metadata.valid_states == {"NEW", "START_BACKUP", "METADATA_UPDATE", "END_CYCLE"}
    for state in sorted(Metadata.valid_states):
        assert Metadata("TM", state=state)["state"] == state
    assert Metadata("TM", generation_time=12.9)["generation_time"] == 12


@pytest.mark.parametrize("state", ["BOGUS", "new", "", None, "NEW "])
def test_metadata_invalid_state_raises(state):
    assert issubclass(InvalidMetadataError, Exception)
    with pytest.raises(InvalidMetadataError):
        Metadata("TM", state=state)
    md = Metadata("TM", state="START_BACKUP")
    with pytest.raises(InvalidMetadataError):
        md.set_state(state)
    assert md["state"] == "START_BACKUP"


def test_metadata_set_state():
    md = Metadata("TM")
    for state in ("START_BACKUP", "METADATA_UPDATE", "END_CYCLE", "NEW"):
        md.set_state(state)
        assert md["state"] == state


# -- zdumps / zloads / compress / decompress --------------------------------------------------
OBJECTS = [
    {"a": [1, 2, {"b": None}]},
    (1, 2.5, "three"),
    {1, 2},
    b"\x00\xff" * 100,
    "unicode 🚀 数据",
    Point(1, "p"),
    None,
    list(range(1000)),
]


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: type(o).__name__)
def test_zdumps_zloads_round_trip(obj):
    packed = zdumps(obj)
    assert isinstance(packed, bytes)
    assert pickle.loads(zlib.decompress(packed)) == obj
    assert zloads(packed) == obj
    # an uncompressed pickle is read as well
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        assert zloads(pickle.dumps(obj, protocol)) == obj


def test_zdumps_compresses():
    obj = "x" * 100_000
    assert len(zdumps(obj)) < len(pickle.dumps(obj)) // 10


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: type(o).__name__)
def test_compress_decompress_str_of_object(obj):
    packed = compress(obj)
    assert isinstance(packed, bytes)
    text = decompress(packed)
    assert type(text) is str
    try:
        expected = str(obj).encode("latin-1")
    except UnicodeEncodeError:  # the engine's compress raises here; ours escapes
        assert text == str(obj).encode("latin-1", "backslashreplace").decode("latin-1")
    else:
        assert zlib.decompress(packed) == expected  # the engine's bytes
        assert text == str(obj)


def test_decompress_of_plain_zlib_bytes_and_of_uncompressed_bytes():
    assert decompress(zlib.compress("héllo".encode("latin-1"))) == "héllo"
    # as the engine's: bytes that are not compressed come back decoded as they are
    assert decompress(b"not compressed") == "not compressed"
    assert decompress(str({"a": "é"}).encode("latin-1")) == "{'a': 'é'}"
