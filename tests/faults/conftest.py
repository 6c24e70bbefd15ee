"""Fixtures for the fault tests: throwaway instances, fresh vhosts and databases, workers.

Run them alone with ``pytest -q tests/faults`` or select them with ``-m fault``.
The figures each test gathers are printed (visible with ``-s``) and repeated in a
"fault figures" section at the end of the run, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import pytest
from psycopg2 import extensions

from dataspace_client import DataSpace
from tests import services
from tests.support.lanes import lanes_space

from .instances import InstanceUnavailable, throwaway_postgres, throwaway_rabbitmq
from .workers import WorkerStarter


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fault: fault injection (killed worker, restarted database or broker)"
    )


@pytest.fixture(autouse=True)
def _quiet_pika():
    """The client's pika logs every refused reconnection attempt at ERROR: noise here."""
    logger = logging.getLogger("pika")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture
def report_figures(request):
    """``report_figures(figures)``: print a test's figures and keep them for the summary."""

    def report(figures: dict) -> None:
        line = f"{request.node.name}: {json.dumps(figures, sort_keys=False)}"
        print(line)
        request.node.user_properties.append(("fault figures", line))

    return report


# -- throwaway instances (session: they take seconds to start) ----------------------
@pytest.fixture(scope="session")
def _throwaway_postgres():
    with contextlib.ExitStack() as stack:
        try:
            instance = stack.enter_context(throwaway_postgres())
        except InstanceUnavailable as exc:
            pytest.skip(f"no throwaway PostgreSQL here: {exc}")
        yield instance


@pytest.fixture(scope="session")
def _throwaway_rabbitmq():
    with contextlib.ExitStack() as stack:
        try:
            instance = stack.enter_context(throwaway_rabbitmq())
        except InstanceUnavailable as exc:
            pytest.skip(f"no throwaway RabbitMQ here: {exc}")
        yield instance


@pytest.fixture
def throwaway_pg(_throwaway_postgres):
    """The session's throwaway PostgreSQL, running (started again if a test left it down)."""
    if not _throwaway_postgres.running:
        _throwaway_postgres.start()
    return _throwaway_postgres


@pytest.fixture
def throwaway_mq(_throwaway_rabbitmq):
    """The session's throwaway RabbitMQ node, running (started again if a test left it down)."""
    if not _throwaway_rabbitmq.running:
        _throwaway_rabbitmq.start()
    return _throwaway_rabbitmq


# -- fresh vhosts and databases on the machine's own services ------------------------
@pytest.fixture
def fresh_vhost(own_vhost):
    """A new vhost on the tests' broker, for one test's worker and clients only."""
    return own_vhost


@pytest.fixture
def fresh_database(pg_dsn):
    """A new, empty database on the tests' PostgreSQL (the worker creates the schema)."""
    with services.scratch_database(extensions.make_dsn(pg_dsn, dbname="postgres")) as dsn:
        yield dsn


# -- workers and clients -------------------------------------------------------------
@pytest.fixture
def start_worker():
    """``start_worker(env)``: a ``dataspace-worker`` subprocess, consuming; killed at teardown."""
    starter = WorkerStarter()
    yield starter
    starter.stop_all(keep_in=os.environ.get("DATASPACE_TEST_LOG_DIR"))


@pytest.fixture
def open_space():
    """``open_space(url, timeout, lanes=False)``: a remote DataSpace (its client routing
    through the ordering lanes with ``lanes``), closed at teardown."""
    spaces: list[DataSpace] = []

    def open_(url: str | list[str], timeout: float, lanes: bool = False) -> DataSpace:
        space = lanes_space(url, lanes, timeout)
        spaces.append(space)
        return space

    yield open_
    for space in spaces:
        with contextlib.suppress(Exception):
            space.close()
