"""Observability (issue 6): metrics and health endpoints of a real worker process,
health following PostgreSQL down and up, and JSON logs."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import orjson
import pytest

from dataspace_client import DataSpace
from tests.faults.instances import free_port, throwaway_postgres
from tests.support.configs import remote_config
from tests.support.worker_process import WorkerProcess


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _sample(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_and_health_follow_requests_and_the_database(own_vhost):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with throwaway_postgres() as pg:
        worker = WorkerProcess(
            {
                "DATASPACE_AMQP_URL": own_vhost,
                "DATASPACE_PG_DSN": pg.dsn,
                "DATASPACE_CONSUMERS": "2",
                "DATASPACE_METRICS_PORT": str(port),
                "DATASPACE_LOG_FORMAT": "json",
                # debug: the per-request lines checked below are logged whatever their level
                "DATASPACE_LOG_LEVEL": "debug",
            }
        )
        try:
            worker.wait_for("consuming 'dataspace.requests'")
            assert _get(base + "/healthz") == (200, b'{"broker":true,"database":true}')
            status, body = _get(base + "/readyz")
            assert status == 200 and orjson.loads(body)["consuming"] is True

            before = _get(base + "/metrics")[1].decode()
            space = DataSpace(remote_config(own_vhost, timeout=20))
            try:
                for i in range(5):
                    space.store_taskmanager(f"metrics-{i}", "M")
                with pytest.raises(KeyError):
                    space.get_taskmanager("no-such-taskmanager")
                after = _get(base + "/metrics")[1].decode()
                ok = 'operation="store_taskmanager",outcome="ok"'
                assert _sample(after, "dataspace_requests_total", ok) == (
                    _sample(before, "dataspace_requests_total", ok) + 5
                )
                missing = 'operation="get_taskmanager",outcome="not_found"'
                assert _sample(after, "dataspace_requests_total", missing) == 1
                assert (
                    _sample(
                        after, "dataspace_request_seconds_count", 'operation="store_taskmanager"'
                    )
                    == 5
                )
                # a database thread per consumer, on the request queue and as many on
                # the fast read queue, plus the reaper and the sweeper: 2 x 2 + 2
                assert _sample(after, "dataspace_database_pool_size") == 6
                assert _sample(after, "dataspace_database_up") == 1

                pg.stop("fast")
                status, body = _get(base + "/healthz")
                assert status == 503
                assert orjson.loads(body) == {"broker": True, "database": False}
                assert _get(base + "/livez")[0] == 200  # an outage is no reason to restart
                down = _get(base + "/metrics")[1].decode()
                assert _sample(down, "dataspace_database_up") == 0
                pg.start()
                deadline = time.monotonic() + 20
                while _get(base + "/healthz")[0] != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert _get(base + "/healthz")[0] == 200
                space.store_taskmanager("metrics-after", "M")  # serves again
                assert _get(base + "/nothing")[0] == 404
                assert _get(base + "/livez") == (200, b'{"alive":true}')
            finally:
                space.close()
            assert worker.terminate() == 0
        finally:
            worker.kill()
    lines = [orjson.loads(line) for line in worker.lines if line.startswith("{")]
    assert lines, worker.output
    request_lines = [e for e in lines if e.get("operation") == "store_taskmanager"]
    assert request_lines and {"correlation_id", "duration_ms", "outcome"} <= set(request_lines[0])
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)


def test_metrics_expose_process_python_and_build_series_and_the_renamed_counters(own_vhost, pg_dsn):
    """What a scrape shows besides the requests: process_* and python_* series,
    dataspace_build_info, no *_created series; a write delivered twice counts in
    dataspace_idempotent_duplicates_total (once dataspace_replays_total)."""
    import uuid

    import pika

    from dataspace_worker import __version__
    from tests.support.raw_clients import RawClient

    port = free_port()
    worker = WorkerProcess(
        {
            "DATASPACE_AMQP_URL": own_vhost,
            "DATASPACE_PG_DSN": pg_dsn,
            "DATASPACE_CONSUMERS": "1",
            "DATASPACE_METRICS_PORT": str(port),
            "DATASPACE_RETENTION_DAYS": "30",
        }
    )
    try:
        worker.wait_for("consuming 'dataspace.requests'")
        raw = RawClient(own_vhost)
        try:
            message_id = uuid.uuid4().hex
            args = {"taskmanager_name": message_id, "taskmanager_id": "M", "datestamp": None}
            body = orjson.dumps({"v": 1, "op": "store_taskmanager", "args": args})
            replies = [raw.request(body, message_id=message_id)[1] for _ in range(3)]
        finally:
            raw.close()
        assert len(set(replies)) == 1 and orjson.loads(replies[0])["ok"] is True
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        text = body.decode()
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line}
        names.discard("#")
        assert _sample(text, "process_cpu_seconds_total") > 0
        assert {"process_resident_memory_bytes", "process_start_time_seconds"} <= names
        assert "python_gc_collections_total" in names
        assert re.search(r'^python_info\{.*version="\d+\.\d+\.\d+".*\} 1\.0$', text, re.M)
        build = re.search(r"^dataspace_build_info\{(.*)\} 1\.0$", text, re.M)
        assert build, text
        labels = dict(re.findall(r'(\w+)="([^"]*)"', build.group(1)))
        assert labels["version"] == __version__ and labels["pika"] == pika.__version__
        assert set(labels) == {"version", "python", "pika", "psycopg2"}
        assert not [line for line in text.splitlines() if "_created" in line.split(" ")[0]]
        assert _sample(text, "dataspace_idempotent_duplicates_total") == 2
        assert not [n for n in names if n.startswith("dataspace_replays")]
        for table in ("dataproduct", "taskmanager"):
            assert f'dataspace_reap_deleted_rows_total{{table="{table}"}}' in text
        assert "dataspace_reap_last_success_timestamp_seconds" in names
        assert "dataspace_reap_last_duration_seconds" in names
        assert worker.terminate() == 0
    finally:
        worker.kill()
    # the start-up arm of the reap schedule is the one line the schedule logs at INFO
    armed = [line for line in worker.lines if "next reap scheduled" in line]
    assert len(armed) == 1 and " INFO " in armed[0], worker.output
