"""What an operator sees when a worker is started wrong: a refusal that retrying
cannot cure stops it at once, exit 2, one line naming the setting, where it came
from and the fix; an outage is retried, one line per attempt with the cause in
words and nothing from pika."""

from __future__ import annotations

import socket
import subprocess
import uuid

import pika
import psycopg2
import pytest
from psycopg2 import extensions

from dataspace_core.amqp.failures import describe
from dataspace_worker.dispatch import Dispatcher
from dataspace_worker.postgres import PostgresDataSource
from dataspace_worker.topology import topology
from dataspace_worker.worker_pool import WorkerPool
from tests.support.worker_process import WORKER, WorkerProcess

pytestmark = pytest.mark.timeout(120)


def _run(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [WORKER, "--metrics-port", "0", "--connect-timeout", "2", *args],
        env={**_clean_environ(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _clean_environ() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert not [line for line in lines if " pika." in line], result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("change", "said", "fix"),
    [
        ({"user": "no_such_role_x"}, 'role "no_such_role_x" does not exist', "create the role"),
        ({"sslmode": "require"}, "server does not support SSL", "lower sslmode"),
        ({"dbname": "dataspace_misspelt_x"}, "does not exist", "--create-database"),
    ],
)
def test_a_database_that_refuses_the_worker_stops_it_at_once(pg_dsn, amqp_url, change, said, fix):
    dsn = extensions.make_dsn(pg_dsn, **change)
    result = _run({"DATASPACE_PG_DSN": dsn, "DATASPACE_AMQP_URL": amqp_url})
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result)
    assert said in line and fix in line
    assert "(setting pg_dsn, from environment DATASPACE_PG_DSN)" in line


def test_a_missing_database_is_created_only_when_asked(pg_dsn, own_vhost):
    name = f"dataspace_created_{uuid.uuid4().hex[:8]}"
    dsn = extensions.make_dsn(pg_dsn, dbname=name)
    admin = extensions.make_dsn(pg_dsn, dbname="postgres")
    try:
        worker = WorkerProcess(
            {
                "DATASPACE_PG_DSN": dsn,
                "DATASPACE_AMQP_URL": own_vhost,
                "DATASPACE_METRICS_PORT": "0",
            },
            "--create-database",
        )
        try:
            worker.wait_for("consuming 'dataspace.requests'")
            assert worker.terminate() == 0
        finally:
            worker.kill()
        assert f"created database {name}" in worker.output
    finally:
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def test_a_wrong_broker_password_stops_the_worker_with_one_line(pg_dsn, amqp_url):
    url = amqp_url.replace("guest:guest@", "guest:wrong@")
    result = _run({"DATASPACE_PG_DSN": pg_dsn}, "--amqp-url", url)
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result)
    assert "authentication refused" in line and "check the user name and password" in line
    assert "(setting amqp_url, from flag --amqp-url)" in line
    assert "wrong" not in line


def test_a_closed_broker_port_is_retried_one_line_per_attempt(pg_dsn):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = WorkerProcess(
        {
            "DATASPACE_PG_DSN": pg_dsn,
            "DATASPACE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/%2F",
            "DATASPACE_METRICS_PORT": "0",
        }
    )
    try:
        worker.wait_for("retrying in 0.8s", timeout=30)
        assert worker.terminate() == 0
    finally:
        worker.kill()
    attempts = [line for line in worker.lines if "unavailable:" in line]
    assert len(attempts) >= 3
    assert all("connection refused (is RabbitMQ running" in line for line in attempts)
    assert not [line for line in worker.lines if "pika." in line or "Traceback" in line]


def test_a_missing_exchange_plugin_is_fatal_and_names_the_plugin(amqp_url, pg_dsn):
    """--lanes without rabbitmq_consistent_hash_exchange: the broker closes the
    connection over an unknown exchange type. Shown here with a type no broker has."""
    topo = topology()
    bogus = type(topo)(
        exchanges=(*topo.exchanges, ("dataspace.bogus", "x-consistent-hash-missing")),
        queues=topo.queues,
        exchange_arguments=topo.exchange_arguments,
        exchange_bindings=topo.exchange_bindings,
    )
    datasource = PostgresDataSource({"dsn": pg_dsn, "pool_size": 1})
    pool = WorkerPool(amqp_url, Dispatcher(datasource), bogus, consumers=1, connect_timeout=5)
    pool.start()
    try:
        assert pool.stopping.wait(30), "the pool kept retrying"
    finally:
        pool.stop(1)
        datasource.close()
    assert "unknown exchange type" in pool.fatal
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in pool.fatal


def test_connection_problems_are_said_in_words(amqp_url):
    def problem(url: str):
        params = pika.URLParameters(url)
        params.socket_timeout = params.stack_timeout = 2
        params.connection_attempts = 1
        try:
            pika.BlockingConnection(params).close()
        except Exception as exc:  # noqa: BLE001 - what pika raises is the point
            return describe(exc)
        raise AssertionError(f"{url} connected")

    with socket.socket() as silent:  # accepts, never speaks AMQP
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        timed_out = problem(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    assert "timed out" in timed_out.text and not timed_out.configuration
    refused = problem(amqp_url.replace("guest:guest@", "guest:nope@"))
    assert refused.configuration and "authentication refused" in refused.text
    vhost = amqp_url.rsplit("/", 1)[0] + "/no-such-vhost-x"
    missing = problem(vhost)
    assert missing.configuration and "no-such-vhost-x" in missing.text
