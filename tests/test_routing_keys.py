"""The routing key decides the operation (issue 12, finding 1).

RabbitMQ's topic permissions check the routing key only, so they are the
per-operation access control if, and only if, the worker runs what the routing
key names. A body that names another operation is refused, whatever the encoding,
whichever path (the request queue or an ordering lane) it came by.
"""

from __future__ import annotations

import time
import uuid

import orjson
import pika
import pytest

from dataspace_client import DataSpace
from dataspace_core.protocol import EXCHANGE, FRAME_MAGIC, LANE_HEADER
from tests.support.configs import remote_config

pytestmark = pytest.mark.timeout(60)


class Raw:
    """A client that publishes what it likes, as an attacker's would."""

    def __init__(self, url: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies: dict[str, dict] = {}
        self.channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _ch, _m, props, body: self.replies.__setitem__(
                props.correlation_id, orjson.loads(body)
            ),
            auto_ack=True,
        )

    def call(self, routing_key: str, body: bytes, headers: dict | None = None) -> dict:
        cid = uuid.uuid4().hex
        self.channel.basic_publish(
            EXCHANGE,
            routing_key,
            body,
            pika.BasicProperties(
                reply_to="amq.rabbitmq.reply-to",
                correlation_id=cid,
                message_id=uuid.uuid4().hex,
                headers=headers,
            ),
        )
        deadline = time.monotonic() + 20
        while cid not in self.replies and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)
        return self.replies[cid]

    def close(self) -> None:
        self.connection.close()


def _framed(message: dict) -> bytes:
    text = orjson.dumps(message)
    return FRAME_MAGIC + len(text).to_bytes(4, "big") + text


@pytest.fixture
def served(own_vhost, pool_factory):
    """A worker pool with two ordering lanes on a vhost of its own, and a DataSpace."""
    pool_factory(own_vhost, lanes=2)
    space = DataSpace(remote_config(own_vhost, timeout=15))
    raw = Raw(own_vhost)
    yield own_vhost, space, raw
    raw.close()
    space.close()


@pytest.mark.parametrize("encoding", ["json", "frame"])
@pytest.mark.parametrize("routing_key", ["data.get_schema", "data.get_taskmanagers"])
def test_a_read_routing_key_cannot_carry_a_delete(served, routing_key, encoding):
    _url, space, raw = served
    name = f"kept-{uuid.uuid4().hex[:8]}"
    space.store_taskmanager(name, str(uuid.uuid4()))
    message = {"v": 1, "op": "delete_data_older_than", "args": {"days": 1e-9}}
    body = _framed(message) if encoding == "frame" else orjson.dumps(message)
    reply = raw.call(routing_key, body)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad_request"
    assert "the routing key decides the operation" in reply["error"]["message"]
    assert space.get_taskmanager(name)["name"] == name


def test_a_lane_routing_key_is_checked_too(served):
    _url, space, raw = served
    seq = space.store_taskmanager(f"lane-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
    message = {"v": 1, "op": "delete", "args": {"taskmanager_id": seq}}
    reply = raw.call("lane.get_header", orjson.dumps(message), {LANE_HEADER: str(seq)})
    assert reply["error"]["code"] == "bad_request", reply
    # the same through its own routing key is served, on a lane
    reply = raw.call("lane.delete", orjson.dumps(message), {LANE_HEADER: str(seq)})
    assert reply["ok"] is True, reply


@pytest.mark.parametrize("routing_key", ["data.no_such_op", "data.reap", "data.get_schema.x"])
def test_a_routing_key_that_names_no_operation_is_refused(served, routing_key):
    """``data.reap``: a reap goes to the reaper's queue by ``admin.reap`` only."""
    _url, _space, raw = served
    body = orjson.dumps({"v": 1, "op": "get_schema", "args": {}})
    reply = raw.call(routing_key, body)
    assert reply["error"]["code"] == "bad_request"
    assert "names no operation" in reply["error"]["message"]


def test_a_body_with_a_strange_op_is_one_refusal_not_a_traceback(served, caplog):
    _url, _space, raw = served
    caplog.set_level("WARNING")
    for op in (["x"], {"a": 1}, None, 7):
        reply = raw.call("data.get_schema", orjson.dumps({"v": 1, "op": op, "args": {}}))
        assert reply["error"]["code"] == "bad_request", reply
    assert "Traceback" not in caplog.text
    assert "unexpected error" not in caplog.text


@pytest.mark.parametrize(
    "message_id",
    [b"\xff\xfe-not-utf8", "\x1b[2Jclear", "\u202eabc"],
    ids=["invalid-utf8", "escape", "bidi"],
)
def test_a_message_id_that_is_not_short_printable_text_is_refused(served, message_id):
    """It is a write's idempotency key (SQL), and operators read it in logs and
    dead-letter listings: checked before anything uses it."""
    _url, _space, raw = served
    cid = uuid.uuid4().hex
    body = orjson.dumps(
        {
            "v": 1,
            "op": "store_taskmanager",
            "args": {"taskmanager_name": "x", "taskmanager_id": str(uuid.uuid4())},
        }
    )
    raw.channel.basic_publish(
        EXCHANGE,
        "data.store_taskmanager",
        body,
        pika.BasicProperties(
            reply_to="amq.rabbitmq.reply-to", correlation_id=cid, message_id=message_id
        ),
    )
    deadline = time.monotonic() + 20
    while cid not in raw.replies and time.monotonic() < deadline:
        raw.connection.process_data_events(time_limit=0.1)
    error = raw.replies[cid]["error"]
    assert error["code"] == "bad_request", error
    assert "message_id" in error["message"]


def test_a_correlation_id_with_control_characters_is_refused(served):
    _url, _space, raw = served
    cid = "\x1b[2J\x1b]0;pwn\x07"
    raw.channel.basic_publish(
        EXCHANGE,
        "data.get_schema",
        orjson.dumps({"v": 1, "op": "get_schema", "args": {}}),
        pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=cid),
    )
    deadline = time.monotonic() + 20
    while cid not in raw.replies and time.monotonic() < deadline:
        raw.connection.process_data_events(time_limit=0.1)
    error = raw.replies[cid]["error"]
    assert error["code"] == "bad_request" and "correlation_id" in error["message"]


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_only_the_integer_1_is_version_1(version):
    from dataspace_core.protocol import ProtocolError, decode_request

    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        decode_request(orjson.dumps({"v": version, "op": "get_schema", "args": {}}))
