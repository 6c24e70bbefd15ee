"""Poison messages, long requests, delivery limits and hostile input (issue 3).

Process-killing fault tests live in tests/faults/.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import orjson
import pika
import psycopg2
import pytest

from dataspace_client import DataSpace, DataSpaceExistsError
from dataspace_core import validate
from dataspace_core.protocol import OPERATIONS, decode_request
from dataspace_worker import metrics
from dataspace_worker.topology import declare_blocking, topology
from dataspace_worker.worker_pool import WorkerPool
from tests import services
from tests.support.configs import remote_config

FUZZ_MAX_BODY = 64 * 1024


@pytest.fixture
def pool_factory(pool_factory):
    """conftest's pools, with a small ``max_body`` unless told otherwise."""

    def start(url: str, max_body: int = FUZZ_MAX_BODY, **kwargs) -> WorkerPool:
        return pool_factory(url, max_body=max_body, **kwargs)

    yield start


# -- the fuzz run ------------------------------------------------------------------
JUNK_VALUES = [
    None,
    True,
    0,
    -1,
    1.5,
    "",
    "x",
    "'; DROP TABLE taskmanager; --",
    [],
    [1, "a"],
    {},
    {"a": {"b": []}},
    "\u0000nul",
    "9" * 40,
    "2021-13-45",
    "%(key)s",
]


def _fuzz_bodies(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """(category, body) pairs: malformed, truncated, oversized, type-confused."""
    ops = list(OPERATIONS)
    out = []
    for i in range(count):
        kind = i % 8
        op = rng.choice(ops)
        params = list(validate.SIGNATURES[op])
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 300))
            out.append(("random bytes", body))
        elif kind == 1:
            args = {p: rng.choice(JUNK_VALUES) for p in params}
            full = orjson.dumps({"v": 1, "op": op, "args": args})
            out.append(("truncated", full[: rng.randint(0, max(0, len(full) - 1))]))
        elif kind == 2 and i % 40 == 2:
            args = {"table": "x" * (FUZZ_MAX_BODY + rng.randint(1, 5000))}
            out.append(("oversized", orjson.dumps({"v": 1, "op": "get_schema", "args": args})))
        elif kind in (2, 3, 4):
            args = {p: rng.choice(JUNK_VALUES) for p in params if rng.random() < 0.8}
            out.append(("type-confused", orjson.dumps({"v": 1, "op": op, "args": args})))
        elif kind == 5:
            envelope = rng.choice(
                [
                    {"v": rng.choice([0, 2, "1", None]), "op": op, "args": {}},
                    {"v": 1, "op": rng.choice(["", "DROP", "__init__", "_run", None, 3])},
                    {"v": 1, "op": op, "args": rng.choice([[], "x", 5, None])},
                    {"v": 1, "op": op, "args": {"no_such_param": 1}},
                    [op],
                    "just a string",
                ]
            )
            out.append(("bad envelope", orjson.dumps(envelope)))
        elif kind == 6:
            depth = rng.randint(200, 3000)
            out.append(("deep nesting", b"[" * depth + b"]" * depth))
        else:
            text = b'{"v": 1, "op": "get_dataproduct", "args": {"taskmanager_id": 1' + b"0" * 30
            out.append(("huge number", text + b', "generation_id": 1, "key": "k"}}'))
    return out


def test_fuzz_pool_survives_answers_or_dead_letters_everything(own_vhost, pool_factory, pg_dsn):
    pool = pool_factory(own_vhost, consumers=2)
    rng = random.Random(20261128)
    bodies = _fuzz_bodies(rng, 1200)
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    replies: dict[str, bytes] = {}
    channel.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda _c, _m, props, body: replies.__setitem__(props.correlation_id, body),
        auto_ack=True,
    )
    sent = {}
    for n, (category, body) in enumerate(bodies):
        message_id = f"fuzz-{n}"
        with_reply = n % 2 == 0
        props = pika.BasicProperties(
            message_id=message_id,
            correlation_id=message_id,
            reply_to="amq.rabbitmq.reply-to" if with_reply else None,
            content_type=rng.choice(["application/json", None, "application/json"]),
        )
        if n % 3 == 0:  # straight into the queue, past the exchange
            channel.basic_publish("", "dataspace.requests", body, props)
        else:
            channel.basic_publish("dataspace", f"data.{rng.choice(list(OPERATIONS))}", body, props)
        sent[message_id] = (category, body, with_reply)
    deadline = time.monotonic() + 120
    expected = {m for m, (_, _, r) in sent.items() if r}
    while not expected <= set(replies) and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    connection.close()

    missing = expected - set(replies)
    assert not missing, f"{len(missing)} requests with reply_to never answered"
    for message_id in expected:
        reply = orjson.loads(replies[message_id])
        assert reply["v"] == 1 and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] and reply["error"]["message"]

    dead = services.drain_queue(own_vhost, "dataspace.dead")
    dead_ids = {p.message_id for p, _ in dead}
    for props, _ in dead:
        assert props.headers["x-dataspace-reason"]
        assert props.headers["x-dataspace-error-code"]
    answered_bad = {
        m
        for m in expected
        if orjson.loads(replies[m]).get("error", {}).get("code") == "bad_request"
    }
    assert answered_bad <= dead_ids, "malformed requests must be dead-lettered too"
    categories = {c for c, _, _ in sent.values()}
    assert {"random bytes", "truncated", "oversized", "type-confused", "deep nesting"} <= categories

    # A no-reply request that is not in the dead letters must have been valid and applied:
    # replaying it with a reply_to (and a fresh id) must succeed.
    replay = DataSpace(remote_config(own_vhost))
    client = replay.datasource._client
    silent_ok = 0
    for message_id, (_, body, with_reply) in sent.items():
        if with_reply or message_id in dead_ids:
            continue
        op, _args = decode_request(body)  # valid: it was applied
        reply = orjson.loads(client.call("replay", op.routing_key, body))
        assert reply["ok"], (message_id, body[:200], reply)
        silent_ok += 1
    assert pool.consuming.is_set() and pool.connections_opened == 1
    # the pool still serves real requests, and the tables are intact
    seq = replay.store_taskmanager("after-fuzz", "AFTER")
    assert replay.get_taskmanager("after-fuzz")["sequence_id"] == seq
    replay.close()
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('taskmanager'), to_regclass('dataproduct')")
        assert None not in cur.fetchone()
    print(
        f"fuzz: {len(sent)} sent, {len(expected)} answered, {len(dead)} dead-lettered, "
        f"{silent_ok} valid without reply"
    )


# -- long requests keep their connection -------------------------------------------
def test_a_request_longer_than_heartbeats_keeps_the_connection(own_vhost, pool_factory, pg_dsn):
    """The database thread blocks 8 s (a row lock held here) with a 2 s heartbeat: the
    I/O thread keeps the connection, the request completes once, the reply arrives."""
    pool = pool_factory(own_vhost + "?heartbeat=2", consumers=1)
    space = DataSpace(remote_config(own_vhost, timeout=60))
    try:
        seq = space.store_taskmanager("long-request", "LONG")
        header = {
            "create_time": 1,
            "expiration_time": 2,
            "scheduled_create_time": 1,
            "creator": "t",
            "schema_id": None,
        }
        metadata = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}
        space.insert(seq, 1, "k", b"before", header, metadata)
        blocker = psycopg2.connect(pg_dsn)
        with blocker.cursor() as cur:
            cur.execute("SELECT 1 FROM dataproduct WHERE taskmanager_id = %s FOR UPDATE", (seq,))
        threading.Timer(8.0, blocker.commit).start()
        started = time.monotonic()
        space.update(seq, 1, "k", b"after", header, metadata)
        assert time.monotonic() - started >= 7.5
        assert space.get_dataproduct(seq, 1, "k") == b"after"
        assert pool.connections_opened == 1, "the worker's connection was lost and reopened"
        blocker.close()
    finally:
        space.close()


# -- a request whose handling keeps failing is dead-lettered, not requeued forever ----
def test_delivery_limit_dead_letters_a_request_that_keeps_failing(own_vhost):
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    declare_blocking(channel, topology(delivery_limit=3))
    channel.basic_publish(
        "dataspace",
        "data.get_schema",
        b"crashes the consumer",
        pika.BasicProperties(message_id="c"),
    )
    deliveries = 0
    for method, _props, _body in channel.consume("dataspace.requests", inactivity_timeout=1.0):
        if method is None:
            break
        deliveries += 1
        channel.basic_nack(method.delivery_tag, requeue=True)  # as a crashing consumer would
        assert deliveries < 20
    channel.cancel()
    connection.close()
    assert deliveries == 4  # the first delivery and three redeliveries
    dead = services.drain_queue(own_vhost, "dataspace.dead", idle=2)
    assert len(dead) == 1
    death = dead[0][0].headers["x-death"][0]
    assert death["reason"] == "delivery_limit" and death["queue"] == "dataspace.requests"


def test_requests_a_dead_worker_held_come_back_one_at_a_time(queues_without_worker, pool_factory):
    """A worker that died holding a window leaves its requests redelivered; the next
    takes them one at a time for a while (prefetch 1, ``Intake.saw``), so that a
    request that kills workers spends its own deliveries only: a quorum queue counts
    each return of every request in the dead worker's window."""
    url = queues_without_worker
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    body = orjson.dumps({"v": 1, "op": "get_schema", "args": {}})
    for n in range(5):
        channel.basic_publish(
            "dataspace", "data.get_schema", body, pika.BasicProperties(message_id=f"m{n}")
        )
    channel.basic_qos(prefetch_count=10)
    held = []
    for method, _props, _body in channel.consume("dataspace.requests", inactivity_timeout=5.0):
        assert method is not None, f"only {len(held)} of 5 requests delivered"
        held.append(method.delivery_tag)
        if len(held) == 5:
            break
    connection.close()  # the "crash": the five go back, marked redelivered
    redelivered = metrics.REDELIVERED._value.get()
    pool = pool_factory(url, consumers=1, prefetch=16)
    drained, _ = services.poll(lambda: metrics.REDELIVERED._value.get() >= redelivered + 5, 15)
    assert drained, "the five redelivered requests were not taken"
    (consumer,) = [c for c in pool.channels.consumers if c.queue_name == "dataspace.requests"]
    assert consumer.granted == 1 and pool.intake.careful_until > time.monotonic()


# -- hostile strings in every string argument of every operation --------------------
INJECTIONS = [
    "'; DROP TABLE taskmanager; --",
    '" OR 1=1 --',
    "%(key)s %s %%",
    "\\'; SELECT pg_sleep(10); --",
    "Robert'); DELETE FROM dataproduct;--",
    "ünïcødé ✓ 🚀 中文",
]


def _string_params(operation: str) -> list[str]:
    probes = {"taskmanager_name", "taskmanager_id", "key", "start_time", "end_time", "table"}
    return [p for p in validate.SIGNATURES[operation] if p in probes]


@pytest.mark.parametrize("injection", INJECTIONS)
def test_injection_strings_in_every_string_argument(dataspace, pg_dsn, injection):
    seq = dataspace.store_taskmanager(injection, injection[:36])
    header = {
        "create_time": 1,
        "expiration_time": 2,
        "scheduled_create_time": 1,
        "creator": injection,
        "schema_id": None,
    }
    metadata = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}
    dataspace.insert(seq, 1, injection, b"v", header, metadata)
    defaults = {
        "taskmanager_name": injection,
        "taskmanager_id": seq,
        "generation_id": 1,
        "new_generation_id": 2,
        "key": injection,
        "value": b"w",
        "header": header,
        "metadata": metadata,
        "datestamp": None,
        "start_time": None,
        "end_time": None,
        "days": 10_000,
        "all_generations": False,
        "expiry_time": 5,
        "keys": [injection],
        "table": None,
    }
    for operation in OPERATIONS:
        for param in _string_params(operation) or [None]:
            args = {p: defaults[p] for p in validate.SIGNATURES[operation]}
            if operation in ("store_taskmanager", "get_taskmanager", "get_last_generation_id"):
                args["taskmanager_id"] = injection[:36]
            if param is not None:
                args[param] = injection if param != "taskmanager_id" else args[param]
            try:
                getattr(dataspace.datasource, operation)(*args.values())
            except (KeyError, ValueError, DataSpaceExistsError):
                pass  # a time or table name that is not one, an absent or present row
    # update wrote generation 1, duplicate copied it to 2, delete removed the newest (2)
    assert dataspace.get_header(seq, 1, injection)[7] == injection
    assert dataspace.get_dataproduct(seq, 1, injection) == b"w"
    assert dataspace.get_datablock(seq, 2) == {}
    assert dataspace.get_taskmanager(injection, injection[:36])["name"] == injection
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ANY(%s)",
            (["taskmanager", "dataproduct", "header", "metadata", "dataspace_request"],),
        )
        assert cur.fetchone()[0] == 5


# -- regressions from review ------------------------------------------------------------
def test_a_call_survives_its_connection_being_closed_under_it(own_vhost, pool_factory, pg_dsn):
    """The broker closes the client's connection while a write waits for its reply:
    the client reconnects and sends it again with the same message_id; the caller gets
    one answer and the write is applied once."""
    pool_factory(own_vhost, consumers=1)
    app_id = f"dataspace-test-{uuid.uuid4().hex[:8]}"
    config = remote_config(own_vhost, timeout=30)
    config["dataspace"]["datasource"]["config"]["app_id"] = app_id
    space = DataSpace(config)
    try:
        space.store_taskmanager("conn-closed", "CLOSED")
        blocker = psycopg2.connect(pg_dsn)
        with blocker.cursor() as cur:  # the worker's insert waits behind this lock
            cur.execute("LOCK TABLE taskmanager IN SHARE ROW EXCLUSIVE MODE")
        result = {}

        def write():
            try:
                result["value"] = space.store_taskmanager("conn-closed-2", "CLOSED2")
            except Exception as exc:  # recorded for the assertion below
                result["error"] = exc

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(1.0)
        assert services.close_broker_connections(app_id) == 1
        time.sleep(1.0)
        blocker.commit()
        blocker.close()
        writer.join(30)
        assert "error" not in result, result.get("error")
        assert isinstance(result["value"], int)
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM taskmanager WHERE name = 'conn-closed-2'")
            assert cur.fetchone()[0] == 1
        # the same client object keeps working
        assert space.get_taskmanager("conn-closed-2")["sequence_id"] == result["value"]
    finally:
        space.close()


def test_an_undecodable_header_does_not_break_the_worker_connection(
    own_vhost, pool_factory, monkeypatch
):
    """A timestamp header past year 9999 used to abort pika's whole connection."""
    import struct

    import pika.data

    class FarFuture(int):
        pass

    original = pika.data.encode_value

    def encode_value(pieces, value):
        if isinstance(value, FarFuture):
            pieces.append(struct.pack(">cQ", b"T", int(value)))
            return 9
        return original(pieces, value)

    pool = pool_factory(own_vhost, consumers=1)
    client_connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = client_connection.channel()
    replies = {}
    channel.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda _c, _m, props, body: replies.__setitem__(props.correlation_id, body),
        auto_ack=True,
    )
    monkeypatch.setattr(pika.data, "encode_value", encode_value)
    body = orjson.dumps({"v": 1, "op": "get_schema", "args": {"table": "header"}})
    channel.basic_publish(
        "dataspace",
        "data.get_schema",
        body,
        pika.BasicProperties(
            reply_to="amq.rabbitmq.reply-to",
            correlation_id="far",
            headers={"when": FarFuture(2**62)},
        ),
    )
    monkeypatch.setattr(pika.data, "encode_value", original)
    deadline = time.monotonic() + 15
    while "far" not in replies and time.monotonic() < deadline:
        client_connection.process_data_events(time_limit=0.2)
    client_connection.close()
    assert orjson.loads(replies["far"])["ok"] is True
    assert pool.connections_opened == 1


def test_a_deleted_request_queue_is_declared_again_and_served(own_vhost, pool_factory):
    """RabbitMQ 3.10 sends no cancel when a quorum queue is deleted; the periodic
    topology check notices, and the pool reconnects and declares it again."""
    pool = pool_factory(own_vhost, consumers=1)
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    connection.channel().queue_delete("dataspace.requests")
    connection.close()
    assert pool.check_topology() is False
    deadline = time.monotonic() + 30
    while pool.connections_opened < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.connections_opened >= 2
    assert pool.consuming.wait(30)
    space = DataSpace(remote_config(own_vhost, timeout=20))
    try:
        seq = space.store_taskmanager("after-queue-deleted", "AQD")
        assert space.get_taskmanager("after-queue-deleted")["sequence_id"] == seq
    finally:
        space.close()
    assert pool.check_topology() is True


def test_worker_sessions_ask_for_tcp_keepalives_so_a_lost_worker_releases_its_claims(pg_dsn):
    """A worker cut off mid-transaction must not hold its idempotency claims for the
    server's default two hours: its sessions ask for TCP keepalives on both ends."""
    from dataspace_worker.postgres import PostgresDataSource

    source = PostgresDataSource({"dsn": pg_dsn, "pool_size": 1})
    try:
        conn = source._pool.acquire()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW tcp_keepalives_idle")
                idle = cur.fetchone()[0]
                cur.execute("SHOW tcp_keepalives_count")
                count = cur.fetchone()[0]
            conn.rollback()
            client_side = conn.get_dsn_parameters()
        finally:
            source._pool.release(conn)
    finally:
        source.close()
    assert idle in ("10", "10s") and count == "3"
    assert client_side.get("keepalives_idle") == "10"
