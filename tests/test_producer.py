"""Fire-and-forget writes: ``DataSpace.producer()``, ``RpcClient.publish``/``flush``.

What is checked here is what a producer relies on: after ``flush`` (or leaving
the ``with`` block, or ``DataSpace.close``) every write is safe and is applied
exactly once, even across a lost broker connection; a write that fails on the
worker ends in ``dataspace.dead`` without stopping the ones after it; a write
the broker cannot route is reported by ``flush``, once; the window of
unconfirmed writes bounds what the client holds.
"""

from __future__ import annotations

import threading
import time
import uuid

import orjson
import pika
import pytest

from dataspace_client import DataSpace
from dataspace_client.rpc import RpcClient
from dataspace_core import batches, validate
from dataspace_core.errors import (
    DataSpaceConnectionError,
    DataSpacePublishError,
    DataSpaceTimeoutError,
)
from dataspace_core.protocol import (
    BATCH_MAGIC,
    DEAD_LETTER_QUEUE,
    OPERATIONS,
    decode_request,
    encode_request,
)
from tests import services
from tests.support.configs import inprocess_config, remote_config
from tests.support.contract import fresh, header, metadata, new_uuid, sql_rows

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------
def _value(i: int) -> bytes:
    """Distinct values, binary and of varying length."""
    return f"value {i}:".encode() + bytes([i % 256, 0, 255]) * (i % 5 + 1)


def _wait_for_block(space: DataSpace, seq: int, generation: int, count: int, within=30.0) -> dict:
    """Poll (bounded) until generation ``generation`` holds ``count`` products."""
    deadline = time.monotonic() + within
    while True:
        block = space.get_datablock(seq, generation)
        if len(block) >= count or time.monotonic() > deadline:
            return block
        time.sleep(0.1)


def _remote_space(url: str, app_id: str | None = None, timeout: float = 30) -> DataSpace:
    config = remote_config(url, timeout=timeout)
    if app_id is not None:
        config["dataspace"]["datasource"]["config"]["app_id"] = app_id
    return DataSpace(config)


def _insert_body(seq: int, generation: int, key: str, value: bytes) -> bytes:
    args = {
        "taskmanager_id": seq,
        "generation_id": generation,
        "key": key,
        "value": value,
        "header": header(),
        "metadata": metadata(),
    }
    return encode_request(OPERATIONS["insert"], validate.check("insert", args))


# -- every write arrives ------------------------------------------------------------
def test_producer_inserts_are_all_stored_with_their_values_after_flush(dataspace, backend):
    seq = dataspace.store_taskmanager(fresh("producer"), new_uuid())
    producer = dataspace.producer()
    total = 500
    ids = [
        producer.insert(seq, 1 + i % 2, f"key-{i:04d}", _value(i), header(), metadata())
        for i in range(total)
    ]
    producer.flush(30)
    assert producer.pending == 0
    if backend == "inprocess":
        assert ids == [None] * total
    else:
        assert all(isinstance(i, str) and i for i in ids)
        assert len(set(ids)) == total
    # flush means "safe in the broker": the worker applies them soon after
    blocks = {g: _wait_for_block(dataspace, seq, g, total // 2) for g in (1, 2)}
    expected = {g: {} for g in (1, 2)}
    for i in range(total):
        expected[1 + i % 2][f"key-{i:04d}"] = _value(i)
    assert blocks == expected
    # header and metadata went with each product
    assert dataspace.get_header(seq, 2, "key-0001")[4:] == tuple(header().values())
    assert dataspace.get_metadata(seq, 1, "key-0000")[4:] == tuple(metadata().values())


def _eventually(check, within: float = 20.0) -> bool:
    """Poll ``check()`` until true or ``within`` seconds passed; its last value."""
    deadline = time.monotonic() + within
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_producer_other_writes_are_applied(dataspace):
    """update, mark_expired, mark_demented, duplicate_datablock and delete through a
    producer (each waited for before the next that depends on it)."""
    seq = dataspace.store_taskmanager(fresh("producer-writes"), new_uuid())
    dataspace.insert(seq, 1, "a", b"A", header(), metadata())
    dataspace.insert(seq, 1, "b", b"B", header(), metadata())
    far = int(time.time()) + 10**6
    with dataspace.producer() as producer:
        producer.update(seq, 1, "a", b"A2", header(), metadata(state="METADATA_UPDATE"))
        producer.mark_expired(seq, 1, "b", far)
    assert _eventually(lambda: dataspace.get_dataproduct(seq, 1, "a") == b"A2")
    assert dataspace.get_metadata(seq, 1, "a")[4] == "METADATA_UPDATE"
    assert _eventually(lambda: dataspace.get_header(seq, 1, "b")[5] == far)
    with dataspace.producer() as producer:
        producer.mark_demented(seq, ["b"], 1)
    assert _eventually(lambda: dataspace.get_header(seq, 1, "b")[5] <= time.time())
    with dataspace.producer() as producer:
        producer.duplicate_datablock(seq, 1, 2)
    assert _wait_for_block(dataspace, seq, 2, 2, within=20) == {"a": b"A2", "b": b"B"}
    with dataspace.producer() as producer:
        producer.delete(seq)  # the newest generation
    assert _eventually(lambda: dataspace.get_datablock(seq, 2) == {})
    assert dataspace.get_datablock(seq, 1) == {"a": b"A2", "b": b"B"}


def test_leaving_the_with_block_flushes(dataspace, backend, monkeypatch):
    seq = dataspace.store_taskmanager(fresh("producer-with"), new_uuid())
    flushed = []
    real_flush = dataspace.datasource.flush

    def spy(timeout=None):
        real_flush(timeout)
        flushed.append(dataspace.datasource.pending)

    monkeypatch.setattr(dataspace.datasource, "flush", spy)
    with dataspace.producer() as producer:
        for i in range(300):
            producer.insert(seq, 1, f"k{i}", _value(i), header(), metadata())
        assert flushed == []
    # flushed on the way out, nothing left unconfirmed
    assert flushed == [0]
    assert producer.pending == 0
    assert len(_wait_for_block(dataspace, seq, 1, 300)) == 300

    # an error inside the block goes out as it is (not masked by the flush)
    with pytest.raises(RuntimeError, match="caller's own error"):
        with dataspace.producer() as producer:
            producer.insert(seq, 2, "x", b"x", header(), metadata())
            raise RuntimeError("caller's own error")
    producer.flush(10)
    assert _wait_for_block(dataspace, seq, 2, 1, within=20) == {"x": b"x"}


def test_close_flushes_pending_writes(backend, request, pg_dsn, amqp_url):
    """Publish many and close at once: close waits for them; a new DataSpace sees all."""
    if backend == "remote":
        request.getfixturevalue("worker_pool")
        config = remote_config(amqp_url)
    else:
        config = inprocess_config(pg_dsn)
    space = DataSpace(config)
    seq = space.store_taskmanager(fresh("producer-close"), new_uuid())
    producer = space.producer()
    total = 1000
    for i in range(total):
        producer.insert(seq, 1, f"k{i:04d}", _value(i), header(), metadata())
    client = getattr(space.datasource, "_client", None)
    space.close()
    if client is not None:  # remote: nothing was left unconfirmed when it closed
        assert client.pending == 0
    reopened = DataSpace(config)
    try:
        block = _wait_for_block(reopened, seq, 1, total)
        assert block == {f"k{i:04d}": _value(i) for i in range(total)}
    finally:
        reopened.close()


# -- a failed write goes to the dead letters, the others carry on --------------------
def test_failing_fire_and_forget_write_is_dead_lettered_and_later_writes_apply(
    own_vhost, pool_factory
):
    pool_factory(own_vhost, consumers=1)
    space = _remote_space(own_vhost, timeout=20)
    try:
        seq = space.store_taskmanager(fresh("producer-dead"), new_uuid())
        producer = space.producer()
        first = producer.insert(seq, 1, "before", b"before", header(), metadata())
        bad = producer.update(seq, 1, "no-such-key", b"x", header(), metadata())
        later = [
            producer.insert(seq, 1, f"after-{i}", b"a", header(), metadata()) for i in range(20)
        ]
        producer.flush(10)
        assert producer.pending == 0
        block = _wait_for_block(space, seq, 1, 21)
        assert block == {"before": b"before", **{f"after-{i}": b"a" for i in range(20)}}
        dead = services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=2.0, deadline=30)
        assert [props.message_id for props, _ in dead] == [bad]
        props, body = dead[0]
        reason = props.headers["x-dataspace-reason"]
        assert "no product 'no-such-key'" in reason and f"task manager {seq}" in reason
        assert props.headers["x-dataspace-error-code"] == "not_found"
        assert props.type == "update"
        op, args = decode_request(body)  # the original request, to replay
        assert (op.name, args["key"], args["value"]) == ("update", "no-such-key", b"x")
        assert bad not in [first, *later]
        # the producer goes on working after the failure
        again = producer.insert(seq, 1, "last", b"last", header(), metadata())
        producer.flush(10)
        assert again and _wait_for_block(space, seq, 1, 22)["last"] == b"last"
    finally:
        space.close()


# -- unroutable ----------------------------------------------------------------------
def test_unroutable_publish_fails_flush_once_naming_its_message_id(worker_pool, amqp_url):
    seq = None
    space = _remote_space(amqp_url)
    client = RpcClient(amqp_url, app_id="dataspace-tests-unroutable", timeout=10)
    try:
        seq = space.store_taskmanager(fresh("producer-unroutable"), new_uuid())
        lost = client.publish("insert", "nobody.is.bound.here", _insert_body(seq, 1, "lost", b"l"))
        with pytest.raises(DataSpacePublishError) as info:
            client.flush(10)
        assert len(info.value.failures) == 1
        assert lost in info.value.failures[0] and lost in str(info.value)
        assert "unroutable" in info.value.failures[0]
        assert client.pending == 0
        client.flush(5)  # reported once: a second flush has nothing to say
        # the client still works: a routable write goes through and is applied
        client.publish("insert", OPERATIONS["insert"].routing_key, _insert_body(seq, 1, "ok", b"o"))
        client.flush(10)
        assert _wait_for_block(space, seq, 1, 1) == {"ok": b"o"}
    finally:
        client.close()
        space.close()


# -- re-sent after a lost connection, applied once ------------------------------------
def test_publications_are_sent_again_after_the_connection_is_closed(
    own_vhost, pool_factory, pg_dsn
):
    pool_factory(own_vhost, consumers=2, prefetch=20)
    app_id = f"dataspace-test-{uuid.uuid4().hex[:8]}"
    space = _remote_space(own_vhost, app_id=app_id, timeout=30)
    try:
        seq = space.store_taskmanager(fresh("producer-resend"), new_uuid())
        client = space.datasource._client
        resent: list[int] = []
        on_consuming = client._on_consuming

        def count_resent(frame):
            resent.append(len(client._pending))  # what goes again on this connection
            on_consuming(frame)

        client._on_consuming = count_resent
        producer = space.producer()
        total = 3000
        ids: list[str] = []
        errors: list[BaseException] = []
        closed = threading.Event()

        def publish_all():
            try:
                for i in range(total):
                    key = f"k{i:05d}"
                    ids.append(producer.insert(seq, 1, key, _value(i), header(), metadata()))
                    if i >= 1000 and not closed.is_set():
                        time.sleep(0.002)  # slowly, until the close is done: it lands mid-way
            except BaseException as exc:  # reported below
                errors.append(exc)

        writer = threading.Thread(target=publish_all)
        writer.start()
        try:
            deadline = time.monotonic() + 20
            while len(ids) < 1000 and writer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert services.close_broker_connections(app_id) == 1
            published_when_closed = len(ids)
        finally:
            closed.set()
            writer.join(30)
        assert not errors, errors
        assert published_when_closed < total, "the connection was closed after the last publish"
        producer.flush(30)
        assert producer.pending == 0
        assert client._attempts >= 1 and resent and resent[-1] > 0, (client._attempts, resent)
        assert len(set(ids)) == total

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ((rows, keys),) = sql_rows(
                pg_dsn,
                "SELECT count(*), count(DISTINCT key) FROM dataproduct WHERE taskmanager_id = %s",
                (seq,),
            )
            if rows >= total:
                break
            time.sleep(0.1)
        assert (rows, keys) == (total, total)
        ((logged,),) = sql_rows(
            pg_dsn, "SELECT count(*) FROM dataspace_request WHERE message_id = ANY(%s)", (ids,)
        )
        assert logged == total
        dead = services.drain_queue(own_vhost, DEAD_LETTER_QUEUE, idle=1.0, deadline=30)
        assert not {p.message_id for p, _ in dead} & set(ids)
    finally:
        space.close()


# -- the window -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "window", [{"max_pending": 5}, {"max_pending_bytes": 1}], ids=["requests", "bytes"]
)
def test_a_small_window_bounds_what_is_held_and_still_delivers_everything(
    worker_pool, amqp_url, window
):
    space = _remote_space(amqp_url)
    limit = window.get("max_pending", 1)  # a byte window of 1 holds one request at a time
    try:
        seq = space.store_taskmanager(fresh("producer-window"), new_uuid())
        space.datasource._client.close()
        space.datasource._client = RpcClient(
            amqp_url, app_id="dataspace-tests-window", timeout=10, **window
        )
        producer = space.producer()
        held = []
        total = 200 if "max_pending" in window else 60
        for i in range(total):
            producer.insert(seq, 1, f"k{i:03d}", _value(i), header(), metadata())
            held.append(producer.pending)
        assert max(held) <= limit
        producer.flush(20)
        assert producer.pending == 0
        assert _wait_for_block(space, seq, 1, total) == {
            f"k{i:03d}": _value(i) for i in range(total)
        }
    finally:
        space.close()


def test_publish_waits_while_the_window_is_full_and_nothing_is_confirmed(amqp_url):
    """The only queue bound to the exchange refuses every message (max-length 0,
    reject-publish): the broker nacks each one, the client keeps them and sends them
    again, so the window stays full and ``publish`` times out. Once a queue takes
    them, the same requests (same message_ids, once each) go through."""
    name = f"dataspace-test-window-{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = admin.channel()
    channel.exchange_declare(name, "topic", auto_delete=False)
    channel.queue_declare(
        f"{name}-full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    channel.queue_bind(f"{name}-full", name, "#")
    client = RpcClient(  # one message each (no batches): the test reads them one by one
        amqp_url,
        app_id="dataspace-tests-full",
        timeout=10,
        exchange=name,
        max_pending=3,
        batches=False,
    )
    try:
        ids = [client.publish("insert", "data.insert", b'{"n": %d}' % i) for i in range(3)]
        started = time.monotonic()
        with pytest.raises(DataSpaceTimeoutError):
            client.publish("insert", "data.insert", b'{"n": 3}', timeout=1.0)
        assert time.monotonic() - started >= 0.9
        assert client.pending == 3
        with pytest.raises(DataSpaceTimeoutError, match="3 requests not yet confirmed"):
            client.flush(0.5)
        assert client.pending == 3  # still held, still being sent
        # make room: a queue that takes them, and the refusing one gone
        channel.queue_declare(f"{name}-open")
        channel.queue_bind(f"{name}-open", name, "#")
        channel.queue_delete(f"{name}-full")
        client.flush(10)
        assert client.pending == 0
        received = services.drain_queue(amqp_url, f"{name}-open", idle=1.0, deadline=30)
        assert [p.message_id for p, _ in received] == ids
        assert [orjson.loads(b)["n"] for _, b in received] == [0, 1, 2]
    finally:
        client.close()
        channel.queue_delete(f"{name}-open")
        channel.queue_delete(f"{name}-full")
        channel.exchange_delete(name)
        admin.close()


# -- known bugs -------------------------------------------------------------------------------
@pytest.fixture
def refusing_exchange(amqp_url):
    """An exchange of its own on the run's vhost; ``refuse()`` binds a queue that
    refuses every message (the broker nacks each), else nothing is bound (unroutable)."""
    name = f"dataspace-test-x-{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = admin.channel()
    channel.exchange_declare(name, "topic")

    def refuse():
        channel.queue_declare(name, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        channel.queue_bind(name, name, "#")

    try:
        yield name, refuse
    finally:
        channel.queue_delete(name)
        channel.exchange_delete(name)
        admin.close()


def test_close_reports_writes_refused_as_unroutable(amqp_url, refusing_exchange):
    exchange, _refuse = refusing_exchange  # nothing bound: every publish comes back
    space = _remote_space(amqp_url, timeout=5)
    space.datasource._client.close()
    space.datasource._client = client = RpcClient(
        amqp_url, app_id="dataspace-tests-close", timeout=5, exchange=exchange
    )
    lost = space.producer().insert(1, 1, "k", b"v", header(), metadata())
    deadline = time.monotonic() + 5
    while client.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.pending == 0  # returned by the broker: dropped, kept as a failure
    with pytest.raises(DataSpacePublishError, match=lost):
        space.close()


def test_flush_does_not_report_success_when_the_client_closes_with_writes_pending(
    amqp_url, refusing_exchange
):
    exchange, refuse = refusing_exchange
    refuse()  # nacked forever: it stays pending
    client = RpcClient(amqp_url, app_id="dataspace-tests-flush", timeout=5, exchange=exchange)
    client.publish("insert", "data.insert", b'{"n": 0}')
    outcome = {}

    def flush():
        try:
            client.flush(5)
            outcome["flush"] = "returned"
        except Exception as exc:  # the assertion below says which
            outcome["flush"] = exc

    flusher = threading.Thread(target=flush)
    flusher.start()
    time.sleep(0.3)
    client.close()
    flusher.join(10)
    assert client.pending == 1
    assert isinstance(outcome["flush"], Exception), "flush said every write was safe"


def _publish_aside(client: RpcClient, body: bytes, outcome: dict) -> threading.Thread:
    """Publish ``body`` from another thread (started); ``outcome["publish"]`` becomes
    its message_id or the error it raised."""

    def publish():
        try:
            outcome["publish"] = client.publish("insert", "data.insert", body)
        except Exception as exc:  # the caller's assertion says which
            outcome["publish"] = exc

    thread = threading.Thread(target=publish)
    thread.start()
    return thread


def test_no_write_slips_in_between_the_closing_flush_and_the_close(
    worker_pool, amqp_url, monkeypatch
):
    """Another thread holding the client publishes while ``close()`` runs. Whatever
    publish accepted must be covered by the closing flush: a write accepted after it
    would be closed away unconfirmed with its message_id already returned."""
    space = _remote_space(amqp_url, timeout=5)
    client = space.datasource._client
    raced: dict = {}
    original = RpcClient.unsettled

    def racing_unsettled(self):
        answer = original.fget(self)
        if not raced:  # just after close() decided whether to flush
            _publish_aside(self, b'{"late": 1}', raced).join(5)
        return answer

    monkeypatch.setattr(RpcClient, "unsettled", property(racing_unsettled))
    space.close()
    assert "publish" in raced
    outcome = raced["publish"]
    if isinstance(outcome, str):  # accepted: then the flush must have covered it
        assert client.pending == 0, f"write {outcome} accepted, then closed unconfirmed"
    else:
        assert isinstance(outcome, DataSpaceConnectionError), outcome


def test_stop_publishing_releases_a_publisher_waiting_for_room(amqp_url, refusing_exchange):
    exchange, refuse = refusing_exchange
    refuse()  # nacked forever: the window stays full
    client = RpcClient(
        amqp_url, app_id="dataspace-tests-stop", timeout=10, exchange=exchange, max_pending=1
    )
    try:
        client.publish("insert", "data.insert", b'{"n": 0}')
        outcome: dict = {}
        waiter = _publish_aside(client, b'{"n": 1}', outcome)
        time.sleep(0.3)
        assert "publish" not in outcome  # waiting for room
        client.stop_publishing()
        waiter.join(5)
        assert isinstance(outcome.get("publish"), DataSpaceConnectionError)
        with pytest.raises(DataSpaceConnectionError, match="closed"):
            client.publish("insert", "data.insert", b'{"n": 2}')
        assert client.pending == 1  # what it accepted stays, for the flush to cover
    finally:
        client.close()


def test_a_call_after_fire_and_forget_requests_goes_out_behind_them(own_vhost):
    """A call's request may leave from the caller's own thread while the client's
    I/O thread waits (io_lock.py); it must still go behind what the same thread
    published fire-and-forget before it (a read after one's own writes takes the
    same lane behind them). 40 rounds of publish-then-call; a consumer takes them
    in the order the broker got them (the calls expire with their 20 ms wait)."""
    exchange, queue = f"order-{uuid.uuid4().hex[:8]}", f"order-{uuid.uuid4().hex[:8]}"
    got: list[str] = []
    ready, stop = threading.Event(), threading.Event()

    def consume() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic")
        channel.queue_declare(queue, exclusive=True)
        channel.queue_bind(queue, exchange, "#")

        def take(_c, _m, _p, body: bytes) -> None:  # a batch: its requests, in order
            if body.startswith(BATCH_MAGIC):
                got.extend(item.decode() for _, item in batches.decode(body))
            else:
                got.append(body.decode())

        channel.basic_consume(queue, take, True)
        ready.set()
        while not stop.is_set():
            connection.process_data_events(time_limit=0.05)
        connection.close()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert ready.wait(10)
    client = RpcClient(own_vhost, app_id="dataspace-tests-order", timeout=5, no_worker_check=60)
    try:
        for i in range(40):
            for k in range(3):
                client.publish("insert", "data.insert", f"ff-{i}-{k}".encode(), exchange=exchange)
            with pytest.raises(DataSpaceTimeoutError):  # nobody answers here
                client.call(
                    "get_schema", "data.get_schema", f"call-{i}".encode(), 0.02, exchange=exchange
                )
        client.flush(10)
        services.poll(lambda: len(got) == 160, 10)
    finally:
        client.close()
        stop.set()
        consumer.join(10)
    assert len(got) == 160, got
    for i in range(40):  # each call behind the three published before it
        at = got.index(f"call-{i}")
        assert {f"ff-{i}-{k}" for k in range(3)} <= set(got[:at]), got[max(0, at - 6) : at + 1]
