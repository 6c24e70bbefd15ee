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

    assert pool.inline.handled == before
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
        with psycopg2.connect(pg_dsn) as admin:
            admin.autocommit = True
            for _ in range(3):
                time.sleep(0.3)
                pids = [s.conn.get_backend_pid() for s in list(pool.inline._idle)]
                pids += [s.conn.get_backend_pid() for s in list(pool.inline._busy.values())]
                with admin.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s) AS pid", (pids,))
        assert _wait_for(lambda: len(pool.inline._idle) + len(pool.inline._busy) == 2)
        handled = pool.inline.handled
        assert _wait_for(lambda: pool.inline.handled > handled + 20), "no read ran inline again"
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert not errors, errors[:3]
    assert answered[0] > 50
