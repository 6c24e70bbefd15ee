"""Nothing a client sends makes the worker publish what the broker refuses (issue 12,
findings 3 and 6): a request's header table is bounded, a dead letter fits in a
frame and keeps a bounded body, and a reply over the broker's max_message_size is
an error reply (``too_large``), never an endless retry.

And the byte bound's bookkeeping (finding 7): what the pool holds is counted per
delivery and released by every settlement."""

from __future__ import annotations

import hashlib
import threading
import time

import orjson
import pika
import pytest

from dataspace_client import DataSpace, Header
from dataspace_core.errors import DataSpaceRequestError, DataSpaceTooLargeError
from dataspace_core.protocol import DEAD_LETTER_QUEUE, OPERATIONS, decode_reply
from dataspace_worker import dead_letters, metrics
from dataspace_worker.dead_letters import DEAD_LETTER_HEADERS
from dataspace_worker.delivery import Delivery, truncated
from dataspace_worker.dispatch import Outcome
from dataspace_worker.in_hand import Ledger
from dataspace_worker.topology import topology
from dataspace_worker.worker_pool import WorkerPool
from tests import services
from tests.support.configs import remote_config

KIB = 1024
MIB = 1024 * KIB
#: RabbitMQ's default frame_max, which the worker's connection negotiates
FRAME_MAX = 131072


def _properties_size(properties: pika.BasicProperties) -> int:
    return sum(len(piece) for piece in properties.encode())


def _delivery(headers: dict, body: bytes = b"{}", **properties) -> Delivery:
    return Delivery(
        channel=None,
        tag=1,
        exchange="dataspace",
        routing_key="data.get_schema",
        properties=pika.BasicProperties(headers=headers, **properties),
        body=body,
    )


def _pool(**kwargs) -> WorkerPool:
    """A pool that is never started: for its checks alone."""
    return WorkerPool("amqp://guest:guest@127.0.0.1:5672/%2F", None, topology(), **kwargs)


# -- units ---------------------------------------------------------------------------
def test_a_header_table_over_the_limit_is_refused_unread():
    pool = _pool(max_headers=16 * KIB)
    assert pool.oversized_headers(_delivery({"x-pad": "a" * (15 * KIB)})) is None
    assert pool.oversized_headers(_delivery({})) is None
    outcome = pool.oversized_headers(_delivery({"x-pad": "a" * (17 * KIB)}))
    assert outcome.code == "bad_request" and outcome.poison
    assert "header table of" in outcome.reason and "16384" in outcome.reason
    with pytest.raises(DataSpaceRequestError, match="header table"):
        decode_reply(OPERATIONS["get_schema"], outcome.body)


def test_a_header_table_pika_cannot_encode_again_is_refused_unread():
    """pika decodes a double header of 1e300 into an integer it cannot encode again
    (over 64 bits): the table's size is unknown, and the request is refused (its
    dead letter could not copy it)."""
    outcome = _pool().oversized_headers(_delivery({"x-float": pika.compat.long(1e300)}))
    assert outcome.code == "bad_request" and "unencodable" in outcome.reason


@pytest.mark.parametrize("kind, packed", [(b"d", ">d"), (b"f", ">f")])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_an_infinite_or_nan_float_header_is_decoded_and_refused(kind, packed, value):
    """pika's frame parser raised on these (int(inf)), which aborts the connection
    whatever the message; patches.py keeps them floats, which no check lets
    through (pika cannot encode a float again)."""
    import math
    import struct

    from dataspace_core.amqp import patches  # noqa: F401

    field = b"\x01x" + kind + struct.pack(packed, value)
    table, _ = pika.data.decode_table(struct.pack(">I", len(field)) + field, 0)
    assert math.isnan(table["x"]) if math.isnan(value) else table["x"] == value
    outcome = _pool().oversized_headers(_delivery(table))
    assert outcome.code == "bad_request" and "unencodable" in outcome.reason


def test_a_dead_letter_fits_in_a_frame_whatever_the_request_carried():
    """A request with a ~128 KiB header table (just under frame_max) and a 3 MiB body:
    its dead letter keeps the small headers, the identifiers and why, notes what it
    dropped, and is far below one frame; its body is cut to what it keeps."""
    body = b"x" * (3 * MIB)
    delivery = _delivery(
        {
            "x-dataspace-lane": "tm-7",
            "x-pad": "a" * (FRAME_MAX - 600),
            "x-dataspace-reason": "forged by the client",
            "x-dataspace-body-size": 1,
        },
        body,
        message_id="m-1",
        correlation_id="c-1",
        reply_to="amq.rabbitmq.reply-to.abc",
    )
    outcome = Outcome(b"{}", "bad_request", "?", reason="header table too large " * 100)
    kept = truncated(delivery, 1 * MIB)
    properties = dead_letters.properties(kept, outcome)
    headers = properties.headers
    assert _properties_size(properties) < DEAD_LETTER_HEADERS + 4 * KIB < FRAME_MAX // 4
    assert headers["x-dataspace-lane"] == "tm-7"
    assert "x-pad" not in headers
    assert "'x-pad'" in headers["x-dataspace-headers-dropped"]
    assert headers["x-dataspace-reason"].startswith("header table too large")
    assert len(headers["x-dataspace-reason"]) <= 1000
    assert headers["x-dataspace-error-code"] == "bad_request"
    assert headers["x-original-exchange"] == "dataspace"
    assert headers["x-original-routing-key"] == "data.get_schema"
    assert properties.message_id == "m-1" and properties.correlation_id == "c-1"
    # the worker's own facts, never the client's
    assert headers["x-dataspace-body-size"] == len(body)
    assert headers["x-dataspace-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert len(kept.body) == 1 * MIB


def test_a_reply_over_the_brokers_message_size_becomes_too_large():
    pool = _pool(max_message_size=1 * MIB)
    small = Outcome(b"x" * MIB, "ok", "get_dataproducts")
    assert pool.sendable(small) is small
    outcome = pool.sendable(Outcome(b"x" * (MIB + 1), "ok", "get_dataproducts"))
    assert outcome.code == "too_large" and not outcome.retry and not outcome.poison
    assert not outcome.dead_letter("amq.rabbitmq.reply-to.abc")
    with pytest.raises(DataSpaceTooLargeError, match=r"1048577 bytes.*get_dataproduct\("):
        decode_reply(OPERATIONS["get_dataproducts"], outcome.body)


def test_the_ledger_counts_what_is_delivered_and_not_settled():
    ledger = Ledger()
    a, b = object(), object()
    for tag in (1, 2, 3, 4):
        ledger.add(a, tag, 10)
    ledger.add(b, 1, 100)
    assert ledger.total == 140
    ledger.settle(a, 2, multiple=False)
    assert ledger.total == 130
    ledger.settle(a, 3, multiple=True)  # 1 and 3
    assert ledger.total == 110
    ledger.settle(a, 3, multiple=True)  # nothing left up to 3
    assert ledger.total == 110
    ledger.drop(b)  # closed: the broker took it back
    assert ledger.total == 10
    ledger.settle(a, 0, multiple=True)  # everything
    assert ledger.total == 0


# -- against the broker --------------------------------------------------------------
class _Caller(threading.Thread):
    """Another client calling the service all along: every call must succeed."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.calls = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        space = DataSpace(remote_config(self.url, timeout=20))
        try:
            while not self.stop.is_set():
                try:
                    name = f"bystander-{self.calls}"
                    space.store_taskmanager(name, f"ID-{self.calls}")
                    space.get_taskmanager(name)
                    self.calls += 1
                except Exception as exc:  # counted, shown by the test
                    self.errors.append(exc)
                time.sleep(0.02)
        finally:
            space.close()


class _RawRequests:
    """Requests published by hand, as any AMQP client may, with their replies
    collected by correlation_id (direct reply-to)."""

    def __init__(self, url: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.replies: dict[str, bytes] = {}
        self.channel = self.connection.channel()
        self.channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _c, _m, props, body: self.replies.__setitem__(props.correlation_id, body),
            auto_ack=True,
        )

    def send(self, tag, requests, headers=None, properties=pika.BasicProperties, pause=0.0):
        """Publish ``(routing_key, body)`` requests as ``<tag>-<i>`` (correlation_id
        and message_id), reading the broker for ``pause`` seconds after each."""
        for i, (routing_key, body) in enumerate(requests):
            self.channel.basic_publish(
                "dataspace",
                routing_key,
                body,
                properties(
                    correlation_id=f"{tag}-{i}",
                    message_id=f"{tag}-{i}",
                    reply_to="amq.rabbitmq.reply-to",
                    headers=headers,
                ),
            )
            if pause:
                self.connection.process_data_events(time_limit=pause)

    def wait(self, count: int, within: float = 30) -> None:
        """Read replies until ``count`` are in, or ``within`` seconds passed."""
        deadline = time.monotonic() + within
        while len(self.replies) < count and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.2)

    def close(self) -> None:
        self.connection.close()


#: a fast read and a request-queue read, as raw request bodies
_READ = orjson.dumps(
    {"v": 1, "op": "get_dataproduct", "args": {"taskmanager_id": 1, "generation_id": 1, "key": "k"}}
)
_SCHEMA = orjson.dumps({"v": 1, "op": "get_schema", "args": {"table": "header"}})


def test_15_requests_with_128_kib_headers_cost_no_reconnection(own_vhost, pool_factory):
    """Finding 3: a header table just under frame_max is fine to publish, but the dead
    letter built from it used to exceed the frame: the broker closed the worker's
    connection at every redelivery (15 messages: 105 reconnections). Now each is
    refused unread, answered (bad_request) and dead-lettered without the table."""
    pool = pool_factory(own_vhost, consumers=2)
    caller = _Caller(own_vhost)
    caller.start()
    raw = _RawRequests(own_vhost)
    replies = raw.replies
    try:
        body = b"not json: a request the worker dead-letters"
        headers = {"x-pad": "a" * (FRAME_MAX - 200)}
        raw.send("big", [("data.get_schema", body)] * 15, headers=headers, pause=0.3)
        raw.wait(15)
        time.sleep(1)  # the caller goes on a little after the last one
    finally:
        caller.stop.set()
        caller.join(30)
        raw.close()
    dead = services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=2)
    print(
        f"\n[publish limits] 15 big-header requests: {pool.connections_opened - 1} worker "
        f"reconnections; another client: {caller.calls} calls, {len(caller.errors)} failed"
    )
    assert pool.connections_opened == 1, "the worker's connection was lost and reopened"
    assert caller.errors == [] and caller.calls > 10
    assert len(replies) == 15
    for reply in replies.values():
        error = orjson.loads(reply)["error"]
        assert error["code"] == "bad_request" and "header table" in error["message"]
    assert sorted(p.message_id for p, _ in dead) == sorted(f"big-{i}" for i in range(15))
    for properties, _body in dead:
        assert "x-pad" not in properties.headers
        assert properties.headers["x-dataspace-error-code"] == "bad_request"


def test_a_float_header_is_refused_and_costs_no_consumer(own_vhost, pool_factory):
    """A double header of 1e300 (AMQP 'd', which other clients send; pika decodes a
    double into an integer, here one it cannot encode again as 64 bits) made the
    size check raise TypeError: on a database thread, which died with it, or on
    the I/O thread for a fast read, which aborted the connection at every
    redelivery. Now each such request is answered bad_request and the pool
    carries on. (An infinite or NaN double never reaches a worker through
    RabbitMQ 3.10: the broker closes the publisher's connection, 541.)"""
    double = 1e300
    import struct

    placeholder = b"l" + struct.pack(">q", 2**40)  # 9 bytes, as a double's field

    class FloatHeader(pika.BasicProperties):
        """Sends its header ``x-float`` as the double (pika cannot encode one)."""

        def encode(self):
            encoded = b"".join(super().encode())
            assert encoded.count(placeholder) == 1
            return [encoded.replace(placeholder, b"d" + struct.pack(">d", double))]

    pool = pool_factory(own_vhost, consumers=2)
    raw = _RawRequests(own_vhost)
    replies = raw.replies
    requests = [("read.get_dataproduct", _READ), ("data.get_schema", _SCHEMA)] * 4
    try:
        raw.send("float", requests, headers={"x-float": 2**40}, properties=FloatHeader)
        raw.wait(len(requests))
        # the consumers still answer: a plain request, on each database thread
        raw.send("plain", [("data.get_schema", _SCHEMA)] * 4)
        raw.wait(len(requests) + 4)
    finally:
        raw.close()
    for i in range(len(requests)):
        error = orjson.loads(replies[f"float-{i}"])["error"]
        assert error["code"] == "bad_request" and "unencodable" in error["message"]
    for i in range(4):
        assert orjson.loads(replies[f"plain-{i}"])["ok"] is True
    assert pool.connections_opened == 1, "the worker's connection was lost and reopened"


def test_a_bug_in_the_checks_answers_internal_and_the_consumers_go_on(
    own_vhost, pool_factory, monkeypatch
):
    """A check before the dispatcher that raises (as the size check did on a
    header pika could not encode again) ended the database thread, leaving its
    consumer's deliveries unsettled; on the I/O thread it ended the connection.
    Now each such request is answered 'internal', logged, and the consumers,
    the reads on the I/O thread included, go on answering."""
    from dataspace_worker.bounds import RequestBounds

    real = RequestBounds.oversized_headers

    def buggy(self, delivery):
        if "x-bug" in (delivery.properties.headers or {}):
            raise RuntimeError("a bug in a check")
        return real(self, delivery)

    monkeypatch.setattr(RequestBounds, "oversized_headers", buggy)
    pool = pool_factory(own_vhost, consumers=2)
    raw = _RawRequests(own_vhost)
    replies = raw.replies
    requests = [("read.get_dataproduct", _READ), ("data.get_schema", _SCHEMA)] * 3
    try:
        raw.send("bug", requests, headers={"x-bug": 1})
        raw.send("plain", requests)
        raw.wait(12)
    finally:
        raw.close()
    for i in range(6):
        error = orjson.loads(replies[f"bug-{i}"])["error"]
        assert error["code"] == "internal" and "a bug, logged" in error["message"]
    for i in range(6):
        reply = orjson.loads(replies[f"plain-{i}"])
        assert reply.get("ok") or reply["error"]["code"] == "not_found"  # answered
    assert pool.connections_opened == 1, "the worker's connection was lost and reopened"
    assert all(c.thread.is_alive() for c in pool.consumers), "a database thread died"


def test_a_reply_over_the_message_size_is_too_large_and_the_next_is_answered(
    own_vhost, pool_factory
):
    """Finding 6: a reply larger than the broker's max_message_size closed the consumer
    channel, and was tried again without end. The limit is the worker's
    ``max_message_size`` (the broker's, 128 MiB, by default): at 1 MiB here,
    ``get_dataproducts`` over three 600 KiB products is a too_large error saying how
    to read them, the request is settled, and the next request is answered on the
    same channels."""
    pool = pool_factory(own_vhost, consumers=2, max_message_size=1 * MIB)
    channels = [c.channel for c in pool.consumers]
    too_large_before = metrics.REPLIES_TOO_LARGE._value.get()
    space = DataSpace(remote_config(own_vhost, timeout=20))
    try:
        tm = space.store_taskmanager("too-large", "TOO-LARGE")
        metadata = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}
        values = {f"k{i}": bytes([i]) * (600 * KIB) for i in range(3)}
        for key, value in values.items():
            space.insert(tm, 1, key, value, dict(Header(tm)), metadata)
        started = time.monotonic()
        with pytest.raises(DataSpaceTooLargeError) as raised:
            space.get_dataproducts(tm)
        took = time.monotonic() - started
        message = str(raised.value)
        assert "get_dataproduct(" in message and "max_message_size (1048576 bytes)" in message
        assert took < 10, "answered at once, not after retries"
        # the products are readable one at a time, and the next request is answered
        for key, value in values.items():
            assert space.get_dataproduct(tm, 1, key) == value
        assert space.store_taskmanager("too-large-next", "NEXT") > 0
    finally:
        space.close()
    assert metrics.REPLIES_TOO_LARGE._value.get() == too_large_before + 1
    assert pool.connections_opened == 1
    assert [c.channel for c in pool.consumers] == channels
    assert all(c.channel.is_open for c in pool.consumers)
    assert services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=1) == []


def test_the_pool_stops_taking_deliveries_over_its_bytes_in_hand(
    own_vhost, pool_factory, monkeypatch
):
    """max_bytes_in_hand 1 MiB, six consumers (prefetch 1) whose requests take 0.2 s,
    and 24 requests of 300 KiB published at once: the pool stops taking deliveries
    once it would hold over 1 MiB (never more than that and one body per channel:
    it cancels its consumers, or does not read its socket before the next body),
    takes them again when down to half, and answers every request."""
    size, count, limit = 300 * KIB, 24, 1 * MIB
    pool = pool_factory(own_vhost, consumers=6, prefetch=1, max_bytes_in_hand=limit)
    dispatcher = pool.consumers[0].dispatcher
    handle_batch = dispatcher.handle_batch

    def slow(requests):
        time.sleep(0.2)
        return handle_batch(requests)

    monkeypatch.setattr(dispatcher, "handle_batch", slow)

    def stops() -> float:  # consumers cancelled, or the socket not read before a body
        return metrics.CONSUMPTION_PAUSES._value.get() + metrics.READ_HOLDS._value.get()

    stops_before = stops()
    body = orjson.dumps({"v": 1, "op": "get_schema", "args": {}}) + b" " * size
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], pool.intake.ledger.total)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    replies: dict[str, bytes] = {}
    try:
        channel = connection.channel()
        channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _c, _m, props, body: replies.__setitem__(props.correlation_id, body),
            auto_ack=True,
        )
        for i in range(count):
            channel.basic_publish(
                "dataspace",
                "data.get_schema",
                body,
                pika.BasicProperties(correlation_id=f"r{i}", reply_to="amq.rabbitmq.reply-to"),
            )
        deadline = time.monotonic() + 60
        while len(replies) < count and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
    finally:
        done.set()
        watcher.join(5)
        connection.close()
    channels = len(pool.consumers)  # two consumers and the reaper's
    print(f"\n[publish limits] bytes in hand: peak {peak[0]} of limit {limit}")
    assert len(replies) == count
    assert all(orjson.loads(r)["ok"] for r in replies.values())
    assert peak[0] <= limit + channels * len(body)
    assert stops() > stops_before
    assert pool.intake.ledger.total == 0
    assert pool.connections_opened == 1
