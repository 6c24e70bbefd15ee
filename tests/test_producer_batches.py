"""Batches of fire-and-forget requests (docs/protocol.md, "Batches"): the wire
format, which publications the client groups, what a worker does with a batch
(each item applied once, failures dead-lettered with the batch), and the
client's way back to one message per request when the broker returns a batch
(older workers) or refuses its routing key (older account permissions)."""

from __future__ import annotations

import logging
import time
import uuid
from urllib.parse import quote

import orjson
import pika
import pytest

from dataspace_client import DataSpace
from dataspace_client.cli.dead_letters import _dead_entry, _selected
from dataspace_client.rpc import batching
from dataspace_client.rpc.batching import Batch, Batching
from dataspace_client.rpc.publications import Publication
from dataspace_core import batches
from dataspace_core.protocol import (
    BATCH_CONTENT_TYPE,
    EXCHANGE,
    OPERATIONS,
    REQUEST_QUEUE,
    ProtocolError,
    encode_request,
)
from dataspace_worker import metrics
from tests import services
from tests.support.broker_admin import MANAGEMENT_URL, Management
from tests.support.configs import remote_config
from tests.support.urls import user_url

HEADER = {"create_time": 1, "expiration_time": 2, "scheduled_create_time": 1, "creator": "t"}
HEADER["schema_id"] = None
METADATA = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}


# -- the wire format ---------------------------------------------------------------------
def test_a_batch_decodes_to_the_items_it_was_made_of():
    items = [("a" * 255, b""), ("é", b"\x00dsf1 raw"), ("m3", b"x" * 70_000)]
    assert batches.decode(batches.encode(items)) == items


@pytest.mark.parametrize(
    "body, says",
    [
        (b"", "does not start"),
        (b'{"v": 1}', "does not start"),
        (batches.BATCH_MAGIC, "no request"),
        (batches.BATCH_MAGIC + b"\x00" + b"\x00\x00\x00\x00", "empty message_id"),
        (batches.BATCH_MAGIC + b"\x05ab", "cut short"),
        (batches.BATCH_MAGIC + b"\x02\xff\xfe\x00\x00\x00\x00", "not UTF-8"),
        (batches.BATCH_MAGIC + b"\x01a\x00\x00\x00\x09abc", "body is cut short"),
        (batches.BATCH_MAGIC + b"\x01a\x00\x00\x00\x00" * (batches.MAX_ITEMS + 1), "more than"),
    ],
)
def test_what_is_not_a_batch_is_refused(body, says):
    with pytest.raises(ProtocolError, match=says):
        batches.decode(body)


# -- what the client groups --------------------------------------------------------------
def _pub(op="insert", size=10, lane=None, key=None) -> Publication:
    routing_key = key or OPERATIONS[op].routing_key
    return Publication(op, routing_key, b"x" * size, uuid.uuid4().hex, EXCHANGE, lane)


def _shape(messages) -> list:
    return [len(m.items) if isinstance(m, Batch) else m.operation for m in messages]


def test_runs_of_small_requests_of_one_operation_go_as_batches_in_order():
    pubs = [_pub(), _pub(), _pub("update"), _pub("update"), _pub("update"), _pub()]
    pubs += [_pub(lane="7", key="lane.insert"), _pub(), _pub(size=batches.CLIENT_ITEM_BYTES + 1)]
    grouped = Batching().grouped(pubs)
    assert _shape(grouped) == [2, 3, "insert", "insert", "insert", "insert"]
    flat = [p for m in grouped for p in (m.items if isinstance(m, Batch) else [m])]
    assert flat == pubs  # nothing lost, nothing moved


def test_a_batch_holds_at_most_its_count_and_bytes():
    many = [_pub() for _ in range(batches.CLIENT_ITEMS * 2 + 1)]
    assert _shape(Batching().grouped(many)) == [
        batches.CLIENT_ITEMS,
        batches.CLIENT_ITEMS,
        "insert",
    ]
    big = [_pub(size=batches.CLIENT_ITEM_BYTES // 4) for _ in range(10)]
    each = batches.item_size(big[0].message_id, big[0].body)
    fit = (batches.CLIENT_BYTES - len(batches.BATCH_MAGIC)) // each
    grouped = Batching().grouped(big)
    assert _shape(grouped) == [fit, 10 - fit] and 1 < fit < 9
    assert all(len(m.body()) <= batches.CLIENT_BYTES for m in grouped)


def test_no_batches_when_off_or_paused_after_a_return():
    pubs = [_pub(), _pub()]
    assert _shape(Batching(enabled=False).grouped(pubs)) == ["insert", "insert"]
    batching_ = Batching()
    back = Batch("insert", pubs, EXCHANGE)
    assert batching_.returned(back) and back.returned  # the first: recycle the channel
    assert not batching_.returned(Batch("insert", pubs, EXCHANGE))  # later ones: no more
    assert _shape(batching_.grouped(pubs)) == ["insert", "insert"]
    assert 0 < batching_.paused_for() <= batching.PAUSE_AFTER_RETURN
    batching_._paused_until = 0.0
    assert _shape(batching_.grouped(pubs)) == [2]
    # still older workers after the pause: a longer one; a batch through: short again
    assert batching_.returned(Batch("insert", pubs, EXCHANGE))
    assert batching_.paused_for() > batching.PAUSE_AFTER_RETURN
    batching_._paused_until = 0.0
    batching_.confirmed(Batch("insert", pubs, EXCHANGE))
    assert batching_.pause == batching.PAUSE_AFTER_RETURN
    assert not batching_.refused("ACCESS_REFUSED - write access to topic 'data.insert' ...")
    assert batching_.refused("ACCESS_REFUSED - write access to topic 'batch.insert' ...")
    assert _shape(batching_.grouped(pubs)) == ["insert", "insert"]


# -- through the broker --------------------------------------------------------------------
def _take_all(url: str, queue: str, count: int, timeout: float = 10, idle: float = 1.0) -> list:
    """Messages of ``queue`` (acked), as (method, properties, body): at least ``count``
    requests' worth, then until none came for ``idle`` seconds."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        taken, deadline, last = [], time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                taken.append((method, properties, body))
                last = time.monotonic()
            elif len(_requests_in(taken)) >= count and time.monotonic() - last > idle:
                break
            else:
                time.sleep(0.05)
        return taken
    finally:
        connection.close()


def _requests_in(taken) -> list[str]:
    """The message_ids of the requests in what was taken, batches opened."""
    ids = []
    for method, properties, body in taken:
        if method.routing_key.startswith(batches.BATCH_ROUTING_PREFIX):
            assert properties.content_type == BATCH_CONTENT_TYPE
            ids += [mid for mid, _ in batches.decode(body)]
        else:
            ids.append(properties.message_id)
    return ids


def _produce(url: str, count: int, **config) -> list[str]:
    settings = remote_config(url, timeout=10)
    settings["dataspace"]["datasource"]["config"].update(config)
    with DataSpace(settings) as space, space.producer() as producer:
        ids = [producer.insert(1, 1, f"k{n}", b"v", HEADER, METADATA) for n in range(count)]
        producer.flush(10)
    return ids


def test_a_producer_s_inserts_travel_in_batches(queues_without_worker):
    ids = _produce(queues_without_worker, 300)
    taken = _take_all(queues_without_worker, REQUEST_QUEUE, 300)
    keys = {method.routing_key for method, _, _ in taken}
    assert "batch.insert" in keys and len(taken) < 300
    assert _requests_in(taken) == ids


def test_batches_off_by_setting(queues_without_worker):
    ids = _produce(queues_without_worker, 50, batches=False)
    taken = _take_all(queues_without_worker, REQUEST_QUEUE, 50)
    assert {method.routing_key for method, _, _ in taken} == {"data.insert"}
    assert _requests_in(taken) == ids


def test_a_batch_no_queue_takes_goes_again_one_by_one(queues_without_worker, caplog):
    """Workers older than batches bind no ``batch.#``: the broker returns the batch,
    and its requests go again alone; flush reports nothing lost."""
    connection = pika.BlockingConnection(pika.URLParameters(queues_without_worker))
    connection.channel().queue_unbind(REQUEST_QUEUE, EXCHANGE, batches.BATCH_BINDING)
    connection.close()
    with caplog.at_level(logging.WARNING, logger="dataspace_client.rpc"):
        ids = _produce(queues_without_worker, 200)
    taken = _take_all(queues_without_worker, REQUEST_QUEUE, 200)
    assert {method.routing_key for method, _, _ in taken} == {"data.insert"}
    # all there; some maybe twice (sent alone before the return came, unconfirmed
    # when the channel was recycled, then again: a worker applies a message_id once)
    got = _requests_in(taken)
    assert set(got) == set(ids) and len(got) < 2 * len(ids)
    warnings = [r.getMessage() for r in caplog.records if "came back unroutable" in r.getMessage()]
    assert len(warnings) == 1, warnings


def _raw_batch(url: str, items: list[tuple[str, bytes]], **properties) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = {"content_type": BATCH_CONTENT_TYPE, "message_id": uuid.uuid4().hex}
        props.update(properties)
        key = props.pop("routing_key", "batch.insert")
        channel.basic_publish(
            EXCHANGE, key, batches.encode(items), pika.BasicProperties(**props), mandatory=True
        )
    finally:
        connection.close()


def _insert_body(tm: int, key: str, op: str = "insert") -> bytes:
    args = {
        "taskmanager_id": tm,
        "generation_id": 1,
        "key": key,
        "value": b"v",
        "header": HEADER,
        "metadata": METADATA,
    }
    return encode_request(OPERATIONS[op], args)


def test_a_worker_applies_each_item_once_and_dead_letters_a_batch_with_a_failure(
    queues_without_worker, pool_factory
):
    url = queues_without_worker
    pool_factory(url, consumers=1)
    ok = metrics.REQUESTS.labels("insert", "ok")._value
    replays = metrics.IDEMPOTENT_DUPLICATES._value
    ok_before, replays_before = ok.get(), replays.get()
    with DataSpace(remote_config(url, timeout=10)) as space:
        tm = space.store_taskmanager(f"batches-{uuid.uuid4().hex[:6]}", "B")
        good = [(uuid.uuid4().hex, _insert_body(tm, f"g{n}")) for n in range(5)]
        _raw_batch(url, good)
        _raw_batch(url, good)  # the same items again: replayed, not doubled
        bad_id = uuid.uuid4().hex
        mixed = [(uuid.uuid4().hex, _insert_body(tm, "m0")), (bad_id, b'{"v": 1, "op": "nope"}')]
        _raw_batch(url, mixed)
        found, _ = services.poll(lambda: len(space.get_datablock(tm, 1)) == 6 or None, 10)
        assert found, space.get_datablock(tm, 1)
    dead = services.drain_queue(url, "dataspace.dead", idle=2)
    assert len(dead) == 1
    properties, body = dead[0][0], dead[0][1]
    assert properties.headers["x-original-routing-key"] == "batch.insert"
    reason = properties.headers["x-dataspace-reason"]
    assert reason.startswith("1 of the batch's 2 requests failed") and bad_id in reason
    assert batches.decode(body) == mixed[1:]  # only what failed: a replay applies nothing twice
    assert ok.get() - ok_before == 11 and replays.get() - replays_before == 5  # per request


@pytest.mark.parametrize(
    "change, says",
    [
        ({"routing_key": "batch.get_schema"}, "names no operation a batch may carry"),
        ({"routing_key": "batch.store_taskmanager"}, "names no operation a batch may carry"),
        ({"content_type": "application/json"}, "content_type"),
        ({"reply_to": "amq.rabbitmq.reply-to"}, None),  # answered: bad_request, no reply body read
    ],
)
def test_a_batch_that_breaks_the_protocol_is_refused_whole(
    queues_without_worker, pool_factory, change, says
):
    url = queues_without_worker
    pool_factory(url, consumers=1)
    items = [(uuid.uuid4().hex, _insert_body(1, "k"))]
    if "reply_to" in change:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        replies = []
        channel.basic_consume(
            "amq.rabbitmq.reply-to", lambda _c, _m, _p, body: replies.append(body), auto_ack=True
        )
        channel.basic_publish(
            EXCHANGE,
            "batch.insert",
            batches.encode(items),
            pika.BasicProperties(
                content_type=BATCH_CONTENT_TYPE,
                message_id=uuid.uuid4().hex,
                reply_to="amq.rabbitmq.reply-to",
                correlation_id="c1",
            ),
        )
        deadline = time.monotonic() + 10
        while not replies and time.monotonic() < deadline:
            connection.process_data_events(0.1)
        connection.close()
        assert replies and orjson.loads(replies[0])["error"]["code"] == "bad_request"
        assert "no reply_to" in orjson.loads(replies[0])["error"]["message"]
    else:
        _raw_batch(url, items, **change)
    dead = services.drain_queue(url, "dataspace.dead", idle=2)
    assert len(dead) == 1
    assert dead[0][0].headers["x-dataspace-error-code"] == "bad_request"
    if says:
        assert says in dead[0][0].headers["x-dataspace-reason"]


def test_an_account_not_allowed_batches_sends_one_by_one(queues_without_worker, caplog):
    """An account whose topic permission predates batches (``data.insert`` but no
    ``batch.insert``): the broker closes the channel on the first batch (403); the
    client says so once, in a WARNING, and sends every request alone from then on."""
    api = Management(MANAGEMENT_URL)
    if not api.reachable():
        pytest.skip(f"the RabbitMQ management API is not reachable at {api.base}")
    vhost = pika.URLParameters(queues_without_worker).virtual_host
    user, password = f"dsbatch-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    path, quoted = quote(vhost, safe=""), quote(user, safe="")
    api.call("PUT", f"/users/{quoted}", {"password": password, "tags": ""})
    try:
        api.call(
            "PUT",
            f"/permissions/{path}/{quoted}",
            {"configure": "^$", "write": "^dataspace$", "read": "^$"},
        )
        api.call(
            "PUT",
            f"/topic-permissions/{path}/{quoted}",
            {"exchange": EXCHANGE, "write": r"^data\.insert$", "read": ".*"},
        )
        with caplog.at_level(logging.WARNING, logger="dataspace_client.rpc"):
            ids = _produce(user_url(user, password, vhost), 200)
    finally:
        api.call("DELETE", f"/users/{quoted}", ok=(204, 404))
    taken = _take_all(queues_without_worker, REQUEST_QUEUE, 200)
    assert {method.routing_key for method, _, _ in taken} == {"data.insert"}
    # all there; one maybe twice (sent alone before the refused batch, unconfirmed
    # when the channel closed, then again: a worker applies a message_id once)
    got = _requests_in(taken)
    assert set(got) == set(ids) and len(got) < 2 * len(ids)
    refusals = [r for r in caplog.records if "refused a batch" in r.getMessage()]
    assert len(refusals) == 1 and "\n" not in refusals[0].getMessage()


def test_dead_list_shows_and_finds_the_requests_of_a_batch_dead_letter():
    """``dataspace dead list --message-id`` takes the id a write method returned:
    a batch's dead letter (message_id its own) is found by the ids inside it."""
    ids = [uuid.uuid4().hex for _ in range(4)]
    body = batches.encode([(i, b'{"v": 1}') for i in ids])
    props = pika.BasicProperties(
        content_type=BATCH_CONTENT_TYPE, message_id="the-batch", type="insert", headers={}
    )
    method = pika.spec.Basic.Deliver(routing_key="batch.insert")
    entry = _dead_entry(method, props, body)
    assert entry["requests"] == ids
    assert entry["preview"].startswith("a batch of 4 requests: " + ids[0])

    class Args:
        code = operation = reason = None
        message_id = [ids[2]]

    assert _selected(entry, Args)
    Args.message_id = ["another"]
    assert not _selected(entry, Args)


def test_a_batch_delivered_again_goes_again_one_request_at_a_time(
    queues_without_worker, pool_factory, inprocess_space
):
    """A worker that took a batch and died (here: a channel closed with the batch
    unacked) leaves it redelivered: the next worker does not run it but publishes
    its requests again one by one (confirmed) and acks it then, so that a request
    that kills workers reaches the delivery limit alone, not with its batch."""
    url = queues_without_worker
    tm = inprocess_space.store_taskmanager(f"split-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex)
    items = [(uuid.uuid4().hex, _insert_body(tm, f"s{n}")) for n in range(3)]
    _raw_batch(url, items)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    method = next(channel.consume(REQUEST_QUEUE, inactivity_timeout=5))[0]
    assert method is not None and method.routing_key == "batch.insert"
    connection.close()  # the "crash": the batch goes back, marked redelivered
    split = metrics.REQUESTS.labels("insert", "split")._value
    ok = metrics.REQUESTS.labels("insert", "ok")._value
    split_before, ok_before = split.get(), ok.get()
    pool_factory(url, consumers=1)
    stored, _ = services.poll(lambda: len(inprocess_space.get_datablock(tm, 1)) == 3 or None, 15)
    assert stored, inprocess_space.get_datablock(tm, 1)
    assert split.get() - split_before == 1  # the batch: not run, split
    assert ok.get() - ok_before == 3  # its requests: each alone, as data.insert
    assert services.drain_queue(url, "dataspace.dead", idle=1) == []
    taken = _take_all(url, REQUEST_QUEUE, 0, timeout=2, idle=0.5)
    assert taken == []  # the batch was acked, nothing left behind
