"""Replies to clients whose node is down (worker/dataspace_worker/guarded_replies.py).

RabbitMQ 3.10 crashes the connection that publishes to a direct reply-to address
of a node that is not running. On one node the same address is made by hand: a
real reply-to address with another node hash in it. The cluster version of this
(a node killed under load) is tests/faults/test_cluster.py; forged addresses in a
flood are tests/test_reply_to.py.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
import uuid

import orjson
import pika
import psycopg2
import pytest

from dataspace_core.protocol import (
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    OPERATIONS,
    REQUEST_QUEUE,
    encode_request,
)
from dataspace_worker import guarded_replies, metrics
from dataspace_worker.guarded_replies import DIRECT_REPLY_TO_PREFIX
from dataspace_worker.reply_addresses import parse
from dataspace_worker.topology import declare_blocking, topology
from tests import services
from tests.support.raw_clients import ReplyClient


def _guarded(result: str) -> float:
    return metrics.GUARDED_REPLIES.labels(result)._value.get()


def address_of_a_node_that_is_down(address: str) -> str:
    """``address`` with another node in it (v2 format: the node is ``reply@<hash>``
    inside the base64 Erlang pid), which no running node answers to."""
    encoded, key = address[len(DIRECT_REPLY_TO_PREFIX) :].split(".", 1)
    pid = base64.b64decode(encoded)
    match = re.search(rb"reply@(\d+)", pid)
    assert match, f"not a v2 direct reply-to address: {address}"
    digits = match.group(1)
    other = str((int(digits) + 1) % 10 ** len(digits)).zfill(len(digits)).encode()
    forged = pid[: match.start(1)] + other + pid[match.end(1) :]
    return f"{DIRECT_REPLY_TO_PREFIX}{base64.b64encode(forged).decode()}.{key}"


def elsewhere(key: str) -> str:
    """A well-formed direct reply-to address of a pid on node ``rabbit@elsewhere``."""
    node = b"rabbit@elsewhere"
    term = b"\x83Xv" + len(node).to_bytes(2, "big") + node + bytes(11) + b"\x01"
    return f"{DIRECT_REPLY_TO_PREFIX}{base64.b64encode(term).decode()}.{key}"


def store_request(url: str, reply_to: str, name: str) -> str:
    """Publish a store_taskmanager request as a client would; its correlation id."""
    op = OPERATIONS["store_taskmanager"]
    correlation_id = uuid.uuid4().hex
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            EXCHANGE,
            op.routing_key,
            encode_request(op, {"taskmanager_name": name, "taskmanager_id": str(uuid.uuid4())}),
            pika.BasicProperties(
                message_id=uuid.uuid4().hex,
                correlation_id=correlation_id,
                reply_to=reply_to,
                content_type="application/json",
                delivery_mode=2,
            ),
        )
    finally:
        connection.close()
    return correlation_id


def _stored(pg_dsn: str, name: str) -> int:
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM taskmanager WHERE name = %s", (name,))
        return cur.fetchone()[0]


def _queue_empty(url: str, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        method = connection.channel().queue_declare(name, passive=True).method
        return method.message_count == 0
    finally:
        connection.close()


def test_which_replies_are_guarded(own_vhost):
    """On the consumer's channel: a first delivery whose node is known to run (the
    guard's own, learnt when the consumer connection opens, or one it published to);
    through the guard: a redelivery, or a node not known to run; dropped at once: a
    node the broker failed on."""
    client = ReplyClient(own_vhost)
    live = parse(client.address())
    down = parse(address_of_a_node_that_is_down(live.address))
    guard = guarded_replies.GuardedReplies(
        lambda: pika.URLParameters(own_vhost), threading.Event(), "test guard"
    )
    try:
        assert guard.route(live, redelivered=False) == "guard"  # nothing known yet
        guard.start()
        guard.connected()  # as the pool does when its connection opens
        learnt, _ = services.poll(lambda: guard.route(live, redelivered=False) == "direct", 10)
        assert learnt, "the guard did not learn its own node"
        assert guard.route(live, redelivered=True) == "guard"
        assert guard.route(down, redelivered=False) == "guard"
        results: list[str] = []
        guard.put(
            guarded_replies.GuardedReply(
                down.address, b"", pika.BasicProperties(), results.append, address=down
            )
        )
        services.poll(lambda: results, 10)
        assert results == ["dropped"]
        assert guard.route(down, redelivered=False) == "drop"
        assert guard.route(live, redelivered=False) == "direct"  # its node still runs
        guard.connected()  # a new consumer connection: known nodes are tried again
        assert guard.route(parse(client.address()), redelivered=False) in ("guard", "direct")
    finally:
        guard.stop()
        client.close()


def test_a_forged_address_is_refused_by_this_broker_as_a_node_that_is_down(own_vhost):
    """The broker behaviour the guard exists for (if a newer RabbitMQ stops crashing
    here, the guard is still right, only no longer needed)."""
    client = ReplyClient(own_vhost)
    forged = address_of_a_node_that_is_down(client.address())
    publisher = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = publisher.channel()
        channel.basic_publish("", forged, b"reply")
        publisher.process_data_events(0.5)
        channel.basic_publish("", forged, b"reply")
        publisher.process_data_events(0.5)
    except pika.exceptions.ConnectionClosedByBroker as exc:
        assert exc.reply_code == 541
    else:
        pytest.skip("this RabbitMQ no longer fails on a reply-to of a node that is down")
    finally:
        client.close()
        if publisher.is_open:
            publisher.close()


def test_a_reply_to_a_node_that_is_down_costs_no_reconnect_and_no_dead_letter(
    own_vhost, pool_factory, pg_dsn
):
    pool = pool_factory(own_vhost, consumers=2)
    client = ReplyClient(own_vhost)
    try:
        dropped = _guarded("dropped")
        name = f"guard-{uuid.uuid4().hex[:8]}"
        store_request(own_vhost, address_of_a_node_that_is_down(client.address()), name)
        # A node not known to run: even the first delivery's reply goes through the
        # guard, which takes the broker's crash instead of the consumer connection.
        seen, _ = services.poll(lambda: _guarded("dropped") > dropped, 30)
        if not seen:
            dead = services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=1)
            raise AssertionError(
                f"the guard dropped no reply; the pool opened {pool.connections_opened} "
                f"connections; dead letters: {len(dead)}"
            )
        # Settled: applied once, acked (nothing held, nothing in the queue), not
        # dead-lettered, and no more reconnections than that one.
        settled, seconds = services.poll(
            lambda: (
                not any(c.held for c in pool.consumers)
                and _queue_empty(own_vhost, REQUEST_QUEUE)
                and _stored(pg_dsn, name) == 1
            ),
            10,
        )
        assert settled, f"request not settled {seconds:.0f} s after its reply was dropped"
        assert _guarded("dropped") == dropped + 1
        assert pool.connections_opened == 1
        assert services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=1) == []
        # And the worker answers the next client at once.
        answer = store_request(own_vhost, client.address(), f"{name}-next")
        reply = client.wait_for(answer, 10)
        assert reply is not None and orjson.loads(reply)["ok"] is True
        assert pool.connections_opened == 1
    finally:
        client.close()


def test_a_redelivered_request_is_answered_through_the_guard(own_vhost, pool_factory, pg_dsn):
    setup = pika.BlockingConnection(pika.URLParameters(own_vhost))
    declare_blocking(setup.channel(), topology())
    setup.close()
    client = ReplyClient(own_vhost)
    try:
        name = f"redelivered-{uuid.uuid4().hex[:8]}"
        correlation_id = store_request(own_vhost, client.address(), name)
        # Taken and given back, as by a worker that lost its connection: redelivered.
        taker = pika.BlockingConnection(pika.URLParameters(own_vhost))
        channel = taker.channel()
        method = None
        while method is None:
            method, _, _ = channel.basic_get(REQUEST_QUEUE)
        channel.basic_nack(method.delivery_tag, requeue=True)
        taker.close()
        sent = _guarded("sent")

        pool = pool_factory(own_vhost, consumers=1)
        reply = client.wait_for(correlation_id, 15)
        assert reply is not None, "no reply to the redelivered request"
        assert orjson.loads(reply)["ok"] is True
        services.poll(lambda: _guarded("sent") > sent, 5)  # counted after the confirm
        assert _guarded("sent") == sent + 1
        settled, _ = services.poll(lambda: _queue_empty(own_vhost, REQUEST_QUEUE), 10)
        assert settled and _stored(pg_dsn, name) == 1
        assert pool.connections_opened == 1
    finally:
        client.close()


def test_the_guard_drops_a_dead_address_and_remembers_it(own_vhost, monkeypatch):
    """On its own: replies go out in order, one at a time; a dead address costs the
    guard's connection once, later replies to the same client channel none."""
    opened = []

    class Counted(pika.BlockingConnection):
        def __init__(self, parameters):
            opened.append(parameters)
            super().__init__(parameters)

    client = ReplyClient(own_vhost)
    live = client.address()
    dead = address_of_a_node_that_is_down(live)
    monkeypatch.setattr(guarded_replies.pika, "BlockingConnection", Counted)  # the guard's
    results: list[tuple[str, str]] = []
    guard = guarded_replies.GuardedReplies(
        lambda: pika.URLParameters(own_vhost), threading.Event(), "test guard"
    )
    guard.start()
    try:
        for name, address in [("a", dead), ("b", live), ("c", dead), ("d", live)]:
            guard.put(
                guarded_replies.GuardedReply(
                    address,
                    name.encode(),
                    pika.BasicProperties(correlation_id=name),
                    lambda result, n=name: results.append((n, result)),
                )
            )
        guard.put(
            guarded_replies.GuardedReply(
                live,
                b"e",
                pika.BasicProperties(correlation_id="e"),
                lambda result: results.append(("e", result)),
                wanted=lambda: False,  # its request went back to the queue meanwhile
            )
        )
        done, _ = services.poll(lambda: guard.pending == 0, 15)
        assert done
        assert results == [
            ("a", "dropped"),
            ("b", "sent"),
            ("c", "dropped"),
            ("d", "sent"),
            ("e", "abandoned"),
        ]
        assert client.wait_for("d", 5) == b"d" and client.replies.get("b") == b"b"
        assert "e" not in client.replies
        # one connection before the dead address, one after it; none more for "c"
        assert len(opened) == 2
    finally:
        guard.stop()
        client.close()


def test_the_guard_keeps_trying_while_the_reply_is_wanted_and_stops_with_the_worker():
    """No broker at its address: the guard tries again (it does not give a reply up
    while its request is held), until the request is requeued or the worker stops."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    stopping = threading.Event()
    guard = guarded_replies.GuardedReplies(lambda: pika.URLParameters(url), stopping)
    results: list[str] = []
    wanted = threading.Event()
    wanted.set()
    guard.start()
    try:
        for name, still in [("requeued", wanted.is_set), ("stopping", lambda: True)]:
            guard.put(
                guarded_replies.GuardedReply(
                    elsewhere(name),
                    b"",
                    pika.BasicProperties(),
                    results.append,
                    wanted=still,
                )
            )
        time.sleep(1.0)
        assert results == []  # still trying
        wanted.clear()  # the first one's request went back to the queue
        services.poll(lambda: results, 10)
        assert results == ["abandoned"]
        time.sleep(0.5)
        assert results == ["abandoned"]  # the second one: still trying
        stopping.set()
        services.poll(lambda: len(results) == 2, 10)
        assert results == ["abandoned", "failed"]
        assert guard.pending == 0
    finally:
        stopping.set()
        guard.stop()


def test_a_reply_the_broker_refuses_for_its_size_is_answered_too_large_once():
    """A broker whose max_message_size is below the worker's refuses the reply with
    406 on the channel: the guard must not retry it for as long as it is wanted
    (it would be refused every time), but answer ``too_large`` instead."""
    from pika.exceptions import ChannelClosedByBroker

    published: list[tuple[str, bytes, pika.BasicProperties]] = []

    class SmallBroker:
        is_open = True

        def basic_publish(self, exchange, routing_key, body, properties):
            if len(body) > 1000:
                raise ChannelClosedByBroker(406, "PRECONDITION_FAILED - message size too large")
            published.append((routing_key, body, properties))

    guard = guarded_replies.GuardedReplies(
        lambda: pika.URLParameters("amqp://127.0.0.1:1/%2F"), threading.Event()
    )
    guard._open = SmallBroker  # each attempt opens "a channel" on the small broker
    guard._close = lambda: None
    reply = guarded_replies.GuardedReply(
        elsewhere("big"),
        b"x" * 5000,
        pika.BasicProperties(headers={"x-dataspace-outcome": "ok"}),
        lambda _result: None,
    )
    assert guard._deliver(reply) == "sent"
    [(address, body, properties)] = published
    assert address == reply.reply_to
    error = orjson.loads(body)["error"]
    assert error["code"] == "too_large" and "5000 bytes" in error["message"]
    assert properties.headers["x-dataspace-outcome"] == "too_large"


def test_a_node_found_down_is_tried_again_once_restarted():
    """A node restarted under the same name has a new creation in its pids: replies
    to its clients' new addresses must not be dropped as the old node's were (a
    client on a rejoined cluster node would go unanswered for a minute)."""
    from dataspace_worker.reply_addresses import parse

    sent: list[str] = []

    class Broker:
        is_open = True

        def basic_publish(self, exchange, routing_key, body, properties):
            sent.append(routing_key)

    def address(creation: int) -> str:
        node = b"rabbit@restarted"
        term = b"\x83Xv" + len(node).to_bytes(2, "big") + node + bytes(8)
        term += creation.to_bytes(4, "big")
        return f"{DIRECT_REPLY_TO_PREFIX}{base64.b64encode(term).decode()}.key"

    guard = guarded_replies.GuardedReplies(
        lambda: pika.URLParameters("amqp://127.0.0.1:1/%2F"), threading.Event()
    )
    guard._open = Broker
    guard._close = lambda: None
    old, new = address(1), address(2)
    guard._remember_dead(parse(old), own_node=None)  # the broker failed on it: node down
    guard._probe_after = 0.0  # past the probe pause

    def deliver(reply_to: str) -> str:
        reply = guarded_replies.GuardedReply(reply_to, b"{}", pika.BasicProperties(), print)
        return guard._deliver(reply)

    assert deliver(old) == "dropped"  # the old incarnation: still taken for down
    assert deliver(new) == "sent" and sent == [new]  # the new one is tried
