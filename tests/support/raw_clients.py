"""Bare pika clients for the tests that speak the protocol by hand: ``RawClient``
publishes whatever bytes a test wants and waits for the reply, ``ReplyClient`` holds a
direct reply-to consumer and collects replies by correlation id."""

from __future__ import annotations

import time
import uuid

import orjson
import pika

from tests import services


class RawClient:
    """A bare pika client: publishes whatever bytes a test wants."""

    def __init__(self, url):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies = {}
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)

    def _on_reply(self, _ch, _method, props, body):
        self.replies[props.correlation_id] = (props, body)

    def request(self, body: bytes, routing_key=None, timeout=10.0, message_id=None):
        """Publish ``body``; by default with the routing key of the operation it names
        (the routing key decides: see test_routing_keys.py), else data.get_schema."""
        if routing_key is None:
            try:
                routing_key = "data." + str(orjson.loads(body)["op"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                routing_key = "data.get_schema"
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


class ReplyClient:
    """A client channel consuming direct reply-to, collecting replies by correlation id."""

    def __init__(self, url: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies: dict[str, bytes] = {}
        self.channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _c, _m, props, body: self.replies.__setitem__(props.correlation_id, body),
            auto_ack=True,
        )

    def address(self) -> str:
        """This channel's own reply-to address, as the broker writes it into a request."""
        queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.basic_publish(
            "", queue, b"", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to")
        )
        method = None
        while method is None:
            method, props, _ = self.channel.basic_get(queue, auto_ack=True)
        self.channel.queue_delete(queue)
        return props.reply_to

    def wait_for(self, correlation_id: str, timeout: float) -> bytes | None:
        reply, _ = services.poll(
            lambda: self.connection.process_data_events(0.05) or self.replies.get(correlation_id),
            timeout,
        )
        return reply

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
