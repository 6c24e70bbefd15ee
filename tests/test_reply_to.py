"""Replies go only to direct reply-to addresses, and no address a client can write
costs the worker's consumer connection anything (issue 12, findings 4 and 5).

A worker publishes a reply to the default exchange with the request's ``reply_to``
as routing key. Before: ``reply_to='dataspace.dead'`` wrote a 60 MiB reply into
that durable queue, ``'dataspace.reaper.schedule'`` took the schedule's only slot,
and forged direct reply-to addresses (garbage, or a node that is not running) at 10
requests/s cost 106 reconnections of the worker's consumer connection in 30 s
(RabbitMQ 3.10 fails the connection that publishes to them with 541). Now a
``reply_to`` that is not a direct reply-to address is refused before the request
runs (dead-lettered as ``bad_reply_to``, never answered), and a well-formed one is
answered on the consumer's channel only when its node is known to run
(worker/dataspace_worker/reply_addresses.py, guarded_replies.py).

The integration tests import nothing of the worker's new modules, so that they run
(and fail) against the code before the change too.
"""

from __future__ import annotations

import base64
import random
import statistics
import struct
import threading
import time
import uuid

import orjson
import pika
import psycopg2
import pytest

from dataspace_client import DataSpace
from dataspace_core.protocol import (
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    OPERATIONS,
    REQUEST_QUEUE,
    SCHEDULE_QUEUE,
    encode_request,
)
from dataspace_worker.reaper import Schedule
from dataspace_worker.topology import declare_blocking, topology
from tests import services
from tests.support.configs import remote_config
from tests.support.raw_clients import ReplyClient

PREFIX = "amq.rabbitmq.reply-to."
KEY = "AAAAAAAAAAAAAAAAAAAAAA=="
HEADER = {
    "create_time": 1,
    "expiration_time": 2,
    "scheduled_create_time": 1,
    "creator": "t",
    "schema_id": None,
}
METADATA = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}
FLOOD_RATE = 10  # forged requests a second
FLOOD_SECONDS = 20.0


def pid_term(
    node: str,
    pid_id: int = 1,
    serial: int = 0,
    creation: int = 1,
    pid_tag: int = 88,
    atom_tag: int = 118,
    trailing: bytes = b"",
) -> bytes:
    """An Erlang pid in the external term format, as RabbitMQ writes into a direct
    reply-to address (default: NEW_PID_EXT with an ATOM_UTF8_EXT node)."""
    name = node.encode("utf-8" if atom_tag in (118, 119) else "latin-1")
    width = 2 if atom_tag in (100, 118) else 1
    atom = bytes([atom_tag]) + len(name).to_bytes(width, "big") + name
    tail = (
        struct.pack(">IIB", pid_id, serial, creation)
        if pid_tag == 103
        else struct.pack(">III", pid_id, serial, creation)
    )
    return bytes([131, pid_tag]) + atom + tail + trailing


def pid_address(node: str, key: str = KEY, **term) -> str:
    """A direct reply-to address of a pid on ``node`` (forged: no such channel)."""
    return f"{PREFIX}{base64.b64encode(pid_term(node, **term)).decode()}.{key}"


def decode_address(address: str) -> tuple[str, int, int, int, str]:
    """(node, id, serial, creation, key) of a NEW_PID_EXT/ATOM_UTF8_EXT address."""
    encoded, key = address[len(PREFIX) :].split(".", 1)
    raw = base64.b64decode(encoded)
    assert raw[:3] == bytes([131, 88, 118]), raw
    length = int.from_bytes(raw[3:5], "big")
    node = raw[5 : 5 + length].decode()
    pid_id, serial, creation = struct.unpack(">III", raw[5 + length :])
    return node, pid_id, serial, creation, key


def publish_request(
    channel, op_name: str, args: dict, reply_to: str | None, message_id: str | None = None
) -> bytes:
    """Publish a request as a (hostile) client would, confirmed; its body."""
    op = OPERATIONS[op_name]
    body = encode_request(op, args)
    channel.basic_publish(
        EXCHANGE,
        op.routing_key,
        body,
        pika.BasicProperties(
            message_id=message_id or uuid.uuid4().hex,
            correlation_id=uuid.uuid4().hex,
            reply_to=reply_to,
            content_type="application/json",
            delivery_mode=2,
        ),
    )
    return body


def _message_count(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def _stored(pg_dsn: str, name: str) -> int:
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM taskmanager WHERE name = %s", (name,))
        return cur.fetchone()[0]


def _header(props, name: str):
    value = (props.headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else value


# -- what is a direct reply-to address ------------------------------------------------
def test_real_addresses_of_this_broker_parse_and_rebuild(own_vhost):
    """The format, checked against the addresses this broker writes: two client
    channels, one node; the address rebuilt from its parts is the same string."""
    from dataspace_worker.reply_addresses import parse

    clients = [ReplyClient(own_vhost), ReplyClient(own_vhost)]
    try:
        addresses = [c.address() for c in clients]
    finally:
        for client in clients:
            client.close()
    parsed = [parse(a) for a in addresses]
    assert parsed[0].node_key == parsed[1].node_key
    assert parsed[0].client_channel != parsed[1].client_channel
    for address, one in zip(addresses, parsed, strict=True):
        node, pid_id, serial, creation, key = decode_address(address)
        assert (one.node, one.id, one.serial, one.creation) == (node, pid_id, serial, creation)
        rebuilt = pid_address(node, key, pid_id=pid_id, serial=serial, creation=creation)
        assert rebuilt == address
        assert len(key) == 24 and len(address) < 100


@pytest.mark.parametrize(
    "reply_to",
    [
        "dataspace.dead",
        "dataspace.reaper.schedule",
        "dataspace.requests",
        "amq.rabbitmq.reply-to",
        f"{PREFIX}AAAA.BBBB",
        f"{PREFIX}.{KEY}",
        f"{PREFIX}{base64.b64encode(b'not a term').decode()}.{KEY}",
        pid_address("rabbit@nowhere", key=""),
        pid_address("rabbit@nowhere", key="a.b"),
        pid_address("rabbit@nowhere", key="k" * 65),
        pid_address("rabbit@nowhere").replace(".AAAA", ".!AAA"),
        pid_address("rabbit@nowhere", trailing=b"\x00"),
        pid_address("rabbit@nowhere", pid_id=1 << 15),
        pid_address("rabbit@nowhere", serial=1 << 13),
        pid_address("rabbit@nowhere", pid_tag=103, creation=4),
        pid_address("no-at-sign"),
        pid_address("two@at@signs"),
        pid_address("rabbit@host\x1b[2J"),
        pid_address("rabbit@host name"),
        PREFIX + "A" * 300 + "." + KEY,
        f"{PREFIX}{base64.b64encode(pid_term('rabbit@nowhere')).decode().rstrip('=')}x.{KEY}",
        b"amq.rabbitmq.reply-to.bytes",
    ],
)
def test_what_is_not_a_direct_reply_to_address(reply_to):
    from dataspace_worker.reply_addresses import BadReplyTo, check, parse

    with pytest.raises(BadReplyTo):
        parse(reply_to)
    assert check(reply_to) is None


@pytest.mark.parametrize(
    "term",
    [
        {},
        {"pid_tag": 103, "creation": 3},
        {"atom_tag": 100},
        {"atom_tag": 115},
        {"atom_tag": 119},
        {"pid_id": (1 << 15) - 1, "serial": (1 << 13) - 1, "creation": 0xFFFFFFFF},
    ],
)
def test_what_is_a_direct_reply_to_address(term):
    from dataspace_worker.reply_addresses import parse

    address = parse(pid_address("rabbit@nowhere.example.org", **term))
    assert address.node == "rabbit@nowhere.example.org"
    assert address.node_key == (
        term.get("pid_tag", 88),
        term.get("atom_tag", 118),
        address.node,
        address.creation,
    )


def test_what_parses_with_a_live_node_does_not_fail_the_broker(own_vhost):
    """The edges of what ``parse`` accepts, with the node of a running client in the
    encoding the broker writes: published on a connection of their own, none fails
    it (just over them, ID 2^15, serial 2^13 or a trailing byte, 541 here)."""
    from dataspace_worker.reply_addresses import check

    client = ReplyClient(own_vhost)
    try:
        node, pid_id, serial, creation, key = decode_address(client.address())
        variants = [
            pid_address(node, key, pid_id=pid_id, serial=serial, creation=creation),
            pid_address(node, key, pid_id=(1 << 15) - 1, serial=(1 << 13) - 1),
            pid_address(node, key, pid_id=0, serial=0, creation=0),
            pid_address(node, key, pid_id=pid_id, serial=serial, creation=0xFFFFFFFF),
            pid_address(node, "B" * 64, pid_id=pid_id, serial=serial, creation=creation),
        ]
        assert all(check(v) for v in variants)
        publisher = pika.BlockingConnection(pika.URLParameters(own_vhost))
        try:
            channel = publisher.channel()
            for variant in variants:
                channel.basic_publish("", variant, b"reply")
            publisher.process_data_events(1.0)
            assert publisher.is_open
        finally:
            if publisher.is_open:
                publisher.close()
    finally:
        client.close()


# -- finding 4: reply_to naming a queue ----------------------------------------------------
def test_a_reply_to_naming_a_queue_gets_no_message_there(own_vhost, pool_factory, pg_dsn):
    """A read and a write whose reply_to names a queue: neither runs, nothing is
    published to that queue; each is dead-lettered as ``bad_reply_to`` (the request
    itself, 91 bytes, not the product it asked for)."""
    pool = pool_factory(own_vhost, consumers=2)
    space = DataSpace(remote_config(own_vhost))
    target = f"hostile-target-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        seq = space.store_taskmanager(f"victim-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        space.insert(seq, 1, "big", b"x" * (1024 * 1024), HEADER, METADATA)
        channel = connection.channel()
        channel.queue_declare(target, auto_delete=False)
        channel.confirm_delivery()
        name = f"never-{uuid.uuid4().hex[:8]}"
        read = {"taskmanager_id": seq, "generation_id": 1, "key": "big"}
        store = {"taskmanager_name": name, "taskmanager_id": str(uuid.uuid4())}
        sent = [
            publish_request(channel, "get_dataproduct", read, target),
            publish_request(channel, "get_dataproduct", read, DEAD_LETTER_QUEUE),
            publish_request(channel, "store_taskmanager", store, DEAD_LETTER_QUEUE),
            publish_request(channel, "store_taskmanager", store, target),
        ]
        # settled: nothing left in the request queue or in hand
        done, _ = services.poll(
            lambda: (
                _message_count(own_vhost, REQUEST_QUEUE) == 0
                and not any(c.held for c in pool.consumers)
                and pool.handled >= 2 + len(sent)
            ),
            20,
        )
        assert done
        time.sleep(1.0)  # what a worker would publish after settling, it has by now
        assert _message_count(own_vhost, target) == 0, "a reply went to the queue reply_to named"
        dead = services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=1)
        replies = [p.type for p, _ in dead if (p.type or "").endswith(".reply")]
        assert replies == [], f"replies published into {DEAD_LETTER_QUEUE}: {replies}"
        assert sorted(b for _, b in dead) == sorted(sent)
        assert {_header(p, "x-dataspace-error-code") for p, _ in dead} == {"bad_reply_to"}
        assert _stored(pg_dsn, name) == 0, "a request refused for its reply_to ran"
        # and the worker serves the next client as before, on the same connection
        assert space.get_dataproduct(seq, 1, "big") == b"x" * (1024 * 1024)
        assert pool.connections_opened == 1
    finally:
        if connection.is_open:
            connection.channel().queue_delete(target)
            connection.close()
        space.close()


def test_the_schedule_survives_hostile_reply_to(own_vhost, pool_factory):
    """While the schedule's slot is free (between a scheduled reap and the next one
    armed), requests with reply_to='dataspace.reaper.schedule' do not take it: the
    next scheduled reap is armed, and stays the only message there."""
    pool = pool_factory(own_vhost, consumers=2)
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = connection.channel()
        declare_blocking(channel, topology())
        channel.confirm_delivery()
        assert _message_count(own_vhost, SCHEDULE_QUEUE) == 0
        handled = pool.handled
        for op_name, args in [
            ("get_taskmanagers", {}),
            ("get_schema", {}),
            ("get_dataproduct", {"taskmanager_id": 1, "generation_id": 1, "key": "k"}),
        ]:
            publish_request(channel, op_name, args, SCHEDULE_QUEUE)
        services.poll(
            lambda: pool.handled >= handled + 3 and not any(c.held for c in pool.consumers), 20
        )
        time.sleep(1.0)
        assert _message_count(own_vhost, SCHEDULE_QUEUE) == 0, "a reply took the schedule's slot"
        schedule = Schedule(own_vhost, 30, interval=3600)
        assert schedule.arm(), "the next scheduled reap could not be armed"
        publish_request(channel, "get_taskmanagers", {}, SCHEDULE_QUEUE)
        services.poll(lambda: pool.handled >= handled + 4, 20)
        time.sleep(1.0)
        method, props, _body = channel.basic_get(SCHEDULE_QUEUE)
        assert method is not None and method.message_count == 0
        assert props.type == "reap" and props.app_id == "dataspace-worker schedule"
        channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()


# -- finding 5: forged direct reply-to addresses -----------------------------------------
def _forged(rng: random.Random, live_node: str) -> list[tuple[bool, str]]:
    """One of each kind of forged reply_to, shuffled: (well-formed, address)."""
    forged = [
        (False, f"{PREFIX}AAAA.BBBB"),  # garbage
        (False, f"{PREFIX}{base64.b64encode(rng.randbytes(30)).decode()}.{KEY}"),  # random
        (False, DEAD_LETTER_QUEUE),  # a queue
        (True, pid_address("rabbit@nowhere")),  # a node that does not exist, always the same
        (True, pid_address(f"reply@{rng.randrange(10**9)}")),  # a new such node each time
        (True, pid_address(live_node, atom_tag=100)),  # the live node, encoded as it never is
    ]
    rng.shuffle(forged)
    return forged


def test_forged_addresses_cost_the_consumer_connection_nothing(own_vhost, pool_factory, pg_dsn):
    """10 forged reply_to addresses a second for 20 s (garbage, random bytes, a node
    that does not exist, a new such node each time, the worker's own node encoded
    otherwise, a queue name): the worker's consumer connection is never reopened,
    and another client's synchronous inserts and reads all succeed meanwhile."""
    pool = pool_factory(own_vhost, consumers=2)
    space = DataSpace(remote_config(own_vhost, timeout=15))
    seq = space.store_taskmanager(f"flood-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
    live = ReplyClient(own_vhost)
    live_node = decode_address(live.address())[0]
    live.close()
    rng = random.Random(12)
    stop = threading.Event()
    calls: list[float] = []
    errors: list[str] = []

    def other_client() -> None:
        generation = 0
        while not stop.is_set():
            generation += 1
            value = f"v{generation}".encode()
            for call in (
                lambda g=generation, v=value: space.insert(seq, g, "k", v, HEADER, METADATA),
                lambda g=generation, v=value: (
                    space.get_dataproduct(seq, g, "k") == v
                    or errors.append(f"generation {g}: wrong value")
                ),
            ):
                started = time.monotonic()
                try:
                    call()
                except Exception as exc:  # every failure is a finding
                    errors.append(f"{type(exc).__name__}: {exc}")
                calls.append(time.monotonic() - started)

    # a baseline of the other client's latency, without the flood
    worker = threading.Thread(target=other_client, daemon=True)
    worker.start()
    time.sleep(3.0)
    baseline = list(calls)
    calls.clear()
    attacker = pika.BlockingConnection(pika.URLParameters(own_vhost))
    sent = {"queue or garbage": 0, "well-formed": 0}
    guard_before = getattr(pool._guard, "connections_opened", 0)
    try:
        channel = attacker.channel()
        channel.confirm_delivery()
        read = {"taskmanager_id": seq, "generation_id": 1, "key": "k"}
        started = time.monotonic()
        count = 0
        forged: list[tuple[bool, str]] = []
        while count < FLOOD_RATE * FLOOD_SECONDS and time.monotonic() - started < 60:
            forged = forged or _forged(rng, live_node)
            well_formed, reply_to = forged.pop()
            publish_request(channel, "get_dataproduct", read, reply_to)
            sent["well-formed" if well_formed else "queue or garbage"] += 1
            count += 1
            pause = started + count / FLOOD_RATE - time.monotonic()
            if pause > 0:
                attacker.sleep(pause)
        flood_seconds = time.monotonic() - started
        services.poll(lambda: _message_count(own_vhost, REQUEST_QUEUE) == 0, 15)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(30)
        if attacker.is_open:
            attacker.close()
        space.close()
    during = sorted(calls)
    figures = {
        "forged_sent": sent,
        "flood_s": round(flood_seconds, 1),
        "consumer_connections_opened": pool.connections_opened,
        "guard_connections_opened": getattr(pool._guard, "connections_opened", 0) - guard_before,
        "other_client_calls": len(during),
        "other_client_errors": len(errors),
        "baseline_p50_ms": round(statistics.median(baseline) * 1000, 1) if baseline else None,
        "p50_ms": round(statistics.median(during) * 1000, 1) if during else None,
        "p99_ms": round(during[int(len(during) * 0.99) - 1] * 1000, 1) if during else None,
        "max_ms": round(during[-1] * 1000, 1) if during else None,
    }
    print("forged reply_to flood:", orjson.dumps(figures).decode())
    assert count == FLOOD_RATE * FLOOD_SECONDS
    assert pool.connections_opened == 1, f"the consumer connection was reopened: {figures}"
    assert errors == [], f"{errors[:5]} ({figures})"
    assert len(during) >= 100, figures
    # the guard's own connection: at most one reconnection a second (PROBE_PAUSE)
    assert figures["guard_connections_opened"] <= FLOOD_SECONDS + 5, figures
    # the malformed ones were refused (dead-lettered), the well-formed ones answered or
    # dropped, never dead-lettered
    dead = services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=1)
    codes = [_header(p, "x-dataspace-error-code") for p, _ in dead]
    assert codes == ["bad_reply_to"] * len(codes)
    assert len(codes) == sent["queue or garbage"], (len(codes), sent)
