"""One cause, one message and one exit code, whatever the ``dataspace`` command; short
flags; output into a pipe that closes; one output format for ``reap``, and its
progress on a terminal only.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import uuid

import orjson
import pika
import pytest

from dataspace_client import cli
from dataspace_worker.topology import declare_blocking, topology
from tests.faults.instances import free_port
from tests.support.terminal import read_terminal

SCRIPT = os.path.join(os.path.dirname(sys.executable), "dataspace")
#: every command that talks to the broker, with what it needs to get that far
COMMANDS = (
    ["status"],
    ["dead", "list"],
    ["dead", "replay", "-y"],
    ["dead", "purge", "-y"],
    ["dead", "drop", "some-id", "-y"],
    ["get", "1", "1", "k"],
    ["put", "1", "1", "k", '{"a": 1}'],
    ["reap", "--now", "--days", "30"],
)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}


@pytest.fixture(autouse=True)
def _no_urls_from_the_environment(monkeypatch):
    monkeypatch.delenv("DATASPACE_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv("DATASPACE_AMQP_URL", raising=False)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_wrong_password_is_the_same_line_and_exit_2_everywhere(capsys, amqp_url, command):
    url = amqp_url.replace("guest:guest@", "guest:Zq9-wrong@")
    code, out, err = _run(capsys, *command, "--url", url, "--timeout", "5")
    masked = amqp_url.replace("guest:guest@", "guest:***@")
    assert (code, out) == (2, ""), err
    assert err == (
        f"dataspace: authentication refused by the broker at {masked} (check the user and "
        "password)\n"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_closed_port_is_cannot_reach_and_exit_3_everywhere(capsys, amqp_url, command):
    port = free_port()
    url = amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{port}")
    code, out, err = _run(capsys, *command, "-u", url, "-t", "5")
    line = (
        f"cannot reach the broker at {url.replace('guest:guest@', 'guest:***@')}: connection "
        f"refused (is RabbitMQ running and listening on port {port}?)"
    )
    assert code == 3, out + err
    if command == ["status"]:  # the management API answers: the report says it
        assert f"UNHEALTHY:\n  - {line}\n" in out and err == ""
    else:
        assert (out, err) == ("", f"dataspace: {line}\n")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_vhost_the_broker_lacks_is_the_same_line_everywhere(capsys, amqp_url, command):
    url = amqp_url + "-no-such-vhost"
    code, out, err = _run(capsys, *command, "-u", url, "-t", "5")
    vhost, masked = url.rsplit("/", 1)[1], url.replace("guest:guest@", "guest:***@")
    assert (code, out) == (2, ""), err
    assert err == (
        f"dataspace: no vhost {vhost!r} on the broker at {masked} (check the vhost at the end "
        "of the URL)\n"
    )


def test_not_found_says_what_was_asked_for_not_sql(capsys, amqp_url, worker_pool):
    missing = 10**12 + int(uuid.uuid4().int % 10**6)  # no such task manager
    code, out, err = _run(capsys, "get", str(missing), "3", "resources", "--url", amqp_url)
    assert (code, out) == (4, "")
    assert err == (
        f"dataspace: not found: product 'resources' of task manager {missing}, generation 3 "
        "(check TM_SEQ, GEN and KEY)\n"
    )
    code, out, err = _run(
        capsys, "put", str(missing), "3", "resources", '{"a": 1}', "--url", amqp_url
    )
    assert (code, out) == (4, "")
    assert err == (
        f"dataspace: not found: task manager {missing} (put stores products of a task manager "
        "that exists: check TM_SEQ)\n"
    )
    assert "Key (" not in err and "table" not in err


def test_short_flags():
    args = cli.parser._parser().parse_args(["-u", "amqp://h/v", "-t", "5", "status", "-j"])
    assert (args.url, args.timeout, args.json) == ("amqp://h/v", 5.0, True)
    args = cli.parser._parser().parse_args(["dead", "list", "-n", "3", "-j", "-t", "2"])
    assert (args.limit, args.json, args.timeout) == (3, True, 2.0)
    args = cli.parser._parser().parse_args(["dead", "replay", "-y", "-n", "1", "-u", "amqp://x/"])
    assert (args.yes, args.limit, args.url) == (True, 1, "amqp://x/")
    args = cli.parser._parser().parse_args(["dead", "purge", "-y", "--code", "a", "--code", "b"])
    assert (args.yes, args.code) == (True, ["a", "b"])
    args = cli.parser._parser().parse_args(["dead", "drop", "m1", "m2", "-y"])
    assert (args.message_ids, args.yes) == (["m1", "m2"], True)
    args = cli.parser._parser().parse_args(["reap", "--now", "--days", "30", "-j"])
    assert args.json


@pytest.fixture
def many_dead_letters(own_vhost):
    """A vhost with 400 dead letters: more output than a pipe holds."""
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    declare_blocking(channel, topology())
    channel.confirm_delivery()
    for i in range(400):
        channel.basic_publish(
            "",
            "dataspace.dead",
            b"x" * 200,
            pika.BasicProperties(message_id=f"pipe-{i}", headers={"x-dataspace-reason": "r" * 200}),
        )
    connection.close()
    return own_vhost


@pytest.mark.parametrize(
    "command",
    ["status", "dead list --limit 400", "dead list --limit 400 --json", "status --json"],
)
def test_a_pipe_closed_by_its_reader_ends_quietly(many_dead_letters, command):
    """``dataspace dead list | head -1``: the reader goes before the command is done."""
    done = subprocess.run(
        f"{SCRIPT} {command} --url '{many_dead_letters}' | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert done.stderr == "", done.stderr
    assert done.returncode in (0, 1, 5), done  # status: no worker consumes there (1)
    assert done.stdout.count("\n") == 1


def _on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal (100 columns): exit code,
    stdout, what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [SCRIPT, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=_env()
    )
    os.close(slave)
    try:
        shown = read_terminal(master, process)
        out = process.stdout.read().decode()
        process.wait(60)
    finally:
        os.close(master)
    return process.returncode, out, shown


def test_reap_shows_the_time_elapsed_on_a_terminal_and_prints_one_format(amqp_url, worker_pool):
    code, out, shown = _on_a_terminal(["reap", "--now", "--days", "36500", "-u", amqp_url])
    assert code == 0, shown
    assert "reaping (older than 36500 days): 00:0" in shown and "elapsed" in shown
    assert out.startswith("reaped task managers older than 36500 days: ")
    assert out.count("\n") == 1
    code, out, shown = _on_a_terminal(["reap", "--now", "--days", "36500", "-j", "-u", amqp_url])
    assert code == 0, shown
    assert set(orjson.loads(out)) >= {"taskmanagers", "dataproducts", "batches", "seconds"}
