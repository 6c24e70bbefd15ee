"""Shared fixtures: an isolated database and vhost per run, a worker pool, and a
``dataspace`` fixture that runs each test on both backends."""

from __future__ import annotations

import contextlib
import os

import pika
import pytest

from dataspace_client import DataSpace
from dataspace_worker.topology import declare_blocking, topology
from tests import services
from tests.support.configs import inprocess_config, remote_config


def _postgres_admin_dsn(stack: contextlib.ExitStack) -> str:
    dsn = os.environ.get("DATASPACE_TEST_PG_DSN", services.DEFAULT_PG_DSN)
    if services.pg_reachable(dsn):
        return dsn
    if services.docker_available():
        from testcontainers.postgres import PostgresContainer

        container = stack.enter_context(PostgresContainer("postgres:15", driver=None))
        return container.get_connection_url()
    pytest.exit(f"PostgreSQL is not reachable at {dsn} and no Docker engine runs", returncode=3)


#: broker URLs of containers this process started (each test process its own)
_CONTAINERS: set[str] = set()


def _amqp_base_url(stack: contextlib.ExitStack) -> str:
    url = os.environ.get("DATASPACE_TEST_AMQP_URL", services.DEFAULT_AMQP_URL)
    if services.amqp_reachable(url):
        services.ensure_broker_plugins(url)
        return url
    if services.docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        container = stack.enter_context(RabbitMqContainer("rabbitmq:3.10-management"))
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        url = f"amqp://guest:guest@{host}:{port}/%2F"
        _CONTAINERS.add(url)  # this process's own broker: isolated as it is
        return url
    pytest.exit(f"RabbitMQ is not reachable at {url} and no Docker engine runs", returncode=3)


@pytest.fixture(scope="session")
def _stack():
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture(scope="session")
def pg_dsn(_stack) -> str:
    """DSN of a database of this run's own, with the schema created."""
    return _stack.enter_context(services.scratch_database(_postgres_admin_dsn(_stack)))


@pytest.fixture(scope="session")
def amqp_url(_stack) -> str:
    """URL of a vhost of this run's own (of this test process's own under ``-n``)."""
    base = _amqp_base_url(_stack)
    url = _stack.enter_context(services.scratch_vhost(base))
    if url == base and os.environ.get("PYTEST_XDIST_WORKER") and base not in _CONTAINERS:
        pytest.exit(
            f"no rabbitmqctl here to give each test process a vhost of its own on {base}: "
            "their workers would answer each other's requests; run without -n",
            returncode=3,
        )
    return url


@pytest.fixture
def own_vhost(amqp_url):
    """A vhost of its own for one test, with nothing declared in it; removed after."""
    with services.scratch_vhost(services.with_vhost(amqp_url, "/")) as url:
        if url.endswith("/%2F"):
            pytest.skip("needs rabbitmqctl to create a vhost")
        yield url


@pytest.fixture
def queues_without_worker(own_vhost):
    """The service's topology declared on a vhost of its own, and no worker."""
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        declare_blocking(connection.channel(), topology())
    finally:
        connection.close()
    return own_vhost


@pytest.fixture
def pool_factory(pg_dsn):
    """Start in-process worker pools on given URLs (``services.running_pool`` keyword
    arguments); all stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(url: str, **kwargs):
            kwargs.setdefault("pool_size", 2)
            return stack.enter_context(services.running_pool(url, pg_dsn, **kwargs))

        yield start


@pytest.fixture(scope="session")
def worker_pool(pg_dsn, amqp_url):
    """A real worker pool (two consumers and the reaper) serving this run's vhost and database."""
    with services.running_pool(amqp_url, pg_dsn, consumers=2, pool_size=3) as pool:
        yield pool


@pytest.fixture(scope="session")
def inprocess_space(pg_dsn):
    space = DataSpace(inprocess_config(pg_dsn))
    yield space
    space.close()


@pytest.fixture(scope="session")
def remote_space(worker_pool, amqp_url):
    space = DataSpace(remote_config(amqp_url))
    yield space
    space.close()


@pytest.fixture(params=["inprocess", "remote"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def dataspace(backend, request) -> DataSpace:
    """The DataSpace under test: in process on PostgreSQL, or remote through the broker."""
    return request.getfixturevalue(f"{backend}_space")


#: tests that measure time or memory under load, or start instances of their own:
#: under ``-n 2`` they run one after another on one xdist worker (group
#: ``serial``), so that two of them never share the machine's 2 cores
_SERIAL_FILES = ("test_memory_bound.py", "test_memory.py", "test_reply_to.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path
        if path.parent.name == "faults" or path.name in _SERIAL_FILES:
            item.add_marker(pytest.mark.xdist_group("serial"))


def pytest_terminal_summary(terminalreporter):
    """Every fault test's figures (``report_figures`` in tests/faults/conftest.py),
    pass or fail, read from the reports' user properties, which pytest-xdist carries
    back from its worker processes. Here, not in tests/faults/: under ``-n`` the
    main process collects nothing, so only this conftest is loaded there."""
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "fault figures"
    ]
    if lines:
        terminalreporter.section("fault figures")
        for line in lines:
            terminalreporter.write_line(line)
