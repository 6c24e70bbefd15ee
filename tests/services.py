"""Where the tests find PostgreSQL and RabbitMQ, and how each run isolates itself.

Order of preference: the URLs in DATASPACE_TEST_PG_DSN / DATASPACE_TEST_AMQP_URL,
else the local services; where those are unreachable and a Docker engine is,
containers started with testcontainers.  Each run gets its own database and its
own RabbitMQ vhost, removed at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2
from psycopg2 import extensions
from psycopg2 import sql as pgsql

DEFAULT_PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


#: the broker plugins the tests use: the management API (dataspace status, dead
#: letters, definitions) and the consistent-hash exchange (ordering lanes)
BROKER_PLUGINS = ("rabbitmq_management", "rabbitmq_consistent_hash_exchange")


def ensure_broker_plugins(url: str, timeout: float = 60.0) -> None:
    """Enable the plugins the tests use on a local broker that lacks them, as
    .ci/run does, so that the README's test command works on a fresh machine;
    wait for the management API when it was just enabled. Enabling an enabled
    plugin changes nothing; a remote broker is left as it is."""
    tool = shutil.which("rabbitmq-plugins")
    if tool is None or urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return
    listed = subprocess.run(
        [tool, "-q", "list", "-e", "-m"], capture_output=True, text=True, timeout=60
    )
    enabled = set(listed.stdout.split())
    missing = [p for p in BROKER_PLUGINS if p not in enabled]
    if listed.returncode != 0 or not missing:
        return
    subprocess.run([tool, "-q", "enable", *missing], capture_output=True, timeout=120, check=False)
    if "rabbitmq_management" in missing:
        deadline = time.monotonic() + timeout
        while not reachable("127.0.0.1", 15672) and time.monotonic() < deadline:
            time.sleep(0.5)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def pg_reachable(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


def amqp_reachable(url: str) -> bool:
    parts = urlsplit(url)
    return reachable(parts.hostname or "127.0.0.1", parts.port or 5672)


@contextmanager
def scratch_database(admin_dsn: str):
    """A new, empty database for this run; dropped afterwards."""
    name = f"dataspace_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
        yield extensions.make_dsn(admin_dsn, dbname=name)
    finally:
        with admin.cursor() as cur:
            cur.execute(
                pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))
            )
        admin.close()


def with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@contextmanager
def scratch_vhost(base_url: str):
    """A new vhost for this run, through rabbitmqctl when the broker is local.

    Without rabbitmqctl the base URL's vhost is used as it is (the run is then not
    isolated from others on that vhost).
    """
    ctl = shutil.which("rabbitmqctl")
    host = urlsplit(base_url).hostname
    if ctl is None or host not in ("127.0.0.1", "localhost", "::1"):
        yield base_url
        return
    vhost = f"dataspace-test-{uuid.uuid4().hex[:10]}"
    user = urlsplit(base_url).username or "guest"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield with_vhost(base_url, vhost)
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


@contextmanager
def running_pool(
    amqp_url: str,
    pg_dsn: str,
    *,
    consumers: int = 2,
    prefetch: int = 4,
    max_body: int = 64 * 1024 * 1024,
    pool_size: int | None = None,
    lanes: int = 0,
    **settings,
):
    """A real worker pool in this process (its consumers, the reaper consumer and
    ``lanes`` ordering lanes), serving ``amqp_url`` and ``pg_dsn``; consuming when
    yielded, stopped after. Built as the command builds its own (``build_worker``);
    ``settings`` are ``WorkerSettings`` fields other than the defaults."""
    import threading

    from dataspace_worker.assembly import build_worker, database_connections
    from dataspace_worker.config import WorkerSettings
    from dataspace_worker.postgres import PostgresDataSource

    config = WorkerSettings.with_defaults(
        amqp_url=amqp_url,
        pg_dsn=pg_dsn,
        consumers=consumers,
        prefetch=prefetch,
        max_body=max_body,
        lanes=lanes,
        **settings,
    )
    stop = threading.Event()
    datasource = PostgresDataSource(
        {
            "dsn": pg_dsn,
            "pool_size": pool_size or database_connections(config),
            "retry_timeout": 30,
        },
        stop,
    )
    pool = build_worker(config, datasource, stop=stop, trust_scheduled_reaps=False).pool
    pool.start()
    try:
        if not pool.consuming.wait(30):
            raise AssertionError(f"the worker pool did not start consuming: {pool.fatal}")
        yield pool
    finally:
        pool.stop(10)
        datasource.close()


def drain_queue(url: str, queue: str, idle: float = 5.0, deadline: float = 120.0) -> list[tuple]:
    """Read and ack everything in ``queue`` until it stays empty for ``idle`` seconds
    (``deadline`` seconds at most); return ``(properties, body)`` pairs."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    got = []
    idle_since = time.monotonic()
    give_up = time.monotonic() + deadline
    for method, props, body in channel.consume(queue, inactivity_timeout=0.2):
        if method is None:
            if time.monotonic() - idle_since > idle or time.monotonic() > give_up:
                break
            continue
        idle_since = time.monotonic()
        got.append((props, body))
        channel.basic_ack(method.delivery_tag)
    channel.cancel()
    connection.close()
    return got


def close_broker_connections(name_fragment: str) -> int:
    """Close (as an operator would, with rabbitmqctl) every broker connection whose
    client properties mention ``name_fragment``; return how many."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    closed = 0
    for line in listing.splitlines():
        if name_fragment in line:
            pid = line.split("\t")[0]
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid, "closed by a dataspace test"],
                capture_output=True,
                timeout=60,
            )
            closed += 1
    return closed


def poll(predicate, timeout: float, pause: float = 0.05, suppress: tuple = ()):
    """Call ``predicate`` until it returns something true, for at most ``timeout``
    seconds; ``(value, seconds)``, or ``(None, seconds)``. Exceptions of the
    ``suppress`` types count as a false result."""
    started = time.monotonic()
    while True:
        value = None
        try:
            value = predicate()
        except suppress:
            pass
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None, time.monotonic() - started
        time.sleep(pause)
