"""A DataSpace built before a fork, used in the children; and one dropped without close().

The decision engine builds its DataSpace in the parent and forks a channel worker
per channel (multiprocessing, start method "fork"; the children end with
os._exit). What is checked here, on both backends: a child's calls work at once
(the remote client's I/O thread does not exist in the child: without its own
connection each call would wait its whole timeout), the parent's calls work
during and after the children, the parent keeps its own broker connection and
database sessions (a child closing them on the wire would end them under the
parent), and a DataSpace dropped without close() releases its connection and
threads.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
import traceback
import uuid
import weakref

import psycopg2
import pytest

from dataspace_client import DataBlock, DataSpace, Header, Metadata
from tests import services
from tests.support.configs import inprocess_config, remote_config

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")

#: the remote call timeout here: a child stuck on the parent's connection fails fast
CALL_TIMEOUT = 5.0
#: what a child's first call may take after the fork (it connects anew)
FIRST_CALL_LIMIT = 2.5


# -- helpers ------------------------------------------------------------------------
def _config(backend: str, pg_dsn: str, amqp_url: str, app_id: str | None = None) -> dict:
    if backend == "inprocess":
        return inprocess_config(pg_dsn)
    config = remote_config(amqp_url, timeout=CALL_TIMEOUT)
    if app_id is not None:
        config["dataspace"]["datasource"]["config"]["app_id"] = app_id
    return config


@pytest.fixture
def fork_space(backend, request, pg_dsn, amqp_url):
    """A DataSpace of the test's own on ``backend`` (remote: through the running
    worker pool, with a 5 s call timeout); closed after."""
    if backend == "remote":
        request.getfixturevalue("worker_pool")
    space = DataSpace(_config(backend, pg_dsn, amqp_url))
    yield space
    space.close()


def _run_children(targets: list, timeout: float = 60.0, forked=None) -> list:
    """Run each ``target()`` in a child forked as the engine forks its channel
    workers; return what each returned (a child's exception fails the test).
    ``forked()`` is called once all are forked."""
    pipes, children = [], []
    for target in targets:
        receive, send = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_child_main, args=(target, send), daemon=True)
        child.start()
        send.close()
        pipes.append(receive)
        children.append(child)
    if forked is not None:
        forked()
    results = []
    for child, receive in zip(children, pipes, strict=True):
        if not receive.poll(timeout):
            child.kill()
            pytest.fail(f"child {child.pid} sent nothing within {timeout:g} s")
        outcome, value = receive.recv()
        child.join(10)
        assert outcome == "ok", f"child {child.pid} failed:\n{value}"
        assert child.exitcode == 0
        results.append(value)
    return results


def _child_main(target, send) -> None:
    try:
        send.send(("ok", target()))
    except BaseException:
        send.send(("error", traceback.format_exc()))
        raise


class _Busy:
    """A thread of the parent calling the DataSpace over and over until stopped;
    every call must succeed."""

    def __init__(self, space: DataSpace, seq: int, name: str = "fork-parent"):
        """``name``: a task manager this test stored (the database is shared with
        the other tests of the run, in an order that varies)."""
        self.space, self.seq, self.name = space, seq, name
        self.calls, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="parent-busy", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                assert self.space.get_taskmanager(self.name)["sequence_id"] >= 1
                self.space.get_datablock(self.seq, 1)
                self.calls += 1
            except Exception as exc:  # reported by stop()
                self.errors.append(repr(exc))
                time.sleep(0.05)

    def __enter__(self) -> _Busy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, self.errors[:3]
        assert self.calls > 0


def _backend_pids(space: DataSpace) -> set[int]:
    """The PostgreSQL backend pids of an in-process DataSpace's pooled sessions."""
    return {conn.info.backend_pid for conn in list(space.datasource._pool._opened)}


def _alive(pg_dsn: str, pids: set[int]) -> set[int]:
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),))
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _warm_pool(space: DataSpace, seq: int, threads: int = 4) -> None:
    """Calls from several threads at once, so that several pooled sessions exist."""
    barrier = threading.Barrier(threads)

    def work():
        barrier.wait()
        for _ in range(5):
            space.get_datablock(seq, 1)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)


@contextlib.contextmanager
def _held_at_fork(backend: str, space: DataSpace):
    """Hold, in parent threads, what another thread of the engine may hold at the
    moment of a fork: the datasource's locks, and (in process) a pooled session in
    the middle of a statement. They stay held in the child, which must not need
    them. Yields the function to call once the children are forked: it lets the
    locks go in the parent (the statement runs on)."""
    source = space.datasource
    holding, release = threading.Event(), threading.Event()
    if backend == "remote":
        locks = [source._connect_lock, source._client._state]
        statement = None
    else:
        locks = [source._pool._lock, source._health.lock]
        statement = source._pool.acquire()
    threads = []

    def hold():
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            holding.set()
            release.wait(30)

    if statement is not None:
        before = statement.info.backend_pid
        answered = []

        def run():  # a statement running across the fork
            with statement.cursor() as cur:
                cur.execute("SELECT pg_sleep(1.5), pg_backend_pid()")
                answered.append(cur.fetchone()[1])
            statement.rollback()

        threads.append(threading.Thread(target=run, daemon=True))
    threads.append(threading.Thread(target=hold, daemon=True))
    for thread in threads:
        thread.start()
    assert holding.wait(10)
    time.sleep(0.2)  # the statement is on its way
    try:
        yield release.set
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
        if statement is not None:
            # the session survived the children: same backend, still answering
            assert answered == [before]
            with statement.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                assert cur.fetchone()[0] == before
            statement.rollback()
            source._pool.release(statement)


def _products(space: DataSpace, seq: int, generation: int) -> dict:
    block = DataBlock(space, "-", "-", generation_id=generation, sequence_id=seq)
    return {key: block[key] for key in space.get_datablock(seq, generation)}


def _broker_connections(fragment: str) -> int | None:
    """Broker connections whose client properties mention ``fragment`` (None
    without rabbitmqctl)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return sum(fragment in line for line in listing.splitlines())


# -- 1. children use the parent's DataSpace, the parent carries on ------------------
def test_forked_children_use_the_parents_dataspace_while_the_parent_carries_on(
    backend, fork_space, pg_dsn
):
    space = fork_space
    tm = str(uuid.uuid4())
    seq = space.store_taskmanager("fork-parent", tm)
    block = DataBlock(space, "fork-parent", tm, sequence_id=seq)
    block.put("before", {"made": "in the parent"}, Header(tm))
    with space.producer() as producer:  # fire-and-forget writes in the parent too
        producer.insert(seq, 1, "published", b"by the parent", Header(tm), Metadata(tm))
    if backend == "inprocess":
        _warm_pool(space, seq)
        sessions = _backend_pids(space)
        assert len(sessions) >= 2
    else:
        parent_client = space.datasource._client
        attempts = parent_client._attempts

    def child(index: int):
        def run():
            started = time.monotonic()
            assert space.datasource.pending == 0  # the parent's writes are not the child's
            assert block["before"] == {"made": "in the parent"}
            first = time.monotonic() - started
            if backend == "remote":
                client = space.datasource._client
                assert client is not parent_client and not client.forked
            key = f"child{index}"
            block.put(key, {"pid": os.getpid(), "index": index}, Header(tm, creator=key))
            with space.producer() as producer:
                for n in range(20):
                    producer.insert(
                        seq, 1, f"{key}-published-{n}", b"%d" % n, Header(tm), Metadata(tm)
                    )
            assert block[key] == {"pid": os.getpid(), "index": index}
            return {"first_call": first, "pid": os.getpid(), "total": time.monotonic() - started}

        return run

    with _Busy(space, seq) as busy, _held_at_fork(backend, space) as let_go:
        results = _run_children([child(0), child(1)], forked=let_go)
        calls_during = busy.calls

    assert calls_during > 0
    for result in results:
        assert result["first_call"] < FIRST_CALL_LIMIT, results
        assert result["total"] < CALL_TIMEOUT, results
    # the parent, after the children: its calls work, and see the children's writes
    for index, result in enumerate(results):
        assert block[f"child{index}"] == {"pid": result["pid"], "index": index}
    space.producer().insert(seq, 1, "after", b"after the children", Header(tm), Metadata(tm))
    space.datasource.flush(CALL_TIMEOUT)
    # fire-and-forget writes are confirmed by the broker; a worker applies them soon after
    published = {f"child{i}-published-{n}" for i in range(2) for n in range(20)} | {"after"}
    stored, _ = services.poll(lambda: published <= set(space.get_datablock(seq, 1)), 30)
    assert stored, published - set(space.get_datablock(seq, 1))
    assert space.get_dataproduct(seq, 1, "after") == b"after the children"
    if backend == "inprocess":
        # no session of the parent's was ended by a child: same backends, all alive
        assert sessions <= _backend_pids(space)
        assert _alive(pg_dsn, sessions) == sessions
    else:
        # the parent's own connection, never closed nor reconnected
        assert space.datasource._client is parent_client
        assert parent_client._attempts == attempts and parent_client._open


# -- 2. the engine's channel loop -----------------------------------------------------
CHANNELS = 2
CYCLES = 5


def _expected(channel: int, cycle: int) -> dict:
    return {"channel": channel, "cycle": cycle, "cpus": 10 * cycle + channel}


def test_channel_workers_forked_from_the_task_manager_store_every_cycle(backend, fork_space):
    space = fork_space
    # the task manager, built in the parent as the engine's TaskManager is
    blocks = [DataBlock(space, f"channel{c}", str(uuid.uuid4())) for c in range(CHANNELS)]
    first_generation = {c: b.generation_id for c, b in enumerate(blocks)}

    def channel_worker(channel: int):
        def run():
            block = blocks[channel]
            for cycle in range(CYCLES):
                if cycle:
                    block.duplicate()  # the next cycle's generation, from the last one
                # source
                source = Header(block.taskmanager_id, creator="source")
                block.put("resources", _expected(channel, cycle), source)
                block.put("jobs", [cycle, channel, "pickled"], source)
                # transform: read the source's products back, put a derived one
                resources, jobs = block["resources"], block["jobs"]
                derived = {"total": resources["cpus"] + jobs[0] + jobs[1], "cycle": cycle}
                block.put("derived", derived, Header(block.taskmanager_id, creator="transform"))
            return block.generation_id

        return run

    with _Busy(space, blocks[0].sequence_id, "channel0"):
        last = _run_children([channel_worker(c) for c in range(CHANNELS)])

    for channel, block in enumerate(blocks):
        assert last[channel] == first_generation[channel] + CYCLES - 1
        for cycle in range(CYCLES):
            generation = first_generation[channel] + cycle
            products = _products(space, block.sequence_id, generation)
            assert products == {
                "resources": _expected(channel, cycle),
                "jobs": [cycle, channel, "pickled"],
                "derived": {"total": 11 * cycle + 2 * channel, "cycle": cycle},
            }, (channel, cycle)
            stored = DataBlock(
                space, "-", "-", generation_id=generation, sequence_id=block.sequence_id
            )
            assert stored.get_header("derived")["creator"] == "transform"


# -- 3. a dropped DataSpace releases what it holds -------------------------------------
def test_a_dropped_remote_dataspace_closes_its_connection_and_thread(worker_pool, amqp_url):
    app_id = f"dataspace-tests-drop-{uuid.uuid4().hex[:8]}"
    space = DataSpace(_config("remote", "", amqp_url, app_id))
    tm = str(uuid.uuid4())
    seq = space.store_taskmanager("dropped", tm)
    producer = space.producer()
    for n in range(200):  # unconfirmed when dropped: the finalizer flushes them
        producer.insert(seq, 1, f"k{n}", b"%d" % n, Header(tm), Metadata(tm))
    client = space.datasource._client
    thread, connection = client._thread, client._connection
    source = weakref.ref(space.datasource)
    assert thread.is_alive() and _broker_connections(app_id) in (1, None)

    del space, producer
    gc.collect()

    assert source() is None
    thread.join(15)
    assert not thread.is_alive()
    assert thread not in threading.enumerate()
    assert connection.is_closed
    if _broker_connections(app_id) is not None:
        gone, _ = services.poll(lambda: _broker_connections(app_id) == 0, 30, pause=0.5)
        assert gone, "the broker still lists the dropped client's connection"
    with DataSpace(remote_config(amqp_url)) as reader:
        block, _ = services.poll(lambda: len(reader.get_datablock(seq, 1)) == 200 or None, 30)
        assert block, "the writes published before the drop were not all stored"


def test_a_dropped_remote_dataspace_says_how_many_writes_were_left(worker_pool, amqp_url, caplog):
    space = DataSpace(remote_config(amqp_url, timeout=1))
    tm = str(uuid.uuid4())
    seq = space.store_taskmanager("dropped-unflushed", tm)
    client = space.datasource._client
    thread = client._thread
    # the I/O thread busy until the client is closed: nothing published is confirmed
    # within the flush's timeout, and the count is taken before closing lets it run on
    released = threading.Event()
    close = client.close
    client.close = lambda: (released.set(), close())
    client._connection.ioloop.add_callback_threadsafe(lambda: released.wait(15))
    producer = space.producer()
    for n in range(7):
        producer.insert(seq, 1, f"k{n}", b"%d" % n, Header(tm), Metadata(tm))
    del client
    with caplog.at_level(logging.WARNING, logger="dataspace_client.remote"):
        del space, producer
        gc.collect()
    thread.join(15)
    assert not thread.is_alive()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "dropped without close()" in warnings[0] and "7 fire-and-forget writes" in warnings[0]
    assert "\n" not in warnings[0]


def test_a_dropped_inprocess_dataspace_ends_its_sessions(pg_dsn):
    space = DataSpace(inprocess_config(pg_dsn))
    seq = space.store_taskmanager("dropped", str(uuid.uuid4()))
    _warm_pool(space, seq)
    assert space.datasource.ping()
    sessions = _backend_pids(space) | {space.datasource._health.conn.info.backend_pid}
    assert len(sessions) >= 3 and _alive(pg_dsn, sessions) == sessions
    source = weakref.ref(space.datasource)

    del space
    gc.collect()

    assert source() is None
    gone, _ = services.poll(lambda: not _alive(pg_dsn, sessions), 10)
    assert gone, f"sessions of the dropped DataSpace left: {_alive(pg_dsn, sessions)}"


# -- 4. reset_connections() in a child ------------------------------------------------
def test_reset_connections_in_a_child_leaves_the_parent_alone(backend, fork_space, pg_dsn):
    space = fork_space
    tm = str(uuid.uuid4())
    seq = space.store_taskmanager("fork-parent", tm)
    space.insert(seq, 1, "parent", b"p", Header(tm), Metadata(tm))
    if backend == "inprocess":
        _warm_pool(space, seq)
        sessions = _backend_pids(space)
    else:
        parent_client = space.datasource._client
        attempts = parent_client._attempts

    def child():
        started = time.monotonic()
        # what the engine's DataSourceLoader does with a cached datasource
        space.datasource.reset_connections()
        assert space.get_dataproduct(seq, 1, "parent") == b"p"
        space.insert(seq, 1, "child", b"c", Header(tm), Metadata(tm))
        space.datasource.reset_connections()  # a second time: now the child's own
        assert space.get_dataproduct(seq, 1, "child") == b"c"
        if backend == "inprocess":
            own = _backend_pids(space)
            assert own and not own & sessions
        else:
            assert space.datasource._client is not parent_client
        space.close()  # the child's own connections only
        return time.monotonic() - started

    with _Busy(space, seq):
        (took,) = _run_children([child])
    assert took < CALL_TIMEOUT
    assert space.get_dataproduct(seq, 1, "child") == b"c"
    if backend == "inprocess":
        assert sessions <= _backend_pids(space)
        assert _alive(pg_dsn, sessions) == sessions
    else:
        assert space.datasource._client is parent_client
        assert parent_client._attempts == attempts and parent_client._open
