"""The ``dataspace-worker`` command as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from dataspace_client import DataBlock, DataSpace, DataSpaceError, Header
from tests.services import poll
from tests.support.configs import remote_config
from tests.support.worker_process import WORKER, WorkerProcess


@pytest.fixture
def worker_env(own_vhost, pg_dsn):
    return {
        "DATASPACE_AMQP_URL": own_vhost,
        "DATASPACE_PG_DSN": pg_dsn,
        "DATASPACE_CONSUMERS": "2",
    }


def test_worker_serves_a_datablock_and_stops_cleanly_on_sigterm(worker_env, own_vhost):
    worker = WorkerProcess(worker_env)
    try:
        worker.wait_for("consuming 'dataspace.requests'")
        space = DataSpace(remote_config(own_vhost))
        try:
            block = DataBlock(space, "cli-e2e")
            block.put("answer", {"value": 42}, Header(block.taskmanager_id))
            assert block["answer"] == {"value": 42}
            assert block.keys() == ("answer",)
        finally:
            space.close()
        assert worker.terminate() == 0
    finally:
        worker.kill()
    out = worker.output
    assert "dataspace-worker 0.1.0 (" in out and "starting: 2 consumers" in out
    assert "guest:***@" in out and "guest:guest@" not in out
    assert "SIGTERM received: finishing requests in hand" in out
    assert "dataspace-worker stopped:" in out and "requests handled" in out


def test_sigterm_under_load_finishes_requests_in_hand(worker_env, own_vhost, pg_dsn):
    """Every call returns or raises a DataSpace error (none hangs); every insert that
    returned is in the database; the worker exits 0."""
    worker = WorkerProcess(worker_env)
    try:
        worker.wait_for("consuming 'dataspace.requests'")
        space = DataSpace(remote_config(own_vhost, timeout=5))
        tm = space.store_taskmanager("cli-sigterm", "SIGTERM-TEST")
        stop = threading.Event()

        def writer(thread: int) -> tuple[list[str], int]:
            done, failed = [], 0
            for i in range(2000):
                key = f"t{thread}-{i}"
                try:
                    space.insert(tm, 1, key, b"x" * 100, dict(Header("X")), _metadata())
                    done.append(key)
                except DataSpaceError:
                    failed += 1
                    break
                if stop.is_set():
                    break
            return done, failed

        with ThreadPoolExecutor(4) as executor:
            futures = [executor.submit(writer, t) for t in range(4)]
            time.sleep(0.5)
            assert worker.terminate() == 0
            stop.set()
            results = [f.result(timeout=60) for f in futures]
        space.close()
    finally:
        worker.kill()
    acknowledged = {key for done, _ in results for key in done}
    assert acknowledged, "no write went through before SIGTERM"
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT key FROM dataproduct WHERE taskmanager_id = %s", (tm,))
        stored = {row[0] for row in cur.fetchall()}
    assert acknowledged <= stored


def _metadata() -> dict:
    return {"state": "NEW", "generation_time": int(time.time()), "missed_update_count": 0}


def test_bad_setting_exits_2_naming_the_setting(worker_env):
    result = subprocess.run(
        [WORKER],
        env={**os.environ, **worker_env, "DATASPACE_CONSUMERS": "many"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "setting 'consumers' (from environment DATASPACE_CONSUMERS)" in result.stderr


def test_config_file_and_flag_precedence(tmp_path, worker_env):
    from dataspace_worker import config

    path = tmp_path / "worker.toml"
    path.write_text('[worker]\nconsumers = 3\nprefetch = 7\nlog_level = "debug"\n')
    parser = __import__("argparse").ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--prefetch", "9"])
    settings = config.load(args, environ={"DATASPACE_CONSUMERS": "5"})
    assert settings.consumers == 5  # environment beats file
    assert settings.prefetch == 9  # flag beats file
    assert settings.log_level == "DEBUG"
    path.write_text("[worker]\nconsumer = 3\n")
    with pytest.raises(Exception, match="unknown setting"):
        config.load(parser.parse_args(["--config", str(path)]), environ={})


def test_print_settings_shows_effective_values_and_their_sources(tmp_path):
    from dataspace_worker import config

    path = tmp_path / "worker.toml"
    path.write_text("[worker]\nprefetch = 7\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")} | {
        "DATASPACE_CONSUMERS": "3",
        "DATASPACE_AMQP_URL": "amqp://svc:s3cret@mq:5672/prod",
        "DATASPACE_PG_DSN": "host=db user=ds password=hunter2 dbname=ds",
    }
    result = subprocess.run(
        [WORKER, "--print-settings", "--config", str(path), "-n", "w1", "--create-database"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(rows) == {s.name for s in config.SETTINGS}
    assert rows["consumers"].split()[1:] == ["3", "environment", "DATASPACE_CONSUMERS"]
    assert rows["prefetch"].split()[1:] == ["7", "file", str(path)]
    assert rows["name"].split()[1:] == ["'w1'", "flag", "--name"]
    assert rows["create_database"].split()[1:] == ["True", "flag", "--create-database"]
    assert rows["delivery_limit"].split()[1:] == ["10", "default"]
    assert "s3cret" not in result.stdout and "hunter2" not in result.stdout
    assert "svc:***@mq" in rows["amqp_url"] and "password=***" in rows["pg_dsn"]


def test_example_config_file_loads_with_every_setting():
    import argparse
    from pathlib import Path

    from dataspace_worker import config

    path = Path(__file__).resolve().parent.parent / "deploy" / "worker.example.toml"
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.load(parser.parse_args(["--config", str(path)]), environ={})
    assert settings == config.WorkerSettings.with_defaults()


def test_connections_and_consumer_tags_name_the_worker(worker_env, own_vhost):
    """In the management UI (and `dataspace status`) a worker is its name, host and
    pid, not 127.0.0.1:52172 and a random tag."""
    import socket

    from dataspace_client.management import ManagementClient

    worker = WorkerProcess({**worker_env, "DATASPACE_METRICS_PORT": "0"}, "-n", "blue-7")
    host, pid = socket.gethostname(), worker.proc.pid
    expected = f"dataspace-worker 0.1.0 blue-7 on {host} pid {pid} (consumers)"
    api = ManagementClient.for_broker(own_vhost, None)

    def named() -> set:
        return {
            (c.get("client_properties") or {}).get("connection_name") for c in api.connections()
        } & {expected}

    def tags() -> set:
        return {c["consumer_tag"] for c in api.consumers()}

    try:
        worker.wait_for("consuming 'dataspace.requests'")
        # the management API lists new connections and consumers within seconds
        names, _ = poll(named, timeout=20)
        consumer_tags, _ = poll(lambda: len(tags()) >= 3 and tags(), timeout=20)
        assert worker.terminate() == 0
    finally:
        worker.kill()
    assert names == {expected}
    assert {t.rsplit(":", 1)[0] for t in consumer_tags} == {
        f"blue-7:{pid}:dataspace.requests",
        f"blue-7:{pid}:dataspace.reads",
        f"blue-7:{pid}:dataspace.reaper",
    }
    assert f"(blue-7 on {host} pid {pid}) starting" in worker.output
