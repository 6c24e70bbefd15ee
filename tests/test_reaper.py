"""Retention (issue 4): the seed Reaper, batched reaps on both backends, the broker-held
schedule across several workers and restarts, and a large reap under traffic."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest

from dataspace_client import (
    DataSpace,
    DataSpaceConfigurationError,
    DataSpaceError,
    Reaper,
)
from dataspace_client.reaper import State
from dataspace_worker.postgres import PostgresDataSource
from tests import services
from tests.support.configs import inprocess_config, remote_config
from tests.support.worker_process import WORKER, WorkerProcess

HEADER = {
    "create_time": 1,
    "expiration_time": 2,
    "scheduled_create_time": 1,
    "creator": "reaper-test",
    "schema_id": None,
}
METADATA = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}


# -- the seed Reaper ---------------------------------------------------------------------
class ControlledSource(PostgresDataSource):
    """A PostgresDataSource whose reap the test holds, releases or makes fail."""

    release = threading.Event()
    entered = threading.Event()
    fail = False

    def reap(self, days):
        type(self).entered.set()
        assert type(self).release.wait(30)
        if type(self).fail:
            raise DataSpaceError("reap failed on purpose")
        return {"taskmanagers": 0, "dataproducts": 0, "batches": 1, "seconds": 0.0}


def controlled_config(pg_dsn: str, **settings) -> dict:
    return {
        "dataspace": {
            "datasource": {
                "module": __name__,
                "name": "ControlledSource",
                "config": {"dsn": pg_dsn, "pool_size": 1},
            },
            "retention_interval_in_days": 7,
            **settings,
        }
    }


@pytest.fixture
def controlled(pg_dsn):
    ControlledSource.release.clear()
    ControlledSource.entered.clear()
    ControlledSource.fail = False
    reaper = Reaper(controlled_config(pg_dsn))
    yield reaper
    ControlledSource.release.set()
    reaper.stop()
    reaper.datasource.close()


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({}, DataSpaceConfigurationError, "missing dataspace"),
        ({"dataspace": "x"}, DataSpaceConfigurationError, "missing dataspace"),
        ({"dataspace": {}}, DataSpaceConfigurationError, "retention_interval_in_days"),
        ({"dataspace": {"retention_interval_in_days": "7"}}, ValueError, "must be an integer"),
        ({"dataspace": {"retention_interval_in_days": 6}}, ValueError, "below the minimum"),
        (
            {"dataspace": {"retention_interval_in_days": 7, "reaper_run_interval": 60}},
            ValueError,
            "below the minimum",
        ),
    ],
)
def test_reaper_configuration_errors(config, error, message):
    with pytest.raises(error, match=message):
        Reaper(config)


def test_reaper_properties_enforce_minimums(controlled):
    assert Reaper.MIN_RETENTION_INTERVAL_DAYS == 7
    assert Reaper.MIN_SECONDS_BETWEEN_RUNS == 7080
    assert controlled.seconds_between_runs == 24 * 60 * 60
    with pytest.raises(ValueError):
        controlled.retention_interval = 6
    with pytest.raises(ValueError):
        controlled.seconds_between_runs = 7079
    controlled.retention_interval = 30
    controlled.seconds_between_runs = 7080
    assert (controlled.retention_interval, controlled.seconds_between_runs) == (30, 7080)


def test_reaper_states_start_stop(controlled):
    assert controlled.state.get() is State.BOOT
    controlled.stop()  # never started: harmless
    controlled.start(delay=60)
    assert controlled.state.get() is State.IDLE
    with pytest.raises(RuntimeError):
        controlled.start()
    controlled.stop()
    assert controlled.state.get() is State.SHUTDOWN
    controlled.stop()  # stopped: harmless
    assert controlled.state.get() is State.SHUTDOWN


def test_reaper_states_during_a_slow_reap_and_after(controlled):
    controlled.start()
    assert ControlledSource.entered.wait(10)
    assert controlled.state.get() is State.ACTIVE
    ControlledSource.release.set()
    deadline = time.monotonic() + 10
    while controlled.state.get() is not State.STEADY and time.monotonic() < deadline:
        time.sleep(0.01)
    assert controlled.state.get() is State.STEADY
    controlled.stop()
    assert controlled.state.get() is State.SHUTDOWN


def test_a_failing_reap_leaves_error_and_the_reaper_restarts(controlled):
    ControlledSource.fail = True
    ControlledSource.release.set()
    controlled.start()
    controlled.thread.join(10)
    assert controlled.state.get() is State.ERROR
    ControlledSource.fail = False
    ControlledSource.entered.clear()
    controlled.start()
    assert ControlledSource.entered.wait(10)
    deadline = time.monotonic() + 10
    while controlled.state.get() is not State.STEADY and time.monotonic() < deadline:
        time.sleep(0.01)
    assert controlled.state.get() is State.STEADY


# -- what a reap removes, on both backends -------------------------------------------------
def _taskmanager_with_products(space: DataSpace, name: str, datestamp, products: int) -> int:
    seq = space.store_taskmanager(name, str(uuid.uuid4()).upper(), datestamp)
    for i in range(products):
        space.insert(seq, 1, f"k{i}", b"v%d" % i, HEADER, METADATA)
    space.duplicate_datablock(seq, 1, 2)
    return seq


def _rows(pg_dsn: str, seq: int) -> dict:
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        counts = {}
        for table in ("dataproduct", "header", "metadata"):
            cur.execute(f"SELECT count(*) FROM {table} WHERE taskmanager_id = %s", (seq,))
            counts[table] = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM taskmanager WHERE sequence_id = %s", (seq,))
        counts["taskmanager"] = cur.fetchone()[0]
        return counts


def test_reap_removes_old_data_with_cascades_and_keeps_new(backend, pg_dsn, amqp_url, request):
    request.getfixturevalue("worker_pool")
    config = inprocess_config(pg_dsn) if backend == "inprocess" else remote_config(amqp_url)
    config["dataspace"]["retention_interval_in_days"] = 300
    reaper = Reaper(config)
    space = reaper.datasource
    try:
        old_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
        edge_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=299)
        old = _taskmanager_with_products(space, f"reap-old-{uuid.uuid4()}", old_at, 3)
        edge = _taskmanager_with_products(space, f"reap-edge-{uuid.uuid4()}", edge_at, 2)
        new = _taskmanager_with_products(space, f"reap-new-{uuid.uuid4()}", None, 2)
        result = reaper.reap()
        assert result["taskmanagers"] >= 1 and result["dataproducts"] >= 6
        assert result["batches"] >= 2
        assert _rows(pg_dsn, old) == dict.fromkeys(
            ("dataproduct", "header", "metadata", "taskmanager"), 0
        )
        assert _rows(pg_dsn, edge) == {
            "dataproduct": 4,
            "header": 4,
            "metadata": 4,
            "taskmanager": 1,
        }
        assert space.get_datablock(new, 2) == {"k0": b"v0", "k1": b"v1"}
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT taskmanagers, dataproducts FROM dataspace_reap ORDER BY id DESC")
            assert cur.fetchone() == (result["taskmanagers"], result["dataproducts"])
    finally:
        space.close()


# -- the schedule: several workers, restarts -----------------------------------------------
SHORT_INTERVAL = 2.0
# A worker whose reaper minimums are lowered for the test: not reachable from any setting.
TEST_WORKER = [
    sys.executable,
    "-c",
    "import sys, dataspace_worker.reaper as r; r.MIN_INTERVAL = 1; "
    "from dataspace_worker.cli import main; sys.exit(main())",
]


def _reap_times(pg_dsn: str) -> list[float]:
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT extract(epoch FROM started_at) FROM dataspace_reap ORDER BY started_at")
        return [float(r[0]) for r in cur.fetchall()]


def _schedule_depth(vhost_url: str) -> int:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
    try:
        return (
            connection.channel()
            .queue_declare("dataspace.reaper.schedule", passive=True)
            .method.message_count
        )
    finally:
        connection.close()


def test_schedule_runs_one_reap_per_interval_across_workers_and_restarts():
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
    ):
        if url.endswith("/%2F"):
            pytest.skip("needs rabbitmqctl to create a vhost")
        env = {
            "DATASPACE_AMQP_URL": url,
            "DATASPACE_PG_DSN": dsn,
            "DATASPACE_CONSUMERS": "1",
            "DATASPACE_RETENTION_DAYS": "7",
            "DATASPACE_REAP_INTERVAL": str(SHORT_INTERVAL),
        }

        def start_three():
            workers = [_TestWorker(env) for _ in range(3)]
            for w in workers:
                w.wait_for("consuming 'dataspace.requests'")
            return workers

        workers = start_three()
        try:
            time.sleep(5 * SHORT_INTERVAL + 0.5)
            first = _reap_times(dsn)
            assert _schedule_depth(url) <= 1
            for w in workers:
                w.kill()
            killed_at = time.time()
            time.sleep(3 * SHORT_INTERVAL)  # runs missed while no worker is up
            restart_began = time.time()
            workers = start_three()
            restarted_at = time.time()
            time.sleep(4 * SHORT_INTERVAL + 0.5)
            for w in workers:
                assert w.terminate() == 0
        finally:
            for w in workers:
                w.kill()
        times = _reap_times(dsn)
    before = [t for t in times if t <= killed_at]
    after = [t for t in times if t >= restarted_at]
    assert len(first) in (4, 5, 6), first  # about one per interval over 5 intervals
    gaps = [b - a for a, b in zip(times, times[1:])]
    # never two runs closer than the interval (a little slack for the broker's timer)
    assert min(gaps) >= SHORT_INTERVAL * 0.9, gaps
    # after the outage: at most one overdue run at once, then one per interval
    # after the outage: the one overdue run goes as soon as a worker is back (its
    # first consumer takes it), then one per interval; the gap check above rules
    # out a burst of missed runs
    resumed = [t for t in times if t > killed_at]
    assert resumed and resumed[0] < restarted_at + 1.0, (restart_began, restarted_at, resumed)
    burst = [t for t in resumed if t < resumed[0] + SHORT_INTERVAL * 0.9]
    assert len(burst) == 1, resumed
    assert len(after) in (3, 4, 5), after
    assert len(resumed) >= 4, "the schedule did not resume"
    assert before, "no reap before the restart"
    print(
        f"schedule: {len(first)} reaps in the first {5 * SHORT_INTERVAL:g} s with 3 workers, "
        f"{len(after)} in {4 * SHORT_INTERVAL:g} s after all were killed and restarted "
        f"(at most one overdue: {len(burst)}); smallest gap {min(gaps):.2f} s "
        f"for an interval of {SHORT_INTERVAL:g} s"
    )


class _TestWorker(WorkerProcess):
    """dataspace-worker with the reaper's minimums lowered (test only)."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen(
            TEST_WORKER,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def test_minimum_interval_is_not_reachable_from_configuration():
    result = subprocess.run(
        [WORKER, "--retention-days", "7", "--reap-interval", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "'reap_interval' must be at least 7080" in result.stderr
    result = subprocess.run(
        [WORKER, "--retention-days", "3"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "'retention_days' must be 0" in result.stderr


# -- a large reap while other clients work ---------------------------------------------------
OLD_TASKMANAGERS = 200
PRODUCTS_EACH = 1000


def test_large_reap_keeps_other_clients_answered(worker_pool, amqp_url, pg_dsn, remote_space):
    tag = uuid.uuid4().hex[:8]
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO taskmanager (taskmanager_id, name, datestamp)
            SELECT 'BIG-' || g, %s, now() - interval '40 days' FROM generate_series(1, %s) g
            """,
            (f"big-{tag}", OLD_TASKMANAGERS),
        )
        for table, columns, values in (
            ("dataproduct", "value", "'\\x00'::bytea"),
            (
                "header",
                "create_time, expiration_time, scheduled_create_time, creator",
                "1, 2, 1, 'big'",
            ),
            ("metadata", "state, generation_time", "'NEW', 1"),
        ):
            cur.execute(
                f"""
                INSERT INTO {table} (taskmanager_id, generation_id, key, {columns})
                SELECT tm.sequence_id, 1, 'k' || g, {values}
                FROM taskmanager tm, generate_series(1, %s) g WHERE tm.name = %s
                """,
                (PRODUCTS_EACH, f"big-{tag}"),
            )
    busy = remote_space.store_taskmanager(f"busy-{tag}", "BUSY")
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def traffic():
        i = 0
        while not stop.is_set() and i < 20_000:
            started = time.monotonic()
            try:
                remote_space.insert(busy, 1, f"k{i}", b"x", HEADER, METADATA)
                assert remote_space.get_dataproduct(busy, 1, f"k{i}") == b"x"
            except BaseException as exc:  # recorded, asserted below
                errors.append(exc)
                return
            latencies.append(time.monotonic() - started)
            i += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(0.5)
    calls_before = len(latencies)
    result = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "dataspace"),
            "--url",
            amqp_url,
            "reap",
            "--now",
            "--days",
            "30",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    calls_during = len(latencies) - calls_before
    stop.set()
    thread.join(30)
    assert result.returncode == 0, result.stderr
    import orjson

    figures = orjson.loads(result.stdout)  # one JSON object, nothing else
    assert figures["taskmanagers"] >= OLD_TASKMANAGERS
    assert figures["dataproducts"] >= OLD_TASKMANAGERS * PRODUCTS_EACH
    assert figures["batches"] >= OLD_TASKMANAGERS * PRODUCTS_EACH // 5000
    assert not errors, errors[0]
    assert calls_during >= 20, f"only {calls_during} calls answered during the reap"
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM taskmanager WHERE name = %s", (f"big-{tag}",))
        assert cur.fetchone()[0] == 0
    print(
        f"large reap: {figures}; {calls_during} insert+get pairs answered meanwhile, "
        f"slowest {max(latencies[calls_before:]) * 1000:.0f} ms"
    )


# -- regressions from review -------------------------------------------------------------
def test_stop_during_a_reap_shuts_down_without_another_reap(controlled):
    controlled.start()
    assert ControlledSource.entered.wait(10)
    stopper = threading.Thread(target=controlled.stop)
    stopper.start()
    deadline = time.monotonic() + 5
    while controlled.state.get() is not State.SHUTTINGDOWN and time.monotonic() < deadline:
        time.sleep(0.01)
    assert controlled.state.get() is State.SHUTTINGDOWN
    ControlledSource.entered.clear()
    ControlledSource.release.set()
    stopper.join(10)
    assert controlled.state.get() is State.SHUTDOWN
    assert not ControlledSource.entered.is_set(), "a reap started after stop()"


def _old_taskmanager(pg_dsn: str, products: int, days_old: int = 40) -> int:
    space = DataSpace(inprocess_config(pg_dsn))
    try:
        stamp = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_old)
        return _taskmanager_with_products(space, f"old-{uuid.uuid4()}", stamp, products)
    finally:
        space.close()


def test_reap_batches_until_nothing_is_left_and_counts_exactly(pg_dsn):
    seq = _old_taskmanager(pg_dsn, 7)  # 7 products in generation 1, 7 copied to 2
    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2, "reap_batch": 4})
    try:
        result = source.reap(35)
    finally:
        source.close()
    assert result["dataproducts"] >= 14 and result["taskmanagers"] >= 1
    assert result["batches"] >= 14 // 4 + 2  # product batches, then task manager batches
    assert result["skipped"] is False
    assert _rows(pg_dsn, seq) == dict.fromkeys(
        ("dataproduct", "header", "metadata", "taskmanager"), 0
    )


def test_two_reaps_at_once_run_one_and_skip_the_other(pg_dsn):
    _old_taskmanager(pg_dsn, 50)
    sources = [
        PostgresDataSource({"dsn": pg_dsn, "pool_size": 2, "reap_batch": 1}) for _ in range(2)
    ]
    results = []
    try:
        threads = [threading.Thread(target=lambda s=s: results.append(s.reap(35))) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for s in sources:
            s.close()
    assert sorted(r["skipped"] for r in results) == [False, True]


@pytest.fixture
def reaper_vhost(amqp_url):
    import pika

    from dataspace_worker.topology import declare_blocking, topology

    with services.scratch_vhost(services.with_vhost(amqp_url, "/")) as url:
        if url.endswith("/%2F"):
            pytest.skip("needs rabbitmqctl to create a vhost")
        connection = pika.BlockingConnection(pika.URLParameters(url))
        declare_blocking(connection.channel(), topology())
        connection.close()
        yield url


def _scheduled(days: float, user: str = "guest", **changes):
    """The schedule's message as the reaper queue delivers it: flagged, published
    by the service's account, dead-lettered by the schedule queue's expiry."""
    from dataspace_core.protocol import OPERATIONS, SCHEDULE_QUEUE, encode_request
    from dataspace_worker.dispatch import Request
    from dataspace_worker.reaper import SCHEDULED_HEADER

    headers = {
        SCHEDULED_HEADER: True,
        "x-death": [{"queue": SCHEDULE_QUEUE, "reason": "expired", "count": 1}],
    }
    fields = {
        "body": encode_request(OPERATIONS["reap"], {"days": days}),
        "message_id": uuid.uuid4().hex,
        "headers": headers,
        "routing_key": "admin.reap",
        "user_id": user,
    }
    return Request(**{**fields, **changes})


def test_scheduled_reaps_that_piled_up_run_once(pg_dsn, reaper_vhost):
    import orjson

    from dataspace_worker.reaper import ReaperDispatcher, Schedule

    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2})
    schedule = Schedule(reaper_vhost, 30, interval=3600)
    handler = ReaperDispatcher(source, schedule, 1 << 20)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM dataspace_reap")  # no recent reap: the first one is due
    try:
        replies = [orjson.loads(handler.handle_request(_scheduled(30)).body) for _ in range(3)]
    finally:
        source.close()
    assert [r["result"]["skipped"] for r in replies] == [False, True, True]


def test_a_scheduled_reap_uses_this_workers_retention_not_the_armers(pg_dsn, reaper_vhost):
    import orjson

    from dataspace_worker.reaper import ReaperDispatcher, Schedule

    seq = _old_taskmanager(pg_dsn, 2, days_old=40)
    scheduled = _scheduled(7)  # armed by a worker that kept 7 days
    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2})
    try:
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM dataspace_reap")  # no recent reap: this one is due
        # retention_days 0 on this worker
        off = ReaperDispatcher(source, None, 1 << 20, service_user="guest")
        reply = orjson.loads(off.handle_request(scheduled).body)
        assert reply["result"]["skipped"] is True
        assert _rows(pg_dsn, seq)["taskmanager"] == 1
        keep_90 = Schedule(reaper_vhost, 90, interval=3600)
        reply = orjson.loads(
            ReaperDispatcher(source, keep_90, 1 << 20).handle_request(scheduled).body
        )
        assert reply["ok"] and reply["result"]["skipped"] is False
        assert _rows(pg_dsn, seq)["taskmanager"] == 1, "40-day-old data went with 90 days kept"
    finally:
        source.close()


def test_the_worker_refuses_a_retention_below_the_minimum(remote_space):
    from dataspace_client import DataSpaceRequestError

    with pytest.raises(DataSpaceRequestError, match="at least 7"):
        remote_space.datasource.reap(3)


# -- a client cannot pass for the schedule, nor reap below the minimum --------------------
def _framed_reap(days: float) -> bytes:
    """A reap body in the frame encoding (a value-less frame is valid too)."""
    import orjson

    from dataspace_core.protocol import FRAME_MAGIC

    text = orjson.dumps({"v": 1, "op": "reap", "args": {"days": days}})
    return FRAME_MAGIC + len(text).to_bytes(4, "big") + text


@pytest.mark.parametrize("encoding", ["json", "frame"])
def test_a_reap_under_the_minimum_is_refused_whatever_its_encoding(pg_dsn, encoding):
    import orjson

    from dataspace_core.protocol import FRAME_CONTENT_TYPE
    from dataspace_worker.dispatch import Request
    from dataspace_worker.reaper import ReaperDispatcher

    seq = _old_taskmanager(pg_dsn, 2, days_old=40)
    if encoding == "frame":
        body, content_type = _framed_reap(0.00001), FRAME_CONTENT_TYPE
    else:
        body, content_type = orjson.dumps({"v": 1, "op": "reap", "args": {"days": 0.00001}}), None
    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2})
    try:
        handler = ReaperDispatcher(source, None, 1 << 20, service_user="dataspace")
        outcome = handler.handle_request(
            Request(body, uuid.uuid4().hex, content_type, None, "admin.reap", "client")
        )
        assert outcome.code == "bad_request", outcome
        assert "at least 7" in outcome.reason
        assert _rows(pg_dsn, seq)["taskmanager"] == 1
    finally:
        source.close()


@pytest.mark.parametrize(
    "forged",
    [
        {"user_id": "client"},  # the flag and x-death, from a client's account
        {"user_id": None},
        {"headers": {"x-dataspace-scheduled": True}},  # the flag alone, as the service
    ],
    ids=["client-account", "no-user-id", "no-x-death"],
)
def test_a_client_cannot_pass_for_the_schedule(pg_dsn, forged, caplog):
    """The scheduled reap runs with the worker's retention and skips days checks
    of its own body: only the schedule's own message may claim it."""
    import orjson

    from dataspace_worker.reaper import ReaperDispatcher

    seq = _old_taskmanager(pg_dsn, 2, days_old=40)
    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2})
    try:
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM dataspace_reap")
        # retention off on this worker: the real schedule's message would be skipped
        handler = ReaperDispatcher(source, None, 1 << 20, service_user="dataspace")
        genuine = orjson.loads(handler.handle_request(_scheduled(90, user="dataspace")).body)
        assert genuine["result"]["skipped"] is True
        outcome = handler.handle_request(_scheduled(0.00001, message_id="\x1b[2Jx", **forged))
        assert outcome.code == "bad_request", outcome
        assert "claims to be the scheduled one" in caplog.text
        assert "\x1b" not in caplog.text  # the client's id, escaped
        assert _rows(pg_dsn, seq)["taskmanager"] == 1
    finally:
        source.close()


# -- what a reap tells the operator: metrics, progress lines, a quiet schedule ------------
def _metric(name: str, labels: str = "") -> float:
    """A sample of the worker's registry, as /metrics exposes it."""
    import re

    from prometheus_client import generate_latest

    from dataspace_worker import metrics

    text = generate_latest(metrics.REGISTRY).decode()
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not exposed"
    return float(match.group(1))


def test_a_reap_counts_deleted_rows_and_its_success_and_logs_progress(pg_dsn, caplog):
    import logging

    _old_taskmanager(pg_dsn, 7)  # 14 products (generations 1 and 2), 1 task manager
    products = 'table="dataproduct"'
    managers = 'table="taskmanager"'
    before = {t: _metric("dataspace_reap_deleted_rows_total", t) for t in (products, managers)}
    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2, "reap_batch": 4})
    source.reap_progress_interval = 0.0  # a line after every batch
    caplog.set_level(logging.INFO, logger="dataspace_worker.postgres")
    started = time.time()
    try:
        result = source.reap(35)
        finished = time.time()
        assert result["dataproducts"] >= 14 and result["taskmanagers"] >= 1
        assert _metric("dataspace_reap_deleted_rows_total", products) == (
            before[products] + result["dataproducts"]
        )
        assert _metric("dataspace_reap_deleted_rows_total", managers) == (
            before[managers] + result["taskmanagers"]
        )
        assert started <= _metric("dataspace_reap_last_success_timestamp_seconds") <= finished
        assert 0 < _metric("dataspace_reap_last_duration_seconds") <= finished - started
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        progress = [m for m in messages if m.startswith("reap in progress:")]
        assert len(progress) == result["batches"], messages
        assert (
            f"{result['dataproducts']} products and {result['taskmanagers']} task managers"
            in (progress[-1])
        )
        summary = [m for m in messages if m.startswith("reaped task managers older than 35")]
        assert len(summary) == 1 and f"in {result['batches']} batches" in summary[0], messages

        # a short reap with the default interval: the summary line alone
        caplog.clear()
        source.reap_progress_interval = PostgresDataSource.reap_progress_interval
        again = source.reap(35)
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert again["seconds"] < 5
        assert [m for m in messages if m.startswith("reap")] == [
            m for m in messages if m.startswith("reaped task managers")
        ]
        assert len(messages) == 1, messages
    finally:
        source.close()


def test_rearming_the_schedule_is_quiet_after_the_first_arm(pg_dsn, reaper_vhost, caplog):
    """The first arm says at INFO what it did; then every re-arm (refused: a run is
    pending), a re-arm that loses the race to another worker (the broker nacks it)
    and a scheduled reap skipped as too soon log nothing at INFO or above, pika's
    "Message was Nack'ed" warning included."""
    import logging

    from dataspace_worker.reaper import ReaperDispatcher, Schedule

    # pika's connection chatter off but its warnings on (the quiet must not depend on
    # the level the worker gives pika), INFO everywhere else (in this order:
    # set_level sets the handler's level too)
    caplog.set_level(logging.WARNING, logger="pika")
    caplog.set_level(logging.INFO)
    schedule = Schedule(reaper_vhost, 30, interval=3600)
    assert schedule.arm() is True
    first = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.getMessage().split(" at ")[0] for r in first] == ["next reap scheduled"], first
    assert _schedule_depth(reaper_vhost) == 1

    caplog.clear()
    assert schedule.arm() is False  # pending: nothing published
    schedule.try_arm()
    # another worker armed it between this one's look and its publish: the broker
    # refuses the publish (a nack), which is as normal
    racing = Schedule(reaper_vhost, 30, interval=3600)
    racing._reported = True  # not its first attempt
    racing._pending = lambda connection: 0  # it looked before the other published
    publish, published = racing._publish, []
    racing._publish = lambda connection: published.append(publish(connection)) or published[-1]
    assert racing.arm() is False
    assert published == [None], "the broker did not refuse the second publish"
    assert _schedule_depth(reaper_vhost) == 1
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud == [], [(r.name, r.levelname, r.getMessage()) for r in loud]

    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2})
    try:
        source.reap(35)  # a reap just finished: the next scheduled one is skipped
        caplog.clear()
        handler = ReaperDispatcher(source, schedule, 1 << 20)
        reply = handler.handle_request(_scheduled(30))
    finally:
        source.close()
    assert b'"skipped":true' in reply.body
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud == [], [(r.name, r.levelname, r.getMessage()) for r in loud]
    assert "Nack'ed" not in caplog.text
