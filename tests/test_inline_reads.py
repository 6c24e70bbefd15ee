"""Fast reads answered on the worker's I/O thread (dataspace_worker.inline_reads):
the plain ones run there, the rest and whatever fails there go to the database
thread, and the sessions come back after they are killed."""

from __future__ import annotations

import os
import threading
import time

import psycopg2
import pytest

from dataspace_client import DataSpace
from dataspace_worker import queries
from tests.support.configs import remote_config
from tests.support.contract import fresh, header, metadata, new_uuid

pytestmark = pytest.mark.timeout(90)


def _wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def served(own_vhost, pool_factory):
    """(a worker pool with reads on its I/O thread, a client, a task manager id)."""
    pool = pool_factory(own_vhost, consumers=2, pool_size=6)
    assert pool.inline is not None
    assert _wait_for(lambda: len(pool.inline._idle) == 2), "the sessions did not open"
    space = DataSpace(remote_config(own_vhost, timeout=20))
    try:
        yield pool, space, space.store_taskmanager(fresh("inline"), new_uuid())
    finally:
        space.close()


def test_plain_reads_are_answered_on_the_io_thread(served):
    pool, space, tm = served
    values = {f"k{i}": os.urandom(50 + i) for i in range(5)}
    for key, value in values.items():
        space.insert(tm, 1, key, value, header(), metadata())
    before = pool.inline.handled

    assert {k: space.get_dataproduct(tm, 1, k) for k in values} == values
    assert space.get_datablock(tm, 1) == values
    with pytest.raises(KeyError, match="no product 'missing'"):
        space.get_dataproduct(tm, 1, "missing")
    assert space.get_datablock(tm, 2) == {}
    with pytest.raises(KeyError):
        space.get_dataproduct(tm, -(2**63), "k0")

    assert pool.inline.handled - before == len(values) + 4
    assert pool.inline.pending == 0


def test_a_large_value_and_other_reads_go_to_the_database_thread(served):
    pool, space, tm = served
    large = os.urandom(queries.COPY_FROM_BYTES + 1)
    space.insert(tm, 1, "large", large, header(), metadata())
    before = pool.inline.handled

    assert space.get_dataproduct(tm, 1, "large") == large  # by COPY, on the thread
    assert space.get_header(tm, 1, "large")[2] == 1  # not one of the inline reads
    small = {f"s{i}": b"v" for i in range(3)}
    for key, value in small.items():
        space.insert(tm, 2, key, value, header(), metadata())
    assert space.get_datablock(tm, 2) == small  # inline: a few bytes
    assert space.get_datablock(tm, 1) == {"large": large}  # over the bound: on the thread

    assert pool.inline.handled == before + 1
    assert pool.inline.pending == 0 and len(pool.inline._idle) == 2


def test_reads_go_on_while_the_sessions_are_killed_and_opened_again(served, pg_dsn):
    """Killing the I/O thread's sessions under a load of reads: every read is
    answered (those on a killed session again by the database thread), and the
    sessions are opened again."""
    pool, space, tm = served
    space.insert(tm, 1, "k", b"value", header(), metadata())
    errors: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                assert space.get_dataproduct(tm, 1, "k") == b"value"
                answered[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        admin = psycopg2.connect(pg_dsn)
        admin.autocommit = True
        try:
            for _ in range(3):
                time.sleep(0.3)
                with admin.cursor() as cur:  # the sessions that prepared or ran the reads
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND (query LIKE 'EXECUTE dataspace_get%%'"
                        " OR query LIKE 'PREPARE dataspace_get%%')"
                    )
        finally:
            admin.close()
        assert _wait_for(lambda: len(pool.inline._idle) + len(pool.inline._busy) == 2)
        handled = pool.inline.handled
        assert _wait_for(lambda: pool.inline.handled > handled + 20), "no read ran inline again"
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert not errors, errors[:3]
    assert answered[0] > 50


# -- without a broker: the parts that decide where a read goes ------------------------
class _FakeLoop:
    def __init__(self):
        self.handlers: dict[int, int] = {}
        self.callbacks: list = []

    def add_handler(self, fd, handler, events):
        self.handlers[fd] = events

    def update_handler(self, fd, events):
        assert fd in self.handlers, "a handler updated after it was removed"
        self.handlers[fd] = events

    def remove_handler(self, fd):
        del self.handlers[fd]

    def add_callback_threadsafe(self, callback):
        self.callbacks.append(callback)

    def call_later(self, delay, callback):
        self.callbacks.append(callback)


class _FakeConn:
    def __init__(self, fd: int):
        self.fd, self.closed = fd, 0

    def fileno(self):
        return self.fd

    def close(self):
        self.closed = 1


class _FakeChannel:
    is_open = True

    def __init__(self):
        self.nacked: list[tuple[int, bool]] = []

    def basic_nack(self, tag, requeue=True):
        self.nacked.append((tag, requeue))


def _inline(stopping: threading.Event | None = None):
    from dataspace_worker.inline_reads import InlineReads

    inline = InlineReads(
        object(), None, None, lambda handled: None, 1, stopping or threading.Event()
    )
    loop = _FakeLoop()
    inline._ioloop = loop
    inline._opener._ioloop = loop
    return inline, loop


def _read(channel, tag: int = 7):
    from types import SimpleNamespace

    from dataspace_worker.inline_reads import _Read

    consumer = SimpleNamespace(inbox=__import__("queue").Queue())
    delivery = SimpleNamespace(channel=channel, tag=tag)
    return _Read(consumer, delivery, "get_dataproduct", {}, True, None, 0.0)


def test_a_read_not_answered_here_goes_to_the_thread_or_back_to_the_broker_when_stopping():
    inline, _loop = _inline()
    channel = _FakeChannel()
    read = _read(channel)
    inline._elsewhere(read)
    assert read.consumer.inbox.get_nowait() is read.delivery and not channel.nacked

    stopping = threading.Event()
    stopping.set()  # the database threads may have taken their last delivery
    inline, _loop = _inline(stopping)
    read = _read(channel)
    inline._elsewhere(read)
    assert read.consumer.inbox.empty() and channel.nacked == [(7, True)]


def test_a_failed_statement_keeps_its_session_and_a_lost_one_is_replaced():
    from dataspace_worker import metrics
    from dataspace_worker.inline_reads import _Session

    inline, loop = _inline()
    kept = _Session(_FakeConn(11), 11)
    loop.add_handler(11, None, 0)
    inline._failed_under(kept, psycopg2.errors.DivisionByZero())
    assert inline._idle == [kept] and kept.conn.closed == 0 and not loop.callbacks

    lost = _Session(_FakeConn(12), 12)
    loop.add_handler(12, None, 0)
    inline._failed_under(lost, psycopg2.OperationalError("server closed the connection"))
    assert lost.conn.closed and 12 not in loop.handlers
    assert len(loop.callbacks) == 1, "another session is opened (after a pause)"

    # a connection lost with a read running: the gauge of reads in flight goes back
    busy = _Session(_FakeConn(13), 13)
    loop.add_handler(13, None, 0)
    inline._busy[13] = busy
    before = metrics.IN_FLIGHT._value.get()
    metrics.IN_FLIGHT.inc()
    inline.detach()
    assert metrics.IN_FLIGHT._value.get() == before
    assert busy.conn.closed and kept.conn.closed and inline.pending == 0


def test_a_session_opened_for_a_loop_since_gone_is_closed(pg_dsn):
    """A connect thread that finishes after its AMQP connection was lost (and a new
    one attached) closes its connection instead of leaving it to nobody."""
    from types import SimpleNamespace

    from dataspace_worker.inline_sessions import SessionOpener

    ready = []
    opener = SessionOpener(
        SimpleNamespace(dsn=pg_dsn, connect_timeout=5, application_name="dataspace-test"),
        ready.append,
    )
    old_loop, new_loop = _FakeLoop(), _FakeLoop()
    opener.attach(old_loop)
    generation = opener._generation
    opener.attach(new_loop)  # the old loop's connection lost, a new one up

    opener._connect(old_loop, generation)  # what the thread of the old loop does

    assert not old_loop.callbacks and not opener._unclaimed and not ready

    opener._connect(new_loop, opener._generation)  # the current loop's: handed over
    assert len(new_loop.callbacks) == 1 and len(opener._unclaimed) == 1
    conn = next(iter(opener._unclaimed))
    opener.detach()  # lost before the I/O thread took it: closed all the same
    assert conn.closed
    new_loop.callbacks[0]()
    assert not ready
