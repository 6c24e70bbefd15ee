"""``dataspace dead``: list, replay, purge and drop, with filters, leaving what they do
not remove where it was, in order.

Each test has a vhost of its own with the service's topology and no worker, and puts
its dead letters into dataspace.dead itself (through the default exchange, the way a
worker's look: the reason, code, original routing key, epoch seconds).

What RabbitMQ 3.10.8 does to a quorum queue's messages that are looked at and given
back (measured here, and why the commands look through a consumer):

- a consumer's unacknowledged messages, when it is cancelled or its channel or
  connection closes (or the process is killed), go back to the head, in order;
- messages taken with basic.get and given back by closing the channel come back at
  the head in no particular order once more than a few are held (the management
  API's "Get messages", ackmode ack_requeue_true, too);
- a basic.nack or basic.reject with requeue puts the message at the tail;
- whichever way, a message given back is marked redelivered and its
  x-delivery-count raised by one.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.parse

import orjson
import pika
import pytest

from dataspace_client import cli
from dataspace_worker.topology import declare_blocking, topology
from tests.support.terminal import read_terminal
from tests.support.urls import dead_url

SCRIPT = os.path.join(os.path.dirname(sys.executable), "dataspace")
EPOCH = 1700000000  # 2023-11-14T22:13:20Z


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}


@pytest.fixture
def dead(own_vhost):
    """A vhost with the service's topology; yields (url, publish) where publish(i, ...)
    dead-letters request number i the way a worker does."""
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    declare_blocking(channel, topology())
    channel.confirm_delivery()

    def publish(i: int, code: str = "not_found", op: str = "insert", reason: str = "no product"):
        channel.basic_publish(
            "",
            "dataspace.dead",
            orjson.dumps({"v": 1, "op": op, "args": {"i": i}}),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=f"m{i}",
                type=op,
                headers={
                    "x-dataspace-protocol": 1,
                    "x-dataspace-reason": f"{reason} (request {i})",
                    "x-dataspace-error-code": code,
                    "x-original-exchange": "dataspace",
                    "x-original-routing-key": f"data.{op}",
                    "x-dead-lettered-by": "dataspace-worker/0.1.0",
                    "x-dead-lettered-at": EPOCH + i,
                },
            ),
        )

    yield own_vhost, publish
    connection.close()


def _in_queue(url: str, queue: str = "dataspace.dead") -> list[tuple[str, bool, int]]:
    """``(message_id, redelivered, x-delivery-count)`` of every message of ``queue``, in
    order, left there (held by a consumer, given back when its connection closes)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    count = channel.queue_declare(queue, passive=True).method.message_count
    found = []
    if count:
        channel.basic_qos(prefetch_count=count)
        for method, props, _ in channel.consume(queue, inactivity_timeout=2):
            if method is None:
                break
            headers = props.headers or {}
            found.append((props.message_id, method.redelivered, headers.get("x-delivery-count")))
            if len(found) == count:
                break
    channel.close()
    # the queue takes them back a moment after the close: wait for that
    probe = connection.channel()
    deadline = time.monotonic() + 5
    while probe.queue_declare(queue, passive=True).method.message_count < count:
        assert time.monotonic() < deadline, f"{queue} did not take its messages back"
        connection.sleep(0.05)
    connection.close()
    return found


def _ids(url: str, queue: str = "dataspace.dead") -> list[str]:
    return [m for m, _, _ in _in_queue(url, queue)]


def _ids_of(count: int, removed=()) -> list[str]:
    return [f"m{i}" for i in range(count) if i not in set(removed)]


# -- list -----------------------------------------------------------------------------
def test_list_leaves_every_dead_letter_where_it_was(capsys, dead):
    """40 dead letters: over the 32 or so that basic.get (and the management API's "Get
    messages") give back in order, so a look that way would shuffle them."""
    url, publish = dead
    for i in range(40):
        publish(i)
    code, out, err = _run(capsys, "dead", "list", "--limit", "40", "--json", "--url", url)
    assert code == 0, err
    listed = orjson.loads(out)
    assert (listed["total"], listed["examined"], listed["matching"]) == (40, 40, 40)
    assert [e["message_id"] for e in listed["messages"]] == _ids_of(40)
    first = listed["messages"][0]
    assert first["time"] == "2023-11-14T22:13:20Z"  # x-dead-lettered-at, epoch seconds
    assert listed["messages"][39]["time"] == "2023-11-14T22:13:59Z"
    assert (first["code"], first["operation"], first["routing_key"]) == (
        "not_found",
        "insert",
        "data.insert",
    )
    assert first["reason"] == "no product (request 0)"
    assert first["preview"] == '{"v":1,"op":"insert","args":{"i":0}}'
    assert _ids(url) == _ids_of(40)  # all there, in order
    # Ten shown, twice: still all in order (a look at only the first ten, given back
    # after the look at all forty, would have put them behind the other thirty). What
    # looking costs is the measured mark: redelivered, x-delivery-count one more per
    # look (the helper's looks too).
    for _ in range(2):
        code, out, err = _run(capsys, "dead", "list", "--limit", "10", "--url", url)
        assert code == 0, err
    assert out.splitlines()[0].startswith("m0  insert  not_found  2023-11-14T22:13:20Z  ")
    assert out.splitlines()[-1] == (
        f"10 shown (-n 10); 40 dead letter(s) in dataspace.dead of vhost "
        f"{urllib.parse.unquote(url.rsplit('/', 1)[1])!r}"
    )
    state = _in_queue(url)
    assert [m for m, _, _ in state] == _ids_of(40)
    assert all(redelivered for _, redelivered, _ in state)
    assert [count for _, _, count in state] == [4] * 40


def test_list_filters(capsys, dead):
    url, publish = dead
    publish(0, code="not_found", op="insert", reason="no product")
    publish(1, code="bad_request", op="insert", reason="body is not valid JSON")
    publish(2, code="not_found", op="update", reason="No Product")
    publish(3, code="unavailable", op="get_dataproduct", reason="database unavailable")
    connection = pika.BlockingConnection(pika.URLParameters(url))  # one the broker made
    channel = connection.channel()
    channel.basic_publish(
        "",
        "dataspace.dead",
        b"{}",
        pika.BasicProperties(
            message_id="m4",
            headers={
                "x-death": [
                    {
                        "reason": "delivery_limit",
                        "queue": "dataspace.requests",
                        "count": 1,
                        "routing-keys": ["data.delete"],
                        "exchange": "dataspace",
                    }
                ]
            },
        ),
    )
    connection.close()

    def listed(*filters: str) -> list[str]:
        code, out, err = _run(capsys, "dead", "list", "-j", "-u", url, *filters)
        assert code == 0, err
        return [e["message_id"] for e in orjson.loads(out)["messages"]]

    assert listed() == ["m0", "m1", "m2", "m3", "m4"]
    assert listed("--code", "not_found") == ["m0", "m2"]
    assert listed("--code", "not_found", "--code", "unavailable") == ["m0", "m2", "m3"]
    assert listed("--operation", "insert") == ["m0", "m1"]
    assert listed("--operation", "delete") == ["m4"]  # by the x-death routing key
    assert listed("--reason", "NO PRODUCT") == ["m0", "m2"]  # a part, any case
    assert listed("--code", "not_found", "--operation", "update") == ["m2"]
    assert listed("--code", "delivery_limit") == ["m4"]
    assert listed("--message-id", "m3", "--message-id", "m1") == ["m1", "m3"]
    assert listed("--code", "exists") == []
    code, out, _ = _run(capsys, "dead", "list", "--code", "bad_request", "-u", url)
    assert out.splitlines()[-1].startswith("1 shown of 1 matching; 5 dead letter(s)")


# -- purge and drop ---------------------------------------------------------------------
def test_purge_everything_asks_or_needs_yes(capsys, dead):
    url, publish = dead
    for i in range(5):
        publish(i)
    code, out, err = _run(capsys, "dead", "purge", "-u", url)  # no terminal to ask on
    assert code == 2 and out == ""
    assert err == (
        "dataspace: purge removes dead letters for good: pass -y (there is no terminal to ask on)\n"
    )
    assert _ids(url) == _ids_of(5)
    code, out, err = _run(capsys, "dead", "purge", "-y", "-u", url)
    assert code == 0, err
    assert out.startswith("purged 5 dead letter(s) from dataspace.dead of vhost ")
    assert _ids(url) == []
    code, out, _ = _run(capsys, "dead", "purge", "-y", "-u", url)
    assert code == 0 and out.startswith("purged 0 (no dead letters in dataspace.dead")


def test_purge_of_those_matching_keeps_the_others_in_order(capsys, dead):
    url, publish = dead
    for i in range(40):
        publish(i, code="bad_request" if i % 3 == 0 else "not_found")
    code, out, err = _run(capsys, "dead", "purge", "--code", "bad_request", "-y", "-u", url)
    assert code == 0, err
    assert out.startswith("purged 14 of 40 dead letter(s) from dataspace.dead of vhost ")
    assert _ids(url) == _ids_of(40, removed=range(0, 40, 3))
    # again, after those looks: m1 and m10 to m19 (those still there)
    code, out, err = _run(capsys, "dead", "purge", "--reason", "request 1", "-y", "-u", url)
    assert code == 0, err
    assert out.startswith("purged 8 of 26 dead letter(s)")
    removed = {*range(0, 40, 3), 1, *range(10, 20)}
    assert _ids(url) == _ids_of(40, removed=removed)


def test_drop_removes_the_named_ones_and_says_which_are_not_there(capsys, dead):
    url, publish = dead
    for i in range(40):
        publish(i)
    publish(7)  # the same request dead-lettered twice: both go
    code, out, err = _run(capsys, "dead", "drop", "m7", "m33", "m2", "-y", "-u", url)
    assert code == 0, err
    assert out.startswith("dropped 4 dead letter(s) from dataspace.dead of vhost ")
    assert _ids(url) == _ids_of(40, removed=[2, 7, 33])
    code, out, err = _run(capsys, "dead", "drop", "m5", "no-such-id", "-y", "-u", url)
    assert code == 4
    assert out.startswith("dropped 1 dead letter(s)")
    assert err == (
        "dataspace: not found in dataspace.dead: no-such-id; 'dataspace dead list' shows what "
        "is there\n"
    )
    assert _ids(url) == _ids_of(40, removed=[2, 5, 7, 33])
    code, _, err = _run(capsys, "dead", "drop", "m6", "-u", url)  # no terminal, no -y
    assert code == 2 and "pass -y" in err


def _on_a_terminal(argv: list[str]) -> tuple[subprocess.Popen, int]:
    """The command with its stdin on a pseudo-terminal (so it asks), stderr a pipe."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [SCRIPT, *argv],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    os.close(slave)
    return process, master


def _until_asked(process: subprocess.Popen, timeout: float = 30) -> str:
    text = b""
    deadline = time.monotonic() + timeout
    while b"[y/N]" not in text:
        assert time.monotonic() < deadline, text
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, text  # ended without asking
            text += chunk
    return text.decode()


def test_a_purge_that_dies_while_asking_loses_nothing(dead):
    """It holds every dead letter it looked at (unacked) while it asks: killed then, the
    broker gives them all back, in order."""
    url, publish = dead
    for i in range(40):
        publish(i, code="bad_request" if i % 2 else "not_found")
    process, master = _on_a_terminal(["dead", "purge", "--code", "bad_request", "-u", url])
    try:
        question = _until_asked(process)
        assert "remove 20 dead letter(s) with code 'bad_request', of the 40 there" in question
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        os.close(master)
    deadline = time.monotonic() + 10  # the broker learns of the end of the connection
    while len(_ids(url)) < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ids(url) == _ids_of(40)


def test_no_for_an_answer_removes_nothing(dead):
    url, publish = dead
    for i in range(10):
        publish(i)
    process, master = _on_a_terminal(["dead", "drop", "m3", "m4", "-u", url])
    try:
        question = _until_asked(process)
        assert "remove 2 dead letter(s) with the message_id(s) given" in question
        os.write(master, b"n\n")
        out, err = process.communicate(timeout=30)
    finally:
        os.close(master)
    assert process.returncode == 1, err
    assert b"not dropped: answered no" in err
    assert _ids(url) == _ids_of(10)


# -- replay -------------------------------------------------------------------------------
def test_replay_of_those_matching_keeps_the_others_in_order(capsys, dead):
    url, publish = dead
    for i in range(40):
        publish(i, code="unavailable" if i % 4 == 0 else "not_found")
    code, out, err = _run(capsys, "dead", "replay", "--code", "unavailable", "-y", "-u", url)
    assert code == 0, err
    assert err == ""  # no terminal: no progress bar
    assert out == "replayed 10, skipped 0, 30 left in place\n"
    assert _ids(url) == _ids_of(40, removed=range(0, 40, 4))
    # no worker here: the copies wait in dataspace.requests, in order, message_id kept
    assert _ids(url, "dataspace.requests") == [f"m{i}" for i in range(0, 40, 4)]


def test_replay_shows_progress_on_a_terminal_only(dead):
    url, publish = dead
    for i in range(5):
        publish(i, op="get_schema")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    process = subprocess.Popen(
        [SCRIPT, "dead", "replay", "-y", "-u", url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=_env(),
    )
    os.close(slave)
    try:
        terminal = read_terminal(master, process)
        out = process.stdout.read().decode()
        process.wait(30)
    finally:
        os.close(master)
    assert process.returncode == 0, terminal
    assert "replaying: 100%" in terminal and "5/5" in terminal
    assert out == "replayed 5, skipped 0\n"  # stdout: the summary only


# -- what the broker does (RabbitMQ 3.10.8, a quorum queue) --------------------------------
def test_what_a_quorum_queue_does_with_messages_given_back(dead):
    """The measurements the dead commands are built on (the module docstring)."""
    url, publish = dead
    connection = pika.BlockingConnection(pika.URLParameters(url))

    def take(count: int):
        channel = connection.channel()
        channel.basic_qos(prefetch_count=count)
        for n, _delivery in enumerate(channel.consume("dataspace.dead"), 1):
            if n == count:
                break
        return channel

    def give_back(channel, expected: int) -> None:
        """Close ``channel``; wait until the queue has taken its messages back."""
        channel.close()
        probe = connection.channel()
        deadline = time.monotonic() + 5
        while probe.queue_declare("dataspace.dead", passive=True).method.message_count < expected:
            assert time.monotonic() < deadline
            connection.sleep(0.05)
        probe.close()

    def reset(count: int) -> None:
        connection.channel().queue_purge("dataspace.dead")
        for i in range(count):
            publish(i)

    try:
        # a consumer's messages, given back: at the head, in order, marked
        reset(40)
        give_back(take(20), 40)
        state = _in_queue(url)
        assert [m for m, _, _ in state] == _ids_of(40)
        assert [(r, c) for _, r, c in state[:20]] == [(True, 1)] * 20
        # a part given back after a look at the whole: behind the rest
        reset(40)
        give_back(take(40), 40)
        give_back(take(10), 40)
        assert _ids(url) == [f"m{i}" for i in [*range(10, 40), *range(10)]]
        # a nack with requeue: behind the others
        reset(3)
        channel = connection.channel()
        method, _, _ = channel.basic_get("dataspace.dead")
        channel.basic_nack(method.delivery_tag, requeue=True)
        give_back(channel, 3)
        assert _ids(url) == ["m1", "m2", "m0"]
        # basic.get (the management API's "Get messages" too), 40 held: shuffled
        reset(40)
        channel = connection.channel()
        for _ in range(40):
            channel.basic_get("dataspace.dead")
        give_back(channel, 40)
        shuffled = _ids(url)
        assert sorted(shuffled) == sorted(_ids_of(40)) and shuffled != _ids_of(40)
    finally:
        connection.close()


def test_a_cluster_list_works_as_the_worker_takes_it(capsys, dead):
    """``-u`` (or DATASPACE_AMQP_URL) may name a cluster's nodes, comma-separated, as
    the worker's setting does: a node that does not answer is passed over, and the
    vhost is the one in the URLs (not ``'/,amqp:'``)."""
    url, publish = dead
    for i in range(3):
        publish(i)
    cluster = f"{dead_url(url)},{url}"
    code, out, err = _run(capsys, "dead", "list", "-u", cluster)
    assert code == 0, err
    assert all(f"m{i}" in out for i in range(3))
    code, out, err = _run(capsys, "dead", "replay", "-y", "-u", cluster)
    assert code == 0, err
    assert out == "replayed 3, skipped 0\n"
    assert _ids(url, "dataspace.requests") == ["m0", "m1", "m2"]
