"""``dataspace status`` checks the broker URL itself, counts now, names the consumers,
and says dead letters are a warning (exit 5), not silence and not a failure.

Each test has a vhost of its own (``own_vhost``) with the service's topology and,
where the test wants a healthy service, two consumers that stand in for a worker
(one on dataspace.requests, one on dataspace.reaper) on a connection named the way
workers name theirs.
"""

from __future__ import annotations

import socket
import time
import uuid

import orjson
import pika
import pytest

from dataspace_client import cli
from dataspace_worker.topology import declare_blocking, topology
from tests.faults.instances import free_port

WORKER_NAME = "dataspace-worker test-w1 on testhost pid 4242"
MANAGEMENT = "http://guest:guest@127.0.0.1:15672/"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _with_port(url: str, port: int) -> str:
    return url.replace("127.0.0.1:5672", f"127.0.0.1:{port}")


def _masked(url: str) -> str:
    return url.replace("guest:guest@", "guest:***@")


@pytest.fixture(autouse=True)
def _no_urls_from_the_environment(monkeypatch):
    monkeypatch.delenv("DATASPACE_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv("DATASPACE_AMQP_URL", raising=False)


@pytest.fixture
def declared(own_vhost):
    """A vhost with the service's topology and nothing consuming."""
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    declare_blocking(connection.channel(), topology())
    connection.close()
    return own_vhost


@pytest.fixture
def served(declared):
    """The topology, with one consumer on dataspace.requests and one on dataspace.reaper
    on a connection named like a worker's."""
    params = pika.URLParameters(declared)
    params.client_properties = {"connection_name": WORKER_NAME}
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.basic_consume("dataspace.requests", lambda *a: None, consumer_tag="test-requests-1")
    channel.basic_consume("dataspace.reaper", lambda *a: None, consumer_tag="test-reaper-1")
    yield declared, connection
    connection.close()


def _dead_letter(url: str, count: int = 1) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for _ in range(count):
        channel.basic_publish(
            "",
            "dataspace.dead",
            b'{"v": 1}',
            pika.BasicProperties(
                message_id=uuid.uuid4().hex,
                headers={"x-dataspace-error-code": "bad_request", "x-dataspace-reason": "probe"},
            ),
        )
    connection.close()


def test_healthy_then_dead_letters_are_a_warning_at_once(capsys, served):
    url, _ = served
    code, out, err = _run(capsys, "status", "--url", url)
    assert code == 0, out + err
    assert out.rstrip().endswith("healthy") and "WARNING" not in out

    _dead_letter(url, 2)
    # no waiting: the counts are asked of the queues (the statistics lag up to 5 s)
    code, out, err = _run(capsys, "status", "--json", "--url", url)
    assert code == 5, out + err
    status = orjson.loads(out)
    assert status["state"] == "warnings" and status["healthy"] and status["problems"] == []
    assert status["dead_letters"] == 2
    assert status["warnings"] == [
        "2 dead letter(s) wait in dataspace.dead: look at them with 'dataspace dead list', "
        "then replay, purge or drop them"
    ]
    code, out, err = _run(capsys, "status", "--url", url)
    assert code == 5 and err == ""
    assert "WARNINGS:\n  - 2 dead letter(s) wait in dataspace.dead" in out
    assert out.rstrip().endswith("healthy, with 1 warning(s)")


def test_counts_are_now_not_the_last_statistics(capsys, served):
    url, connection = served
    channel = connection.channel()
    channel.basic_consume("dataspace.requests", lambda *a: None, consumer_tag="test-requests-2")
    code, out, err = _run(capsys, "status", "-j", "-u", url)
    queues = {q["name"]: q for q in orjson.loads(out)["queues"]}
    assert queues["dataspace.requests"]["consumers"] == 2  # the one added a moment ago
    assert queues["dataspace.requests"]["fresh"]
    channel.close()
    code, out, err = _run(capsys, "status", "-j", "-u", url)
    queues = {q["name"]: q for q in orjson.loads(out)["queues"]}
    assert queues["dataspace.requests"]["consumers"] == 1  # and gone again


def test_consumers_are_shown_by_connection_name_and_tag(capsys, served):
    url, _ = served
    # the management API learns of consumers and connections about a second late (until
    # then a consumer is shown by its peer address)
    deadline = time.monotonic() + 15
    while True:
        code, out, err = _run(capsys, "status", "-j", "-u", url)
        queues = {q["name"]: q for q in orjson.loads(out)["queues"]}
        details = [
            c
            for name in ("dataspace.requests", "dataspace.reaper")
            for c in queues[name]["consumer_details"]
        ]
        if len(details) == 2 and all(c["connection_name"] for c in details):
            break
        assert time.monotonic() < deadline, details
        time.sleep(0.3)
    (requests,) = queues["dataspace.requests"]["consumer_details"]
    assert requests["connection_name"] == WORKER_NAME
    assert requests["consumer_tag"] == "test-requests-1"
    (reaper,) = queues["dataspace.reaper"]["consumer_details"]
    assert reaper["activity_status"] == "single_active"
    assert queues["dataspace.reaper"]["active_consumer"]["name"] == WORKER_NAME
    code, out, err = _run(capsys, "status", "-u", url)
    assert code == 0, out + err
    lines = out.splitlines()
    row = next(line for line in lines if "tag test-requests-1" in line)
    assert row.split()[:1] == ["dataspace.requests"] and WORKER_NAME in row
    row = next(line for line in lines if "tag test-reaper-1" in line)
    assert WORKER_NAME in row and row.rstrip().endswith("active")
    assert f"active reaper consumer: {WORKER_NAME} (peer 127.0.0.1:" in out


def test_a_closed_amqp_port_is_not_healthy(capsys, served):
    """The management API answers, the AMQP port does not: unreachable, exit 3."""
    url, _ = served
    port = free_port()
    bad = _with_port(url, port)
    code, out, err = _run(capsys, "status", "--url", bad, "--management-url", MANAGEMENT)
    expected = (
        f"cannot reach the broker at {_masked(bad)}: connection refused (is RabbitMQ running "
        f"and listening on port {port}?)"
    )
    assert code == 3, out + err
    assert f"UNHEALTHY:\n  - {expected}" in out and "AMQP: cannot connect" in out
    code, out, err = _run(capsys, "status", "--json", "--url", bad, "--management-url", MANAGEMENT)
    status = orjson.loads(out)
    assert code == 3 and status["state"] == "unreachable" and not status["healthy"]
    assert status["amqp"] == {"url": _masked(bad), "connected": False, "problem": expected}
    assert status["problems"] == [expected]
    # the rest still comes from the management API
    assert {q["name"] for q in status["queues"]} >= {"dataspace.requests", "dataspace.dead"}


def test_a_silent_amqp_port_times_out(capsys, served):
    url, _ = served
    with socket.socket() as silent:  # accepts connections, never speaks AMQP
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        bad = _with_port(url, silent.getsockname()[1])
        started = time.monotonic()
        code, out, err = _run(
            capsys, "status", "-t", "2", "-u", bad, "--management-url", MANAGEMENT
        )
    assert code == 3, out + err
    assert f"cannot reach the broker at {_masked(bad)}: no answer within 2 s" in out
    assert time.monotonic() - started < 10


def test_wrong_amqp_credentials_are_configuration(capsys, served):
    """The management API takes its own (right) credentials: the AMQP login is what fails."""
    url, _ = served
    bad = url.replace("guest:guest@", "guest:not-the-password@")
    code, out, err = _run(capsys, "status", "--url", bad, "--management-url", MANAGEMENT)
    assert code == 2 and out == ""
    assert err == (
        f"dataspace: authentication refused by the broker at {_masked(url)} (check the user "
        "and password)\n"
    )
    assert "not-the-password" not in err


def test_both_unreachable_says_both(capsys, declared):
    port = free_port()
    api_port = free_port(exclude=(port,))
    bad = _with_port(declared, port)
    code, out, err = _run(
        capsys, "status", "-u", bad, "--management-url", f"http://127.0.0.1:{api_port}/"
    )
    assert code == 3 and out == ""
    first, second = err.splitlines()
    assert first.startswith(f"dataspace: cannot reach the broker at {_masked(bad)}: connection")
    assert second.startswith(
        f"dataspace: management API not reachable at http://127.0.0.1:{api_port}/"
    )


def test_unhealthy_wins_over_warnings(capsys, declared):
    _dead_letter(declared)
    code, out, err = _run(capsys, "status", "-j", "-u", declared)
    status = orjson.loads(out)
    assert code == 1 and status["state"] == "unhealthy"
    assert (
        "no consumer on dataspace.requests: no worker takes requests; start dataspace-worker"
        in (status["problems"])
    )
    assert status["warnings"]  # still said


def test_status_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    out = capsys.readouterr().out
    assert "  5 healthy with warnings (dead letters waiting)\n" in out
    assert "3 broker or management API unreachable" in " ".join(out.split())
