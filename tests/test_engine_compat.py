"""What the decision engine's own code and tests rely on, beyond the API listing.

The engine's reading and writing of DataBlock values is written out here from its
documented format (``ENGINE_*`` below), so that a byte differing from the
engine's fails a test. DataSpace-level tests run on both backends.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import pickle
import threading
import time
import zlib

import pytest

from dataspace_client import (
    DataBlock,
    DataSpace,
    DataSpaceConfigurationError,
    Header,
    Metadata,
    PickleRefusedError,
    ProcessingState,
    Reaper,
    State,
    decompress,
    zloads,
)
from dataspace_client.values import decode_value, encode_value
from tests.support.contract import fresh, new_uuid


# -- the engine's value format, as its DataBlock writes and reads it ------------------------
def engine_stored_bytes(value) -> bytes:
    """What the engine's ``DataBlock.put`` stores for ``value``."""
    if isinstance(value, dict):
        wrapper = {"pickled": False, "value": value}
    else:
        wrapper = {"pickled": True, "value": pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)}
    return zlib.compress(str(wrapper).encode("latin1"), 9)


def engine_read(stored: bytes):
    """What the engine's ``DataBlock.__getitem__`` returns for stored bytes."""
    try:
        text = zlib.decompress(stored).decode("latin1")
    except zlib.error:
        text = stored.decode("latin1")
    wrapper = ast.literal_eval(text)
    if wrapper.get("pickled"):
        data = wrapper.get("value")
        try:
            return pickle.loads(zlib.decompress(data))
        except zlib.error:
            return pickle.loads(data)
    return wrapper.get("value")


@dataclasses.dataclass(frozen=True)
class Resource:
    """A non-dict value (module level, so that it pickles)."""

    name: str
    cpus: int


LATIN1_VALUES = [
    {"cpus": 4, "site": "café", "note": "naïve ü ß ½"},
    {"nested": {"b": b"\x00\xff", "t": (1, "é"), "s": {1, 2}, "n": None}},
    {},
    ["a list", "é"],
    "plain text with ç",
    Resource("Zürich", 8),
    42,
]


@pytest.mark.parametrize("value", LATIN1_VALUES, ids=lambda v: type(v).__name__)
def test_values_are_stored_as_the_engines_bytes(value):
    stored = encode_value(value)
    assert stored == engine_stored_bytes(value)
    assert engine_read(stored) == value
    assert decode_value(engine_stored_bytes(value)) == value


def test_text_outside_latin1_is_written_so_that_the_engine_reads_it():
    value = {"zh": "数据", "emoji": "🚀", "mixed": "é\\u20ac'\"", "euro": "€"}
    with pytest.raises(UnicodeEncodeError):
        engine_stored_bytes(value)  # the engine itself cannot store this
    stored = encode_value(value)
    assert engine_read(stored) == value
    assert decode_value(stored) == value


def test_values_written_by_earlier_releases_still_read():
    legacy_dict = {"site": "café", "zh": "数据"}
    stored = zlib.compress(repr(legacy_dict).encode("utf-8"), 9)
    assert decode_value(stored) == legacy_dict
    legacy_pickle = zlib.compress(
        str({"pickled_obj": zlib.compress(pickle.dumps(Resource("x", 1)), 9)}).encode(), 9
    )
    assert decode_value(legacy_pickle) == Resource("x", 1)
    with pytest.raises(PickleRefusedError):
        decode_value(legacy_pickle, allow_pickle=False)


def test_pickled_values_are_refused_both_ways_without_allow_pickle():
    with pytest.raises(PickleRefusedError):
        encode_value(Resource("x", 1), allow_pickle=False)
    with pytest.raises(PickleRefusedError):
        decode_value(engine_stored_bytes(Resource("x", 1)), allow_pickle=False)
    assert decode_value(engine_stored_bytes({"a": 1}), allow_pickle=False) == {"a": 1}


def test_zloads_and_decompress_are_as_lenient_as_the_engines():
    obj = {"a": {"b": "c"}}
    assert zloads(zlib.compress(pickle.dumps(obj))) == obj
    assert zloads(pickle.dumps(obj)) == obj
    assert zloads(pickle.dumps(obj).decode("latin1")) == obj  # a pickle as latin-1 text
    assert ast.literal_eval(decompress(str(obj).encode("latin1"))) == obj  # not compressed
    wrapper = {"pickled": True, "value": zlib.compress(pickle.dumps(obj), 9)}
    assert (
        zloads(ast.literal_eval(decompress(zlib.compress(str(wrapper).encode("latin1"))))["value"])
        == obj
    )


# -- through a DataSpace, on both backends -----------------------------------------------------
def _stored(space: DataSpace, block: DataBlock, key: str) -> bytes:
    return space.get_dataproduct(block.sequence_id, block.generation_id, key)


def test_datablock_reads_what_the_engine_wrote_and_writes_what_it_reads(dataspace):
    block = DataBlock(dataspace, fresh())
    for i, value in enumerate(LATIN1_VALUES):
        key = f"engine{i}"
        dataspace.insert(
            block.sequence_id,
            block.generation_id,
            key,
            engine_stored_bytes(value),
            Header(block.taskmanager_id),
            Metadata(block.sequence_id),
        )
        assert block[key] == value
        mine = f"mine{i}"
        block.put(mine, value, Header(block.taskmanager_id))
        assert _stored(dataspace, block, mine) == engine_stored_bytes(value)
        assert engine_read(_stored(dataspace, block, mine)) == value


def test_store_taskmanager_takes_the_engines_argument_name(dataspace):
    source = dataspace.datasource
    by_name = source.store_taskmanager(name=fresh(), taskmanager_id=new_uuid())
    by_old_name = source.store_taskmanager(taskmanager_name=fresh(), taskmanager_id=new_uuid())
    positional = source.store_taskmanager(fresh(), new_uuid())
    assert by_name < by_old_name < positional
    with pytest.raises(TypeError):
        source.store_taskmanager(name="a", taskmanager_name="b", taskmanager_id=new_uuid())


@pytest.mark.parametrize("days", [0, -5])
def test_delete_data_older_than_raises_the_engines_message(dataspace, days):
    with pytest.raises(ValueError, match="Argument has to be positive, non zero integer"):
        dataspace.delete_data_older_than(days)
    with pytest.raises(ValueError, match="Argument has to be positive, non zero integer"):
        dataspace.datasource.delete_data_older_than(days)


def test_mark_demented_takes_the_engines_argument_order(dataspace):
    block = DataBlock(dataspace, fresh(), generation_id=3)
    far = int(time.time()) + 3600
    for key in ("a", "b"):
        block.put(key, {"k": key}, Header(block.taskmanager_id, expiration_time=far))
    # the engine's DataSpace calls datasource.mark_demented(taskmanager_id, generation_id, keys)
    assert dataspace.datasource.mark_demented(block.sequence_id, 3, ["a"]) == 1
    assert block.is_expired("a") and not block.is_expired("b")
    # and this package's order still works
    assert dataspace.datasource.mark_demented(block.sequence_id, ["b"], 3) == 1
    assert block.is_expired("b")


def test_reset_connections_keeps_the_datasource_working(dataspace):
    block = DataBlock(dataspace, fresh())
    block.put("k", {"v": 1}, Header(block.taskmanager_id))
    dataspace.datasource.reset_connections()
    assert block["k"] == {"v": 1}


# -- any datasource class, as the engine loads it ---------------------------------------------
class NullSource:
    """A datasource that subclasses nothing of this package (like the engine's own)."""

    reaped: list = []
    inserted: list = []

    def __init__(self, config):
        self.config = config

    def close(self):
        pass

    def reset_connections(self):
        pass

    def delete_data_older_than(self, days):
        NullSource.reaped.append(days)

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        NullSource.inserted.append((taskmanager_id, generation_id, key, value))


for _name in (
    "store_taskmanager",
    "get_taskmanager",
    "get_taskmanagers",
    "get_last_generation_id",
    "update",
    "get_dataproduct",
    "get_dataproducts",
    "get_datablock",
    "get_header",
    "get_metadata",
    "duplicate_datablock",
):
    setattr(NullSource, _name, lambda self, *a, **k: None)


class HalfSource:
    def __init__(self, config):
        pass

    def close(self):
        pass


def _config(name: str, **extra) -> dict:
    return {
        "dataspace": {
            "datasource": {"module": __name__, "name": name, "config": {"key": "value"}},
            **extra,
        }
    }


def test_any_datasource_class_with_the_api_is_accepted():
    space = DataSpace(_config("NullSource"))
    assert isinstance(space.datasource, NullSource)
    assert space.datasource.config == {"key": "value"}
    with pytest.raises(NotImplementedError, match="NullSource does not implement delete"):
        space.delete(1)
    with space.producer() as producer:  # no publish(): each write applied at once
        assert producer.insert(1, 1, "k", b"v", {}, {}) is None
        assert producer.pending == 0
    assert NullSource.inserted[-1] == (1, 1, "k", b"v")


def test_a_datasource_class_without_the_api_is_refused_naming_what_lacks():
    with pytest.raises(DataSpaceConfigurationError) as raised:
        DataSpace(_config("HalfSource"))
    message = str(raised.value)
    assert "Invalid dataspace configuration" in message
    assert "store_taskmanager" in message and "get_datablock" in message
    assert "close" not in message.split("lacks", 1)[1]


# -- Reaper.state as the engine's ProcessingState ----------------------------------------------
#: The engine's State: the same names, int values (its class is named State too).
EngineState = enum.Enum(
    "State",
    "BOOT IDLE ACTIVE STEADY SHUTTINGDOWN SHUTDOWN OFFLINE ERROR".split(),
    start=0,
)


@pytest.fixture
def reaper():
    NullSource.reaped = []
    reaper = Reaper(_config("NullSource", retention_interval_in_days=365))
    yield reaper
    if reaper.thread is not None and reaper.thread.is_alive():
        reaper.state.set(State.OFFLINE)
        reaper.thread.join(timeout=2)


def test_reaper_state_has_the_engines_accessors(reaper):
    state = reaper.state
    assert isinstance(state, ProcessingState)
    assert state.get() is State.BOOT
    assert state == State.BOOT and state != State.IDLE
    assert state == EngineState.BOOT  # compared by name with the engine's enum
    assert state.get() == EngineState.BOOT and EngineState.BOOT == state.get()
    assert state.get() in (EngineState.IDLE, EngineState.BOOT)
    assert state.get() != EngineState.IDLE and State.BOOT != EngineState.IDLE
    assert state.probably_running() and not state.should_stop() and not state.inactive()
    with state.lock:
        state.set(EngineState.IDLE)  # the engine's members are taken by name
    assert state.get() is State.IDLE
    with pytest.raises(RuntimeError):
        state.set("IDLE")
    assert state.wait_until(State.IDLE, timeout=0.1)
    assert not state.wait_while(State.IDLE, timeout=0.1)
    assert state.has_value((State.BOOT, State.IDLE))


def test_an_outside_offline_ends_the_loop(reaper):
    reaper.start(delay=90)
    assert reaper.state.get() is State.IDLE
    reaper.state.set(State.OFFLINE)  # how the engine's tests end a reaper
    reaper.thread.join(timeout=2)
    assert not reaper.thread.is_alive()
    assert reaper.state.get() is State.SHUTDOWN
    assert NullSource.reaped == []


def test_reaper_is_active_during_a_reap_and_reaps_on_its_interval(reaper, monkeypatch):
    calls = []

    def slow_delete(self, days):
        calls.append(days)
        time.sleep(0.5)

    monkeypatch.setattr(NullSource, "delete_data_older_than", slow_delete)
    reaper.MIN_SECONDS_BETWEEN_RUNS = 1
    reaper.seconds_between_runs = 1
    reaper.start(delay=0.2)
    assert reaper.state.wait_while(State.IDLE, timeout=5)
    assert reaper.state.get() is State.ACTIVE
    assert reaper.state.wait_while(State.ACTIVE, timeout=5)
    assert reaper.state.wait_until(State.ACTIVE, timeout=5)  # the second run
    assert reaper.state.wait_while(State.ACTIVE, timeout=5)
    reaper.stop()
    assert reaper.state.get() is State.SHUTDOWN
    assert calls[:2] == [365, 365]


def test_a_failing_reap_is_error_and_can_be_started_again(reaper, monkeypatch):
    def fail(self, days):
        raise KeyError("boom")

    monkeypatch.setattr(NullSource, "delete_data_older_than", fail)
    reaper.start()
    assert reaper.state.wait_until(State.ERROR, timeout=5)
    reaper.stop()
    assert reaper.state.get() is State.ERROR
    monkeypatch.undo()
    reaper.start(delay=30)
    assert reaper.state.get() is State.IDLE
    reaper.stop()
    assert reaper.state.get() is State.SHUTDOWN


def test_stop_from_another_thread_while_waiting(reaper):
    reaper.start(delay=60)
    stopper = threading.Thread(target=reaper.stop)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive()
    assert reaper.state.get() is State.SHUTDOWN


# -- what the engine's task manager relies on: found running its own suite --------------
def test_keys_are_read_from_the_store_as_the_engines(dataspace):
    """Another DataBlock (a channel worker in another process, say) puts a key: this
    one sees it, in ``keys()`` and ``in``, as the engine's DataBlock does."""
    first = DataBlock(dataspace, fresh())
    first.put("first", {"n": 1}, Header(first.taskmanager_id))
    second = DataBlock(
        dataspace,
        first.name,
        taskmanager_id=first.taskmanager_id,
        generation_id=first.generation_id,
        sequence_id=first.sequence_id,
    )
    assert second.keys() == ("first",)
    first.put("second", {"n": 2}, Header(first.taskmanager_id))
    assert second.keys() == ("first", "second")
    assert "second" in second
    second.put("first", {"n": 3}, Header(first.taskmanager_id))  # exists: an update
    assert first["first"] == {"n": 3}


def test_a_mapping_that_is_not_a_dict_configures_dataspace_and_reaper(pg_dsn):
    """The engine hands its configuration over as a ``UserDict`` (``ValidConfig``)."""
    from collections import UserDict

    from tests.support.configs import inprocess_config

    config = UserDict(inprocess_config(pg_dsn))
    with DataSpace(config) as space:
        assert space.get_taskmanagers(fresh()) == []
    settings = {**config["dataspace"], "retention_interval_in_days": 365}
    reaper = Reaper(UserDict({"dataspace": UserDict(settings)}))
    assert reaper.retention_interval == 365


def test_processing_state_is_shared_with_a_forked_process():
    """The engine's task manager forks a channel worker that sets the state the parent
    waits on; its ProcessingState lives in shared memory, and so does this one."""
    import multiprocessing
    import os

    state = ProcessingState(State.BOOT)
    pid = os.fork()
    if pid == 0:  # the child: what a channel worker does
        try:
            state.set(State.STEADY)
            state.wait_until(State.OFFLINE, timeout=10)
        finally:
            os._exit(0)
    try:
        assert state.wait_until(State.STEADY, timeout=10), state
        with state.lock:  # held across the processes
            assert state.get() is State.STEADY
        state.set(State.OFFLINE)
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert multiprocessing.active_children() == []
