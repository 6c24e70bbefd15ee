"""The ``dataspace-worker`` command as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from dataspace_client import DataBlock, DataSpace, DataSpaceError, Header
from tests.conftest import remote_config

WORKER = shutil.which("dataspace-worker") or os.path.join(
    os.path.dirname(sys.executable), "dataspace-worker"
)


class WorkerProcess:
    """``dataspace-worker`` in a subprocess, its stderr collected line by line."""

    def __init__(self, env: dict, *args: str, wrap=None):
        """``wrap(argv)``: the command line to run instead (e.g. inside a network namespace)."""
        argv = [WORKER, *args]
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker never printed {text!r}; output:\n{self.output}")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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
    assert "dataspace-worker 0.1.0 starting: 2 consumers" in out
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


def test_print_settings_lists_every_environment_variable():
    result = subprocess.run([WORKER, "--print-settings"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in ("DATASPACE_AMQP_URL", "DATASPACE_PG_DSN", "DATASPACE_CONSUMERS"):
        assert name in result.stdout


def test_example_config_file_loads_with_every_setting():
    import argparse
    from pathlib import Path

    from dataspace_worker import config

    path = Path(__file__).resolve().parent.parent / "deploy" / "worker.example.toml"
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.load(parser.parse_args(["--config", str(path)]), environ={})
    assert settings == config.WorkerSettings.with_defaults()
