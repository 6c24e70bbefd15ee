"""The generated broker accounts, enforced by the broker itself (issue 12).

The accounts ``python -m dataspace_worker.definitions --accounts`` makes are
imported into a scratch vhost of the local broker (scratch user names, removed
afterwards), the topology is declared there as guest, and then every operation's
routing key is published by every account with raw pika (publisher confirms on,
``mandatory`` off) with no worker running: what is refused is refused by the
broker (the channel closed with 403 ``ACCESS_REFUSED`` on the publish), what is
allowed is confirmed by it.  Also: only the worker account publishes through the
default exchange; clients publish to no other exchange and may not declare,
purge, get or consume; the ops account may look at and purge dead letters but
publish nothing, and is not an administrator; per-user connection and channel
limits hold; ``dataspace.dead`` is bounded by its policy.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import pika
import pytest
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker, ConnectionClosedByBroker

from dataspace_core.protocol import OPERATIONS
from dataspace_worker import definitions as defs
from dataspace_worker.topology import declare_blocking, topology
from tests.support.broker_admin import DEFINITIONS_FILE, MANAGEMENT_URL, Management, retarget
from tests.support.urls import user_url

# The design (issue 12), written out here rather than taken from the generator:
# the test checks the generator against it.
READS = {
    "get_taskmanager",
    "get_taskmanagers",
    "get_last_generation_id",
    "get_dataproduct",
    "get_dataproducts",
    "get_datablock",
    "get_header",
    "get_metadata",
    "get_schema",
}
WRITES = {
    "store_taskmanager",
    "insert",
    "update",
    "duplicate_datablock",
    "mark_expired",
    "mark_demented",
}
DELETES = {"delete_data_older_than", "delete", "create_tables"}
REAP = "admin.reap"
ROLES = ("reader", "writer", "maintainer", "worker", "ops")
CLIENTS = ("reader", "writer", "maintainer")


def allowed_keys(role: str) -> set[str]:
    ops = {
        "reader": READS,
        "writer": READS | WRITES,
        "maintainer": READS | DELETES,
        "worker": READS | WRITES | DELETES,
        "ops": set(),
    }[role]
    keys = {f"{prefix}.{op}" for prefix in ("data", "lane") for op in ops}
    # a batch of fire-and-forget requests is allowed as its operation is
    keys |= {f"batch.{op}" for op in ops if OPERATIONS[op].fire_and_forget}
    if role in ("maintainer", "worker"):
        keys.add(REAP)
    return keys


ALL_KEYS = sorted(allowed_keys("worker"))
#: the reader's limits in this test (small, so that the N+1th is cheap to reach)
READER_LIMITS = (3, 4)


def test_every_operation_is_classified():
    """A new operation must be given to some account (or this fails): the routing
    keys of the protocol's operations are exactly the ones the matrix tries."""
    data_ops = {name for name in OPERATIONS if name != "reap"}
    assert data_ops == READS | WRITES | DELETES
    assert OPERATIONS["reap"].routing_key == REAP
    assert set(defs.READ_OPS) == READS and set(defs.WRITE_OPS) == WRITES
    assert set(defs.DELETE_OPS) == DELETES


def test_generated_accounts_document(capsys):
    environ = {defs.ACCOUNT[r].password_env: secrets.token_hex(8) for r in ROLES}
    assert defs.main(["--accounts", "--vhost", "v", "--limit-commands"], environ) == 0
    doc = json.loads(capsys.readouterr().out)
    users = {u["name"]: u for u in doc["users"]}
    assert set(users) == {
        "dataspace",
        "dataspace-client",
        "dataspace-reader",
        "dataspace-maintainer",
        "dataspace-ops",
    }
    assert users["dataspace-ops"]["tags"] == "management,policymaker"
    assert all(u["tags"] == "" for n, u in users.items() if n != "dataspace-ops")
    assert "limits" not in users["dataspace"]  # the service is not limited
    for name in ("dataspace-client", "dataspace-reader", "dataspace-maintainer", "dataspace-ops"):
        assert set(users[name]["limits"]) == {"max-connections", "max-channels"}
    perms = {p["user"]: p for p in doc["permissions"]}
    for name in ("dataspace-client", "dataspace-reader", "dataspace-maintainer"):
        assert (perms[name]["configure"], perms[name]["write"], perms[name]["read"]) == (
            "^$",
            "^dataspace$",
            "^$",
        )
    assert perms["dataspace-ops"]["write"] == perms["dataspace-ops"]["configure"] == "^$"
    topics = {t["user"]: t for t in doc["topic_permissions"]}
    assert "dataspace" not in topics  # the worker: any routing key
    assert {t["exchange"] for t in topics.values()} == {"dataspace"}
    assert {t["read"] for t in topics.values()} == {"^$"}
    assert {p["vhost"] for p in doc["permissions"] + doc["topic_permissions"]} == {"v"}


def test_unset_password_leaves_the_account_out(capsys):
    environ = {defs.CLIENT_PASSWORD_ENV: "c", defs.ADMIN_PASSWORD_ENV: "legacy"}
    assert defs.main(["--accounts", "--ops-user", "admin"], environ) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [u["name"] for u in doc["users"]] == ["dataspace-client", "admin"]
    assert [u["tags"] for u in doc["users"]] == ["", "management,policymaker"]
    for env in (defs.WORKER_PASSWORD_ENV, defs.READER_PASSWORD_ENV):
        assert env in captured.err
    assert defs.main(["--accounts"], environ={}) == 2
    assert "at least one password" in capsys.readouterr().err


def test_limit_commands_and_overrides(capsys):
    environ = {defs.READER_PASSWORD_ENV: "r", defs.CLIENT_PASSWORD_ENV: "c"}
    args = ["--accounts", "--limit", "reader=5,9", "--limit", "writer=none", "--limit-commands"]
    assert defs.main(args, environ) == 0
    captured = capsys.readouterr()
    users = {u["name"]: u for u in json.loads(captured.out)["users"]}
    assert users["dataspace-reader"]["limits"] == {"max-connections": 5, "max-channels": 9}
    assert "limits" not in users["dataspace-client"]
    assert (
        'rabbitmqctl set_user_limits dataspace-reader \'{"max-connections":5,"max-channels":9}\''
        in captured.err
    )
    with pytest.raises(SystemExit):
        defs.main(["--accounts", "--limit", "nobody=1,1"], environ)


def test_dead_letter_policy_in_the_topology():
    (policy,) = defs.definitions()["policies"]
    assert policy["pattern"] == "^dataspace\\.dead$" and policy["apply-to"] == "queues"
    assert policy["definition"] == {"max-length-bytes": 1024**3, "overflow": "drop-head"}
    assert json.loads(DEFINITIONS_FILE.read_text())["policies"] == [policy]


# -- on the broker ---------------------------------------------------------------------
@dataclass
class Scratch:
    api: Management
    vhost: str
    users: dict[str, str]  # role -> user name
    urls: dict[str, str]  # role -> AMQP URL
    passwords: dict[str, str]

    @property
    def path(self) -> str:
        return quote(self.vhost, safe="")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    api = Management(MANAGEMENT_URL)
    if not api.reachable():
        pytest.skip(f"the RabbitMQ management API is not reachable at {api.base}")
    suffix = uuid.uuid4().hex[:10]
    vhost = f"dataspace-accounts-{suffix}"
    prefix = f"dsacct-{suffix}-"
    path = quote(vhost, safe="")
    passwords = {role: secrets.token_hex(12) for role in ROLES}
    environ = {defs.ACCOUNT[role].password_env: passwords[role] for role in ROLES}
    out = tmp_path_factory.mktemp("accounts") / "accounts.json"
    args = ["--accounts", "--vhost", vhost, "--prefix", prefix, "--output", str(out)]
    args += ["--limit", f"reader={READER_LIMITS[0]},{READER_LIMITS[1]}"]
    assert defs.main(args, environ) == 0
    accounts = json.loads(out.read_text())
    users = {role: prefix + defs.ACCOUNT[role].user for role in ROLES}
    try:
        api.call("PUT", f"/vhosts/{path}")
        api.call(
            "PUT", f"/permissions/{path}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        committed = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
        api.call("POST", f"/definitions/{path}", retarget(committed, vhost))
        api.call("POST", "/definitions", accounts)
        guest = pika.BlockingConnection(pika.URLParameters(user_url("guest", "guest", vhost)))
        try:
            declare_blocking(guest.channel(), topology(lanes=2))
        finally:
            guest.close()
        urls = {role: user_url(users[role], passwords[role], vhost) for role in ROLES}
        yield Scratch(api, vhost, users, urls, passwords)
    finally:
        api.call("DELETE", f"/vhosts/{path}", ok=(204, 404))
        for user in users.values():
            api.call("DELETE", f"/users/{quote(user, safe='')}", ok=(204, 404))


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 10
    return pika.BlockingConnection(params)


def _publish(connection, exchange: str, key: str) -> int:
    """200 when the broker confirmed the publish, else the code it closed the channel
    with (403 ACCESS_REFUSED: checked here)."""
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        channel.basic_publish(exchange, key, b"account matrix probe", mandatory=False)
    except ChannelClosedByBroker as exc:
        assert exc.reply_code != 403 or exc.reply_text.startswith("ACCESS_REFUSED"), exc
        return exc.reply_code
    channel.close()
    return 200


def _refusal(connection, attempt: Callable) -> int | None:
    channel = connection.channel()
    try:
        attempt(channel)
    except ChannelClosedByBroker as exc:
        return exc.reply_code
    channel.close()
    return None


@pytest.mark.parametrize("role", ROLES)
def test_operation_matrix(scratch, role):
    """Every operation's routing key, by this account: refused by the broker (403 on
    the publish) unless the account's role allows it, confirmed when it does."""
    connection = _connect(scratch.urls[role])
    try:
        outcome = {key: _publish(connection, "dataspace", key) for key in ALL_KEYS}
        # keys no operation has: nobody but the worker gets them past the broker
        for key in ("data.get_schema.x", "data.", "admin.reapx", "lane.x", "other"):
            outcome[key] = _publish(connection, "dataspace", key)
    finally:
        connection.close()
    expected = {key: 200 if key in allowed_keys(role) else 403 for key in ALL_KEYS}
    for key in ("data.get_schema.x", "data.", "admin.reapx", "lane.x", "other"):
        expected[key] = 200 if role == "worker" else 403
    assert outcome == expected
    refused = sum(code == 403 for code in outcome.values())
    print(
        f"\n{role}: {len(outcome) - refused} confirmed, {refused} refused (403) of {len(outcome)}"
    )


@pytest.mark.parametrize("role", (*CLIENTS, "ops"))
def test_only_the_worker_publishes_elsewhere(scratch, role):
    """The default exchange (a queue by name: dataspace.dead, the schedule, the request
    queue), the dead-letter exchange and the lanes' hash exchange: 403 for every account
    but the worker's."""
    targets = [
        ("", "dataspace.dead"),
        ("", "dataspace.reaper.schedule"),
        ("", "dataspace.requests"),
        ("amq.default", "dataspace.dead"),
        ("dataspace.dead", "data.insert"),
        ("dataspace.lanes.hash", "lane.insert"),
        ("dataspace.lanes", "lane.insert"),
        ("amq.topic", "data.insert"),
    ]
    connection = _connect(scratch.urls[role])
    try:
        assert {t: _publish(connection, *t) for t in targets} == {t: 403 for t in targets}
    finally:
        connection.close()


def test_the_worker_publishes_through_the_default_exchange(scratch):
    """What the clients may not do, the worker account does: replies and the schedule
    through the default exchange, dead letters to dataspace.dead."""
    worker = _connect(scratch.urls["worker"])
    try:
        for exchange, key in [
            ("", "dataspace.dead"),
            ("", "dataspace.requests"),
            ("dataspace.dead", "data.insert"),
        ]:
            assert _publish(worker, exchange, key) == 200, (exchange, key)
    finally:
        worker.close()


@pytest.mark.parametrize("role", CLIENTS)
def test_clients_declare_purge_get_consume_nothing(scratch, role):
    attempts = {
        "declare": lambda ch: ch.queue_declare("dataspace.mine"),
        "declare server-named": lambda ch: ch.queue_declare("", exclusive=True),
        "declare exchange": lambda ch: ch.exchange_declare("dataspace.mine", "topic"),
        "purge": lambda ch: ch.queue_purge("dataspace.requests"),
        "purge dead": lambda ch: ch.queue_purge("dataspace.dead"),
        "get": lambda ch: ch.basic_get("dataspace.requests"),
        "get dead": lambda ch: ch.basic_get("dataspace.dead"),
        "consume": lambda ch: ch.basic_consume("dataspace.requests", lambda *a: None),
        "consume schedule": lambda ch: ch.basic_consume(
            "dataspace.reaper.schedule", lambda *a: None
        ),
        "delete": lambda ch: ch.queue_delete("dataspace.requests"),
        "bind": lambda ch: ch.queue_bind("dataspace.dead", "dataspace", "data.#"),
    }
    connection = _connect(scratch.urls[role])
    try:
        refused = {name: _refusal(connection, attempt) for name, attempt in attempts.items()}
        # what a client does need: direct reply-to, no permission
        channel = connection.channel()
        channel.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
        channel.close()
    finally:
        connection.close()
    assert refused == {name: 403 for name in attempts}


def test_ops_account(scratch):
    """Tags exactly management and policymaker; sees and purges dead letters (and peeks
    at the schedule) on its vhost, reads no request queue, administers nothing."""
    api = scratch.api
    user = api.call("GET", f"/users/{quote(scratch.users['ops'], safe='')}")
    assert sorted(user["tags"]) == ["management", "policymaker"]
    parts = urlsplit(MANAGEMENT_URL)
    ops = Management(
        f"{parts.scheme}://{quote(scratch.users['ops'], safe='')}:{scratch.passwords['ops']}"
        f"@{parts.hostname}:{parts.port or 15672}"
    )
    worker = _connect(scratch.urls["worker"])
    try:
        assert _publish(worker, "", "dataspace.dead") == 200
    finally:
        worker.close()
    peek = {"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"}
    queues = {q["name"] for q in ops.call("GET", f"/queues/{scratch.path}")}
    assert {"dataspace.dead", "dataspace.requests"} <= queues  # dataspace status
    got = ops.call("POST", f"/queues/{scratch.path}/dataspace.dead/get", peek)
    assert got and got[0]["payload"] == "account matrix probe"
    ops.call("POST", f"/queues/{scratch.path}/dataspace.reaper.schedule/get", peek)
    ops.call("POST", f"/queues/{scratch.path}/dataspace.requests/get", peek, ok=(401, 403))
    ops.call("DELETE", f"/queues/{scratch.path}/dataspace.dead/contents", ok=(204,))
    ops.call("DELETE", f"/queues/{scratch.path}/dataspace.requests/contents", ok=(401, 403))
    ops.call("DELETE", f"/queues/{scratch.path}/dataspace.requests", ok=(401, 403))
    ops.call("GET", "/users", ok=(401, 403))  # not an administrator
    assert {v["name"] for v in ops.call("GET", "/vhosts")} == {scratch.vhost}
    ops.call(
        "PUT", "/policies/%2F/dsacct-probe", {"pattern": "^x$", "definition": {}}, ok=(401, 403)
    )
    # and over AMQP: nothing to publish, no queue to declare
    connection = _connect(scratch.urls["ops"])
    try:
        assert _publish(connection, "dataspace", "data.get_schema") == 403
        assert _refusal(connection, lambda ch: ch.queue_declare("dataspace.mine")) == 403
        assert _refusal(connection, lambda ch: ch.basic_get("dataspace.requests")) == 403
    finally:
        connection.close()


def test_connection_and_channel_limits(scratch):
    """The reader, limited to N connections and M channels here: the N+1th connection
    and the M+1th channel are refused by the broker."""
    connections, channels = READER_LIMITS
    held = []
    try:
        for _ in range(connections):
            held.append(_connect(scratch.urls["reader"]))
        started = time.monotonic()
        with pytest.raises(AMQPConnectionError) as refused:
            held.append(_connect(scratch.urls["reader"]))
        print(
            f"\nconnection {connections + 1} refused in {time.monotonic() - started:.3f} s: "
            f"{refused.value!r}"
        )
        assert "user connection limit (3) is reached" in repr(refused.value)
        # another account is not affected by the reader's limit
        held.append(_connect(scratch.urls["writer"]))
        for connection in held:
            connection.close()
        held = [_connect(scratch.urls["reader"])]
        opened = [held[0].channel() for _ in range(channels)]
        with pytest.raises(
            (ConnectionClosedByBroker, ChannelClosedByBroker, AMQPConnectionError)
        ) as closed:
            opened.append(held[0].channel())
        print(f"channel {channels + 1} refused: {closed.value!r}")
        # the broker closes the whole connection (530), not only the channel
        assert isinstance(closed.value, ConnectionClosedByBroker)
        assert closed.value.reply_code == 530 and "user limit of (4)" in closed.value.reply_text
    finally:
        for connection in held:
            if connection.is_open:
                connection.close()


def test_dead_letter_queue_is_bounded_by_its_policy(scratch):
    """The policy of the definitions applies to dataspace.dead; with a small bound (here
    1,000 bytes) a new dead letter is confirmed and the oldest ones make room."""
    api = scratch.api
    vhost = scratch.vhost + "-bound"
    path = quote(vhost, safe="")
    try:
        api.call("PUT", f"/vhosts/{path}")
        api.call(
            "PUT", f"/permissions/{path}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        api.call(
            "POST",
            f"/definitions/{path}",
            defs.definitions(vhost=vhost, dead_letter_max_bytes=1000),
        )
        connection = _connect(user_url("guest", "guest", vhost))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for i in range(5):  # each confirmed: drop-head never refuses the worker
                channel.basic_publish("dataspace.dead", "data.insert", bytes([48 + i]) * 400)
            deadline = time.monotonic() + 10
            while True:
                count = channel.queue_declare("dataspace.dead", passive=True).method.message_count
                if count <= 2 or time.monotonic() > deadline:
                    break
                connection.sleep(0.1)
            assert count == 2
            _method, _props, body = channel.basic_get("dataspace.dead", auto_ack=True)
            assert body == b"3" * 400  # the three oldest went
        finally:
            connection.close()
        deadline = time.monotonic() + 15  # the API's figures lag (statistics interval)
        while True:
            effective = api.call("GET", f"/queues/{path}/dataspace.dead")
            if "policy" in effective or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert effective["policy"] == defs.DEAD_LETTER_POLICY
        assert effective["effective_policy_definition"] == {
            "max-length-bytes": 1000,
            "overflow": "drop-head",
        }
    finally:
        api.call("DELETE", f"/vhosts/{path}", ok=(204, 404))


def test_ops_runs_the_operator_commands_but_cannot_replay(scratch, capsys):
    """`dataspace status` and `dataspace dead list` work as ops; `dataspace dead replay`
    (which republishes requests) is refused by the broker, and the dead letter stays."""
    from dataspace_client import cli

    worker = _connect(scratch.urls["worker"])
    try:
        channel = worker.channel()
        channel.confirm_delivery()
        channel.queue_purge("dataspace.dead")
        props = pika.BasicProperties(
            message_id="ops-probe", headers={"x-original-routing-key": "data.get_schema"}
        )
        channel.basic_publish("", "dataspace.dead", b'{"v": 1}', props)
    finally:
        worker.close()
    url = scratch.urls["ops"]
    assert cli.main(["--url", url, "status"]) in (0, 1)  # 1: no worker consumes here
    assert cli.main(["--url", url, "dead", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["message_id"] for m in listed["messages"]] == ["ops-probe"]
    assert cli.main(["--url", url, "dead", "replay", "--yes"]) == 1
    assert "ACCESS_REFUSED" in capsys.readouterr().err
    worker = _connect(scratch.urls["worker"])
    try:
        count = worker.channel().queue_declare("dataspace.dead", passive=True).method.message_count
    finally:
        worker.close()
    assert count == 1
