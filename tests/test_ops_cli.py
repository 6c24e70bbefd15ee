"""The operator's command ``dataspace``: status, dead letters, get/put, exit codes.

Against the real broker (its management API) and the session's worker pool. The
session vhost is shared with other tests that make dead letters too: these tests
look only at their own (by message_id) and take them out of dataspace.dead again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pika
import pytest

from dataspace_client import cli
from dataspace_client.management import ManagementClient, management_url_for, vhost_of
from dataspace_client.remote import RemoteDataSource
from dataspace_client.values import encode_value
from dataspace_core.protocol import OPERATIONS, encode_request
from tests.faults.instances import free_port
from tests.support.raw_clients import RawClient

UNREACHABLE = "management API not reachable at http://127.0.0.1:{port}/: enable the "
HINT = "enable the rabbitmq_management plugin or pass --management-url"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _remove_dead_letters(url: str, message_ids: set[str]) -> set[str]:
    """Take the dead letters with these message_ids out of dataspace.dead; the others
    stay, in order (held by a consumer, not basic.get: see test_dead_tools.py)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    count = channel.queue_declare("dataspace.dead", passive=True).method.message_count
    removed: set[str] = set()
    tags = []
    if count:
        channel.basic_qos(prefetch_count=min(count, 65535))
        for method, props, _ in channel.consume("dataspace.dead", inactivity_timeout=2):
            if method is None:
                break
            if props.message_id in message_ids:
                tags.append(method.delivery_tag)
                removed.add(props.message_id)
            if method.delivery_tag >= min(count, 65535):  # every one there looked at
                break
        channel.cancel()
        for tag in tags:
            channel.basic_ack(tag)
    connection.close()  # the others (unacked) go back to the queue, in order
    return removed


def _dead_entries(capsys, url: str, message_id: str, timeout: float = 15.0) -> list[dict]:
    """``dead list --json`` for one message_id, waiting for it to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        code, out, err = _run(
            capsys, "dead", "list", "--json", "--limit", "5000", "--message-id", message_id,
            "--url", url,
        )  # fmt: skip
        assert code == 0, err
        entries = orjson.loads(out)["messages"]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.3)


@pytest.fixture
def raw(amqp_url, worker_pool):
    client = RawClient(amqp_url)
    yield client
    client.close()


@pytest.fixture
def source(amqp_url, worker_pool):
    remote = RemoteDataSource({"url": amqp_url, "timeout": 30, "app_id": "dataspace-tests"})
    yield remote
    remote.close()


@pytest.fixture
def own_dead_letters(amqp_url):
    """message_ids a test dead-letters; whatever of them is left is removed afterwards."""
    ids: set[str] = set()
    yield ids
    if ids:
        _remove_dead_letters(amqp_url, ids)


@pytest.fixture(autouse=True)
def _no_management_url_from_the_environment(monkeypatch):
    monkeypatch.delenv("DATASPACE_MANAGEMENT_URL", raising=False)


# -- no broker needed ------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [[], ["status"], ["dead"], ["dead", "list"], ["dead", "replay"], ["get"], ["put"], ["reap"]],
)
def test_every_command_has_help_with_examples(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "usage: dataspace" in out


def test_management_url_comes_from_the_broker_url():
    assert management_url_for("amqp://ops:s%40cret@mq.example:5672/prod") == (
        "http://ops:s%40cret@mq.example:15672/"
    )
    assert management_url_for("amqps://mq:5671/%2F") == "https://mq:15671/"
    assert vhost_of("amqp://guest:guest@127.0.0.1:5672/%2F") == "/"
    assert vhost_of("amqp://h/") == vhost_of("amqp://h") == "/"
    assert vhost_of("amqp://h/dataspace-test-1") == "dataspace-test-1"
    api = ManagementClient.for_broker("amqp://ops:s%40cret@mq:5672/prod")
    assert (api.url, api.vhost, api.username) == ("http://mq:15672/", "prod", "ops")
    other = ManagementClient.for_broker("amqp://ops:x@mq/prod", "https://admin:pw@proxy/rabbit/")
    assert (other.url, other.username) == ("https://proxy/rabbit/", "admin")
    assert other._base == "https://proxy/rabbit/api"


def test_replay_takes_the_original_routing_key_and_drops_the_dead_letter_headers():
    worker_made = {"x-original-routing-key": "data.update", "x-death": [{"routing-keys": ["x"]}]}
    assert cli.dead_letters._original_routing_key(worker_made) == "data.update"
    broker_made = {"x-death": [{"reason": "delivery_limit", "routing-keys": ["admin.reap"]}]}
    assert cli.dead_letters._original_routing_key(broker_made) == "admin.reap"
    assert cli.dead_letters._original_routing_key({}) is None
    props = pika.BasicProperties(
        content_type="application/json",
        message_id="m1",
        correlation_id="c1",
        reply_to="amq.rabbitmq.reply-to.gone",
        type="update",
        app_id="someone",
        timestamp=1700000000,
        delivery_mode=2,
        headers={
            "x-dataspace-protocol": 1,
            "x-dataspace-reason": "no product",
            "x-dataspace-error-code": "not_found",
            "x-original-exchange": "dataspace",
            "x-original-routing-key": "data.update",
            "x-dead-lettered-by": "dataspace-worker/0.1.0",
            "x-dead-lettered-at": 1700000001,
            "x-dataspace-publish-seq": 3,
            "x-delivery-count": 0,
            "x-death": [{"reason": "rejected"}],
            "x-first-death-reason": "rejected",
        },
    )
    again = cli.dead_replay._replay_properties(props)
    assert again.headers == {"x-dataspace-protocol": 1}
    assert (again.message_id, again.correlation_id, again.type) == ("m1", "c1", "update")
    assert (again.app_id, again.timestamp, again.delivery_mode) == ("someone", 1700000000, 2)
    assert again.content_type == "application/json" and again.reply_to is None


# -- against the broker and the worker pool ----------------------------------------------
def test_status_with_the_management_api_unreachable_exits_3(capsys, amqp_url, monkeypatch):
    port = free_port()
    code, out, err = _run(
        capsys, "status", "--url", amqp_url, "--management-url", f"http://127.0.0.1:{port}/"
    )
    assert code == 3
    assert UNREACHABLE.format(port=port) in err and HINT in err
    assert out == ""
    monkeypatch.setenv("DATASPACE_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{port}")
    code, _, err = _run(capsys, "status", "--json", "--url", amqp_url)
    assert code == 3 and UNREACHABLE.format(port=port) in err
    assert "guest:guest" not in err


def test_status_with_refused_credentials_exits_2(capsys, amqp_url):
    wrong = "http://guest:not-the-password@127.0.0.1:15672/"
    code, _, err = _run(capsys, "status", "--url", amqp_url, "--management-url", wrong)
    assert code == 2 and "refused user 'guest' (401" in err
    assert "not-the-password" not in err


def test_a_vhost_the_broker_lacks_is_a_configuration_error(capsys, amqp_url):
    url = amqp_url + "-no-such-vhost"
    for argv in (["status"], ["dead", "list"], ["dead", "replay", "--yes"]):
        code, out, err = _run(capsys, *argv, "--url", url)
        assert code == 2, (argv, err)
        assert "no-such-vhost" in err and "guest:guest" not in err


def test_reap_now_still_works(capsys, amqp_url, worker_pool):
    # A retention of a century: through the reaper, and no test's data is that old.
    code, out, err = _run(capsys, "reap", "--now", "--days", "36500", "--url", amqp_url)
    assert code == 0, err
    assert out.startswith("reaped task managers older than 36500 days: ")
    assert out.count("\n") == 1 and err == ""  # one format: the human line, no progress
    code, out, err = _run(capsys, "reap", "--now", "--days", "36500", "-j", "-u", amqp_url)
    assert code == 0, err
    assert out.count("\n") == 1 and err == ""  # one JSON object, nothing else
    assert set(orjson.loads(out)) >= {"taskmanagers", "dataproducts", "batches", "seconds"}


def test_status_and_dead_list_show_a_dead_letter(capsys, raw, amqp_url, own_dead_letters):
    message_id = f"ops-cli-poison-{uuid.uuid4().hex}"
    own_dead_letters.add(message_id)
    marker = uuid.uuid4().hex
    props, body = raw.request(f"not json {marker}".encode(), message_id=message_id)
    assert orjson.loads(body)["error"]["code"] == "bad_request"

    # dead list: through a consumer that gives it back in its place
    entries = _dead_entries(capsys, amqp_url, message_id)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["code"] == "bad_request" and "not valid JSON" in entry["reason"]
    assert entry["routing_key"] == "data.get_schema" == entry["operation"]
    assert entry["size"] == len(f"not json {marker}") and marker in entry["preview"]
    assert entry["time"].endswith("Z")
    again = _dead_entries(capsys, amqp_url, message_id)  # still there, looked at once more
    looked = ("redelivered", "delivery_count")
    assert [{k: v for k, v in e.items() if k not in looked} for e in again] == [
        {k: v for k, v in e.items() if k not in looked} for e in entries
    ]
    # what a look costs on a quorum queue (RabbitMQ 3.10): marked redelivered, counted
    assert (
        again[0]["redelivered"] and again[0]["delivery_count"] == (entry["delivery_count"] or 0) + 1
    )
    code, out, _ = _run(capsys, "dead", "list", "--limit", "5000", "--url", amqp_url)
    assert code == 0
    assert message_id in out and "not valid JSON" in out and marker in out
    assert "dead letter(s) in dataspace.dead" in out

    # status: counts asked of each queue over AMQP, no waiting for the statistics; who
    # the consumers are comes from the management API, about a second behind
    deadline = time.monotonic() + 15
    while True:
        code, out, err = _run(capsys, "status", "--json", "--url", amqp_url)
        status = orjson.loads(out)
        queues = {q["name"]: q for q in status["queues"]}
        if queues["dataspace.reaper"]["active_consumer"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 5, err  # healthy, with a warning: dead letters wait
    assert status["healthy"] and status["problems"] == [] and status["state"] == "warnings"
    assert status["dead_letters"] >= 1, status
    assert any("dead letter(s) wait in dataspace.dead" in w for w in status["warnings"])
    assert {"dataspace.requests", "dataspace.dead", "dataspace.reaper"} <= set(queues)
    assert "dataspace.reaper.schedule" in queues
    assert queues["dataspace.dead"]["messages_ready"] >= 1
    assert queues["dataspace.requests"]["consumers"] >= 2  # the pool's two consumers
    assert queues["dataspace.reaper"]["consumers"] >= 1
    assert queues["dataspace.reaper"]["active_consumer"]["consumer_tag"]
    assert status["next_reap"] is None  # the test pool arms no schedule
    assert status["vhost"] == vhost_of(amqp_url)
    assert status["amqp"] == {"url": amqp_url.replace(":guest@", ":***@"), "connected": True,
                              "problem": None}  # fmt: skip

    code, out, _ = _run(capsys, "status", "--url", amqp_url)
    assert code == 5
    for name in ("dataspace.requests", "dataspace.dead", "dataspace.reaper.schedule"):
        assert name in out
    assert "active reaper consumer:" in out and "next scheduled reap: none pending" in out
    assert f"dead letters: {status['dead_letters']}" in out
    assert out.rstrip().endswith("healthy, with 1 warning(s)")

    assert _remove_dead_letters(amqp_url, {message_id}) == {message_id}
    assert _dead_entries(capsys, amqp_url, message_id, timeout=0) == []


def test_the_next_scheduled_reap_is_peeked_and_left_pending(capsys, amqp_url, worker_pool):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_purge("dataspace.reaper.schedule")
    body = orjson.dumps({"v": 1, "op": "reap", "args": {"days": 30}})
    channel.basic_publish(
        "",
        "dataspace.reaper.schedule",
        body,
        pika.BasicProperties(
            expiration="3600000", headers={"x-dataspace-next-reap-at": "2099-01-01T00:00:00Z"}
        ),
    )
    try:
        code, out, err = _run(capsys, "status", "--json", "--url", amqp_url)
        assert code == 0, err
        pending = orjson.loads(out)["next_reap"]
        assert pending["next_reap_at"] == "2099-01-01T00:00:00Z" and pending["days"] == 30
        code, out, _ = _run(capsys, "status", "--url", amqp_url)
        assert "next scheduled reap: 2099-01-01T00:00:00Z (in " in out
        assert "older than 30 days" in out
        ok = channel.queue_declare("dataspace.reaper.schedule", passive=True)
        assert ok.method.message_count == 1  # still pending after both peeks
    finally:
        channel.queue_purge("dataspace.reaper.schedule")
        connection.close()


def _write_request(op: str, tm: int, gen: int, key: str, value: dict) -> bytes:
    args = {
        "taskmanager_id": tm,
        "generation_id": gen,
        "key": key,
        "value": encode_value(value),
        "header": {
            "create_time": 1,
            "expiration_time": 2**31,
            "scheduled_create_time": 1,
            "creator": "ops-cli-test",
            "schema_id": None,
        },
        "metadata": {"state": "NEW", "generation_time": 1, "missed_update_count": 0},
    }
    return encode_request(OPERATIONS[op], args)


def test_dead_replay_sends_a_fixed_request_again(
    capsys, amqp_url, source, pg_dsn, own_dead_letters
):
    import psycopg2

    tm = source.store_taskmanager(f"ops-cli-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:32])
    message_id = f"ops-cli-update-{uuid.uuid4().hex}"
    own_dead_letters.add(message_id)
    # A valid update of a product that does not exist, with no reply_to to be told:
    # the worker dead-letters it.
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        "dataspace",
        "data.update",
        _write_request("update", tm, 1, "fixme", {"fixed": True}),
        pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            type="update",
            headers={"x-dataspace-protocol": 1},
        ),
        mandatory=True,
    )
    connection.close()
    (entry,) = _dead_entries(capsys, amqp_url, message_id)
    assert entry["code"] == "not_found" and entry["operation"] == "update"

    # The cause fixed: the product now exists. Replay only ours (the shared vhost may
    # hold other tests' dead letters).
    source.insert(tm, 1, "fixme", encode_value({"fixed": False}), *_header_metadata(tm))
    code, out, err = _run(
        capsys, "dead", "replay", "--yes", "--limit", "5000", "--message-id", message_id,
        "--url", amqp_url,
    )  # fmt: skip
    assert code == 0, err
    assert "replayed 1, skipped " in out

    deadline = time.monotonic() + 15
    while True:
        code, out, err = _run(capsys, "get", str(tm), "1", "fixme", "--url", amqp_url)
        assert code == 0, err
        if orjson.loads(out) == {"fixed": True} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert orjson.loads(out) == {"fixed": True}
    assert _dead_entries(capsys, amqp_url, message_id, timeout=0) == []
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:  # applied under its own id
        cur.execute("SELECT operation FROM dataspace_request WHERE message_id = %s", (message_id,))
        assert cur.fetchone() == ("update",)
    conn.close()

    # Nothing left to replay with that id: a no-op.
    code, out, _ = _run(
        capsys, "dead", "replay", "-y", "--message-id", message_id, "--url", amqp_url
    )
    assert code == 0 and "replayed 0, skipped" in out


def _header_metadata(tm: int):
    from dataspace_client.datablock import Header, Metadata

    return Header(tm), Metadata(tm, generation_id=1)


def test_put_and_get_round_trip(capsys, amqp_url, source):
    tm = source.store_taskmanager(f"ops-cli-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:32])
    value = {"cpus": 4, "name": "node-1", "tags": ["a", "b"], "ratio": 0.5, "none": None}
    code, out, err = _run(
        capsys, "put", str(tm), "1", "resources", orjson.dumps(value).decode(), "--url", amqp_url
    )
    assert code == 0, err
    assert out.startswith("inserted product 'resources'")
    code, out, _ = _run(capsys, "get", str(tm), "1", "resources", "--url", amqp_url)
    assert code == 0 and orjson.loads(out) == value
    header = source.get_header(tm, 1, "resources")
    assert header[7] == "dataspace-cli"
    assert source.get_metadata(tm, 1, "resources")[4] == "NEW"

    code, out, _ = _run(capsys, "put", str(tm), "1", "resources", '{"cpus": 8}', "--url", amqp_url)
    assert code == 0 and out.startswith("updated product 'resources'")
    code, out, _ = _run(capsys, "get", str(tm), "1", "resources", "--url", amqp_url)
    assert orjson.loads(out) == {"cpus": 8}

    # not found: exit 4
    code, out, err = _run(capsys, "get", str(tm), "1", "no-such-key", "--url", amqp_url)
    assert code == 4 and out == "" and "not found" in err and "no-such-key" in err
    code, _, err = _run(capsys, "put", str(2**40), "1", "k", '{"a": 1}', "--url", amqp_url)
    assert code == 4 and "not found" in err
    # bad VALUE: usage, exit 2, nothing sent
    code, _, err = _run(capsys, "put", str(tm), "1", "k", "[1, 2]", "--url", amqp_url)
    assert code == 2 and "must be a JSON object" in err
    code, _, err = _run(capsys, "put", str(tm), "1", "k", "{oops", "--url", amqp_url)
    assert code == 2 and "not JSON" in err


def test_get_prints_raw_and_pickled_values_carefully(capsys, amqp_url, source):
    tm = source.store_taskmanager(f"ops-cli-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:32])
    source.insert(tm, 1, "raw", b"\x00\x01not a datablock", *_header_metadata(tm))
    source.insert(tm, 1, "pickled", encode_value([1, (2, 3)]), *_header_metadata(tm))
    source.insert(tm, 1, "literal", encode_value({"t": (1, 2), 3: b"x"}), *_header_metadata(tm))
    code, out, err = _run(capsys, "get", str(tm), "1", "raw", "--url", amqp_url)
    assert code == 0 and out.strip() == repr(b"\x00\x01not a datablock")
    assert "not in DataBlock format" in err
    code, out, _ = _run(capsys, "get", str(tm), "1", "raw", "--hex", "--url", amqp_url)
    assert out.strip() == b"\x00\x01not a datablock".hex()
    code, out, err = _run(capsys, "get", str(tm), "1", "pickled", "--url", amqp_url)
    assert code == 1 and out == "" and "--allow-pickle" in err
    code, out, _ = _run(capsys, "get", str(tm), "1", "pickled", "--allow-pickle", "--url", amqp_url)
    assert code == 0 and out.strip() == "[1, (2, 3)]"
    code, out, _ = _run(capsys, "get", str(tm), "1", "literal", "--url", amqp_url)
    assert code == 0 and out.strip() == "{'t': (1, 2), 3: b'x'}"


def test_exit_codes_of_the_console_script(amqp_url, source):
    script = Path(sys.executable).with_name("dataspace")
    assert script.exists(), f"console script missing: {script} (pip install -e .)"
    tm = source.store_taskmanager(f"ops-cli-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:32])
    port = free_port()

    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *argv], capture_output=True, text=True, timeout=60, check=False, env=env
        )

    done = run("put", str(tm), "1", "k", '{"a": 1}', "--url", amqp_url)
    assert done.returncode == 0, done.stderr
    done = run("get", str(tm), "1", "k", "--url", amqp_url)
    assert done.returncode == 0 and orjson.loads(done.stdout) == {"a": 1}
    assert run("get", str(tm), "1", "missing", "--url", amqp_url).returncode == 4
    done = run("--url", amqp_url, "status", "--management-url", f"http://127.0.0.1:{port}/")
    assert done.returncode == 3 and UNREACHABLE.format(port=port) in done.stderr
    assert run("get", "not-a-number", "1", "k").returncode == 2
    assert run("reap", "--now", "--days", "1", "--url", amqp_url).returncode == 2
    done = run("status", "--url", amqp_url)
    # 5: healthy, with dead letters other tests of this run left in the shared vhost
    assert done.returncode in (0, 5), done.stdout + done.stderr
    # a vhost the broker does not have: configuration
    assert run("status", "--url", amqp_url + "-no-such-vhost").returncode == 2


def test_dead_replay_skips_a_dead_letter_whose_body_was_cut(capsys, amqp_url, own_dead_letters):
    """A dead letter keeps at most dead_letter_body bytes of its request: replaying
    the cut copy would only be refused again, so it stays, with a line saying why."""
    message_id = f"ops-cli-cut-{uuid.uuid4().hex}"
    own_dead_letters.add(message_id)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        "dataspace.dead",
        "data.insert",
        b"\x00dsf1 cut short",
        pika.BasicProperties(
            message_id=message_id,
            headers={
                "x-original-routing-key": "data.insert",
                "x-dataspace-error-code": "bad_request",
                "x-dataspace-body-size": 104857600,
                "x-dataspace-body-sha256": "0" * 64,
            },
        ),
        mandatory=True,
    )
    connection.close()
    code, out, err = _run(
        capsys, "dead", "replay", "--yes", "--limit", "5000", "--message-id", message_id,
        "--url", amqp_url,
    )  # fmt: skip
    assert code == 0, err
    assert "replayed 0, skipped " in out
    assert "its body was cut to 15 of 104857600 bytes" in err
    assert len(_dead_entries(capsys, amqp_url, message_id)) == 1  # still there


# -- small things an operator meets first (issue 13) ----------------------------------------
def test_version_flags():
    bin_dir = os.path.dirname(sys.executable)
    for command, name in (("dataspace", "dataspace"), ("dataspace-worker", "dataspace-worker")):
        done = subprocess.run(
            [os.path.join(bin_dir, command), "--version"], capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stdout.strip() == f"{name} 0.1.0", done


@pytest.mark.parametrize("url", ["http://guest:secret@127.0.0.1:15672/", "127.0.0.1:5672"])
def test_a_url_that_is_not_amqp_is_refused_naming_the_scheme(capsys, url):
    code, _out, err = _run(capsys, "status", "--url", url)
    assert code == 2
    assert "amqp://" in err and "secret" not in err and err.count("\n") == 1


def test_output_piped_into_a_reader_that_stops_is_no_traceback(amqp_url, worker_pool):
    """``dataspace status | head -1``: the reader goes before the command has written
    everything; that is not an error to report."""
    script = os.path.join(os.path.dirname(sys.executable), "dataspace")
    done = subprocess.run(
        f"{script} status --url '{amqp_url}' | head -c 0",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
