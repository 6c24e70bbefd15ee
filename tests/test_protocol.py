"""The wire protocol: codec units, and what a real worker does with raw messages."""

from __future__ import annotations

import time
import uuid

import orjson
import pika
import pytest

from dataspace_client import protocol
from dataspace_client.errors import DataSpaceExistsError, DataSpaceRequestError
from dataspace_client.protocol import OPERATIONS, ProtocolError, decode_request, encode_request


def test_every_operation_is_a_datasource_method_with_the_same_parameters():
    import inspect

    from dataspace_worker.postgres import PostgresDataSource

    for name, op in OPERATIONS.items():
        params = list(inspect.signature(getattr(PostgresDataSource, name)).parameters)[1:]
        assert params == list(op.params), name


def test_request_roundtrip_keeps_bytes_exact():
    value = bytes(range(256)) * 3
    args = {
        "taskmanager_id": 1,
        "generation_id": 2,
        "key": "k",
        "value": value,
        "header": {},
        "metadata": {},
    }
    op, decoded = decode_request(encode_request(OPERATIONS["insert"], args))
    assert op.name == "insert"
    assert decoded["value"] == value


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"\x80\x03not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"v": 2, "op": "insert", "args": {}}', "unsupported protocol version 2"),
        (b'{"v": 1, "op": "drop_everything", "args": {}}', "unknown operation"),
        (b'{"v": 1, "op": "get_schema", "args": []}', "args must be a JSON object"),
        (b'{"v": 1, "op": "get_schema", "args": {"tabel": "x"}}', "unknown argument(s) tabel"),
        (
            b'{"v": 1, "op": "insert", "args": {"value": "%%%"}}',
            "invalid base64",
        ),
    ],
)
def test_malformed_requests_are_protocol_errors(body, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    assert fragment in str(info.value)
    assert info.value.code == "bad_request"


def test_error_replies_rebuild_the_exception_type():
    cases = [
        (KeyError("no product 'k'"), KeyError, "no product 'k'"),
        (ValueError("bad"), ValueError, "bad"),
        (TypeError("bad type"), TypeError, "bad type"),
        (DataSpaceExistsError("dup"), DataSpaceExistsError, "dup"),
        (ProtocolError("broken"), DataSpaceRequestError, "bad_request: broken"),
    ]
    for exc, cls, message in cases:
        with pytest.raises(cls) as info:
            protocol.decode_reply(OPERATIONS["get_schema"], protocol.encode_error(exc))
        got = info.value.args[0] if isinstance(info.value, KeyError) else str(info.value)
        assert got == message


class RawClient:
    """A bare pika client: publishes whatever bytes a test wants."""

    def __init__(self, url):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies = {}
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)

    def _on_reply(self, _ch, _method, props, body):
        self.replies[props.correlation_id] = (props, body)

    def request(self, body: bytes, routing_key="data.get_schema", timeout=10.0, message_id=None):
        cid = uuid.uuid4().hex
        self.channel.basic_publish(
            "dataspace",
            routing_key,
            body,
            pika.BasicProperties(
                reply_to="amq.rabbitmq.reply-to", correlation_id=cid, message_id=message_id
            ),
        )
        deadline = time.monotonic() + timeout
        while cid not in self.replies and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)
        return self.replies.get(cid)

    def close(self):
        self.connection.close()


@pytest.fixture
def raw(amqp_url, worker_pool):
    client = RawClient(amqp_url)
    yield client
    client.close()


def _dead_letters(url, count, timeout=10.0):
    """Consume up to ``count`` messages from dataspace.dead (a quorum queue)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    got = []
    deadline = time.monotonic() + timeout
    for method, props, body in channel.consume("dataspace.dead", inactivity_timeout=0.2):
        if method is not None:
            got.append((props, body))
            channel.basic_ack(method.delivery_tag)
        if len(got) >= count or time.monotonic() > deadline:
            break
    channel.cancel()
    connection.close()
    return got


def test_poison_message_gets_an_error_reply_and_is_dead_lettered(raw, amqp_url):
    marker = uuid.uuid4().hex.encode()
    props, body = raw.request(b"not json at all " + marker)
    reply = orjson.loads(body)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad_request"
    assert "not valid JSON" in reply["error"]["message"]
    assert props.headers["x-dataspace-outcome"] == "bad_request"
    dead = _dead_letters(amqp_url, 1)
    assert any(marker in b for _, b in dead)
    headers = next(p for p, b in dead if marker in b).headers
    assert headers["x-dataspace-error-code"] == "bad_request"
    assert "not valid JSON" in headers["x-dataspace-reason"]
    assert headers["x-original-exchange"] == "dataspace"
    assert headers["x-original-routing-key"] == "data.get_schema"


def test_missing_argument_is_a_bad_request_and_the_worker_carries_on(raw):
    _, body = raw.request(orjson.dumps({"v": 1, "op": "get_dataproduct", "args": {}}))
    reply = orjson.loads(body)
    assert reply["error"]["code"] == "bad_request"
    assert "missing a required argument" in reply["error"]["message"]
    _, body = raw.request(orjson.dumps({"v": 1, "op": "get_schema", "args": {"table": "header"}}))
    reply = orjson.loads(body)
    assert reply["ok"] is True
    assert [c["name"] for c in reply["result"]][:2] == ["id", "taskmanager_id"]


def _store(name: str) -> bytes:
    args = {"taskmanager_name": name, "taskmanager_id": "RAW", "datestamp": None}
    return orjson.dumps({"v": 1, "op": "store_taskmanager", "args": args})


def test_a_write_without_message_id_is_refused(raw):
    _, body = raw.request(_store(uuid.uuid4().hex), "data.store_taskmanager")
    reply = orjson.loads(body)
    assert reply["error"]["code"] == "bad_request"
    assert "needs a message_id" in reply["error"]["message"]


def test_a_write_sent_twice_is_applied_once_and_replays_its_reply(raw, pg_dsn):
    import psycopg2

    name = uuid.uuid4().hex
    message_id = uuid.uuid4().hex
    replies = [
        orjson.loads(raw.request(_store(name), "data.store_taskmanager", message_id=message_id)[1])
        for _ in range(3)
    ]
    assert replies[0]["ok"] is True
    assert replies[1] == replies[0] == replies[2]
    other = orjson.loads(
        raw.request(_store(name), "data.store_taskmanager", message_id=uuid.uuid4().hex)[1]
    )
    assert other["result"] != replies[0]["result"]
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM taskmanager WHERE name = %s", (name,))
        assert cur.fetchone()[0] == 2
        cur.execute("SELECT operation FROM dataspace_request WHERE message_id = %s", (message_id,))
        assert cur.fetchone()[0] == "store_taskmanager"


def test_a_message_id_reused_for_another_operation_is_refused(raw):
    message_id = uuid.uuid4().hex
    first = orjson.loads(
        raw.request(_store(uuid.uuid4().hex), "data.store_taskmanager", message_id=message_id)[1]
    )
    assert first["ok"] is True
    body = orjson.dumps({"v": 1, "op": "create_tables", "args": {}})
    reply = orjson.loads(raw.request(body, "data.create_tables", message_id=message_id)[1])
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert "already used by a store_taskmanager request" in reply["error"]["message"]
    _remove_dead_letter(raw.channel, message_id)


def _remove_dead_letter(channel, message_id: str, timeout: float = 10.0) -> None:
    """Take this test's dead letter out of the shared vhost's dataspace.dead."""
    deadline = time.monotonic() + timeout
    for method, props, _body in channel.consume("dataspace.dead", inactivity_timeout=0.5):
        if method is None:
            if time.monotonic() > deadline:
                break
            continue
        if props.message_id == message_id:
            channel.basic_ack(method.delivery_tag)
            break
        channel.basic_nack(method.delivery_tag, requeue=True)
    channel.cancel()
