"""The wire protocol: codec units, and what a real worker does with raw messages."""

from __future__ import annotations

import base64
import time
import uuid

import orjson
import pika
import pytest

from dataspace_core import protocol
from dataspace_core.errors import DataSpaceExistsError, DataSpaceRequestError
from dataspace_core.protocol import OPERATIONS, ProtocolError, decode_request, encode_request
from tests.support.raw_clients import RawClient


def test_every_operation_is_a_datasource_method_with_the_same_parameters():
    import inspect

    from dataspace_worker.postgres import PostgresDataSource

    # store_taskmanager takes the name as the engine's datasources do (name=, with
    # taskmanager_name= as a keyword-only alias); on the wire it is taskmanager_name.
    wire_name = {("store_taskmanager", "name"): "taskmanager_name"}
    for name, op in OPERATIONS.items():
        signature = inspect.signature(getattr(PostgresDataSource, name)).parameters.values()
        params = [p.name for p in signature if p.kind is p.POSITIONAL_OR_KEYWORD][1:]
        assert [wire_name.get((name, p), p) for p in params] == list(op.params), name


def test_request_roundtrip_keeps_bytes_exact():
    value = bytes(range(256)) * 3
    op, decoded = decode_request(encode_request(OPERATIONS["insert"], _insert_args(value)))
    assert op.name == "insert"
    assert decoded["value"] == value


def _insert_args(value: bytes) -> dict:
    return {
        "taskmanager_id": 1,
        "generation_id": 2,
        "key": "k",
        "value": value,
        "header": {},
        "metadata": {},
    }


def test_bytes_travel_raw_in_a_frame_after_the_json():
    value = b"\x00\xff" * 1000
    body = encode_request(OPERATIONS["insert"], _insert_args(value))
    assert body.startswith(protocol.FRAME_MAGIC)
    assert protocol.content_type(body) == protocol.FRAME_CONTENT_TYPE
    assert body.endswith(value)  # not base64: the value as it is
    assert len(body) < len(value) + 300
    length = int.from_bytes(body[5:9], "big")
    document = orjson.loads(body[9 : 9 + length])
    assert document["args"]["value"] == {"$blob": [0, len(value)]}


def test_a_body_without_bytes_stays_plain_json():
    body = encode_request(OPERATIONS["get_schema"], {"table": None})
    assert orjson.loads(body)["op"] == "get_schema"
    assert protocol.content_type(body) == protocol.CONTENT_TYPE


def test_base64_values_from_earlier_clients_are_still_accepted():
    body = orjson.dumps({"v": 1, "op": "insert", "args": {**_insert_args(b""), "value": "AAE="}})
    assert decode_request(body)[1]["value"] == b"\x00\x01"
    reply = orjson.dumps({"v": 1, "ok": True, "result": "AAE="})
    assert protocol.decode_reply(OPERATIONS["get_dataproduct"], reply) == b"\x00\x01"


@pytest.mark.parametrize(
    "result",
    [b"", b"\x00" * 70_000, {"a": b"1", "b": b"", "c": b"\x00dsf1"}],
    ids=["empty", "large", "block"],
)
def test_replies_with_bytes_roundtrip(result):
    name = "get_datablock" if isinstance(result, dict) else "get_dataproduct"
    body = protocol.encode_result(OPERATIONS[name], result)
    assert protocol.decode_reply(OPERATIONS[name], body) == result


def test_get_dataproducts_values_roundtrip_in_order():
    products = [
        {"taskmanager_id": 1, "generation_id": g, "key": f"k{g}", "value": bytes([g]) * g}
        for g in range(5)
    ]
    op = OPERATIONS["get_dataproducts"]
    assert protocol.decode_reply(op, protocol.encode_result(op, products)) == products


def _frame(document: bytes, tail: bytes = b"", length: int | None = None) -> bytes:
    size = len(document) if length is None else length
    return protocol.FRAME_MAGIC + size.to_bytes(4, "big") + document + tail


_ARGS = b'"taskmanager_id": 1, "generation_id": 2, "key": "k", "header": {}, "metadata": {}'


@pytest.mark.parametrize(
    "body, fragment",
    [
        (_frame(b'{"v": 1}', length=500), "frame shorter than its JSON length"),
        (protocol.FRAME_MAGIC + b"\x00\x00", "not valid JSON"),
        (
            _frame(
                b'{"v": 1, "op": "insert", "args": {"value": {"$blob": [0, 9]}, ' + _ARGS + b"}}",
                b"abc",
            ),
            "value reference",
        ),
        (
            _frame(b'{"v": 1, "op": "insert", "args": {"value": {"$blob": [-1, 1]}}}', b"a"),
            "value reference",
        ),
        (
            _frame(b'{"v": 1, "op": "insert", "args": {"value": {"$blob": [0]}}}', b"a"),
            "value reference",
        ),
        (
            _frame(b'{"v": 1, "op": "insert", "args": {"value": {"$blob": [0, 1.5]}}}', b"a"),
            "value reference",
        ),
        (_frame(b'{"v": 1, "op": "insert", "args": {"value": 7}}', b"a"), "value reference"),
    ],
    ids=["short", "truncated-head", "past-the-end", "negative", "one-number", "float", "number"],
)
def test_malformed_frames_are_protocol_errors(body, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    assert fragment in str(info.value)


def test_a_malformed_framed_reply_is_a_dataspace_error_not_a_crash():
    from dataspace_core.errors import DataSpaceError

    body = _frame(b'{"v": 1, "ok": true, "result": {"$blob": [0, 10]}}', b"abc")
    with pytest.raises(DataSpaceError, match="malformed reply"):
        protocol.decode_reply(OPERATIONS["get_dataproduct"], body)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"\x80\x03not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"v": 2, "op": "insert", "args": {}}', "unsupported protocol version 2"),
        (b'{"op": "insert", "args": {}}', 'no protocol version ("v": 1)'),
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


def test_a_sender_that_does_not_read_frames_gets_base64_json_from_a_worker(raw, remote_space):
    """A client from before frames (no x-dataspace-frames header) can still read values:
    the worker answers it in plain JSON with base64, and a framed client gets a frame."""
    tm = remote_space.store_taskmanager(f"old-client-{uuid.uuid4().hex[:8]}", "OLD")
    value = b"\x00\xff" * 200
    remote_space.insert(
        tm,
        1,
        "k",
        value,
        {
            "create_time": 1,
            "expiration_time": 2,
            "scheduled_create_time": 1,
            "creator": "c",
            "schema_id": None,
        },
        {"state": "NEW", "generation_time": 1, "missed_update_count": 0},
    )
    body = orjson.dumps(
        {
            "v": 1,
            "op": "get_dataproduct",
            "args": {"taskmanager_id": tm, "generation_id": 1, "key": "k"},
        }
    )
    props, reply = raw.request(body, "data.get_dataproduct")
    assert props.content_type == protocol.CONTENT_TYPE
    assert base64.b64decode(orjson.loads(reply)["result"]) == value
    assert remote_space.get_dataproduct(tm, 1, "k") == value  # framed, through the client


def test_encode_result_without_frames_is_plain_json():
    op = OPERATIONS["get_datablock"]
    body = protocol.encode_result(op, {"a": b"\x01"}, frames=False)
    assert orjson.loads(body)["result"] == {"a": "AQ=="}
    assert protocol.decode_reply(op, body) == {"a": b"\x01"}
