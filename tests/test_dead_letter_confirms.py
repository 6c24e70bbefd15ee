"""Dead-letter confirms without a broker: a fake channel records what the
publisher asks (publish, ack, nack, close) and the test plays the broker's part
(confirms, nacks, returns, a closed channel)."""

from __future__ import annotations

import pika
import pika.frame
import pika.spec

from dataspace_core.protocol import DEAD_LETTER_EXCHANGE, PUBLISH_SEQ_HEADER
from dataspace_worker.dead_letters import DeadLetterPublisher
from dataspace_worker.delivery import Delivery
from dataspace_worker.dispatch import Outcome


class FakeChannel:
    """A channel that records every call made on it."""

    def __init__(self):
        self.is_open = True
        self.calls: list[tuple] = []
        self.published: list[tuple] = []
        self.connection = type("Connection", (), {"params": pika.ConnectionParameters()})()

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.calls.append(("ack", delivery_tag))

    def basic_nack(self, delivery_tag=0, multiple=False, requeue=True):
        self.calls.append(("nack", delivery_tag, requeue))

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        self.published.append((exchange, routing_key, body, properties, mandatory))

    def add_on_return_callback(self, callback):
        self.on_return = callback

    def confirm_delivery(self, ack_nack_callback):
        self.on_confirm = ack_nack_callback

    def close(self):
        self.is_open = False
        self.calls.append(("close",))


class FakeConsumer:
    def __init__(self):
        self.channel = FakeChannel()
        self.held = 0


def _delivery(consumer: FakeConsumer, tag: int, body: bytes = b"{}") -> Delivery:
    return Delivery(consumer.channel, tag, "dataspace", "data.insert", pika.BasicProperties(), body)


def _refused() -> Outcome:
    return Outcome(b"{}", "bad_request", "insert", reason="refused")


def _confirm(method) -> pika.frame.Method:
    return pika.frame.Method(1, method)


def _publisher(keep: int = 1024):
    published = []
    publisher = DeadLetterPublisher(keep, lambda: published.append(1))
    channel = FakeChannel()
    publisher.opened(channel)
    return publisher, channel, published


def test_requests_are_acked_only_when_their_dead_letters_are_confirmed():
    publisher, channel, published = _publisher()
    consumer = FakeConsumer()
    for tag in (1, 2, 3):
        publisher.publish(consumer, _delivery(consumer, tag), _refused())
    assert consumer.held == 3 and publisher.pending and len(published) == 3
    exchange, key, _, props, mandatory = channel.published[0]
    assert (exchange, key, mandatory) == (DEAD_LETTER_EXCHANGE, "data.insert", True)
    assert [p[3].headers[PUBLISH_SEQ_HEADER] for p in channel.published] == [1, 2, 3]
    assert props.headers["x-dataspace-error-code"] == "bad_request"
    assert consumer.channel.calls == []  # nothing acked before a confirm
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=2, multiple=True)))
    assert consumer.channel.calls == [("ack", 1), ("ack", 2)] and consumer.held == 1
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=3)))
    assert consumer.channel.calls[-1] == ("ack", 3) and not publisher.pending


def test_a_returned_dead_letter_requeues_its_request():
    publisher, channel, _ = _publisher()
    consumer = FakeConsumer()
    publisher.publish(consumer, _delivery(consumer, 7), _refused())
    props = channel.published[0][3]
    channel.on_return(channel, pika.spec.Basic.Return(reply_text="NO_ROUTE"), props, b"")
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=1)))
    assert consumer.channel.calls == [("nack", 7, True)]


def test_a_nacked_dead_letter_requeues_its_request_and_the_channel_is_replaced():
    publisher, channel, _ = _publisher()
    consumer = FakeConsumer()
    publisher.publish(consumer, _delivery(consumer, 4), _refused())
    channel.on_confirm(_confirm(pika.spec.Basic.Nack(delivery_tag=1)))
    assert consumer.channel.calls == [("nack", 4, True)]
    assert ("close",) in channel.calls


def test_a_closed_dead_letter_channel_requeues_what_was_not_confirmed():
    publisher, channel, _ = _publisher()
    consumer = FakeConsumer()
    publisher.publish(consumer, _delivery(consumer, 1), _refused())
    publisher.publish(consumer, _delivery(consumer, 2), _refused())
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=1)))
    publisher.closed(channel)
    assert consumer.channel.calls == [("ack", 1), ("nack", 2, True)]
    assert consumer.held == 0 and not publisher.pending
    other = FakeConsumer()
    publisher.publish(other, _delivery(other, 9), _refused())  # no channel now
    assert other.channel.calls == [("nack", 9, True)]


def test_a_confirm_for_a_request_whose_channel_closed_settles_nothing():
    publisher, channel, _ = _publisher()
    consumer = FakeConsumer()
    publisher.publish(consumer, _delivery(consumer, 1), _refused())
    consumer.channel.is_open = False  # the broker requeued it with its channel
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=1)))
    assert consumer.channel.calls == []


def test_a_long_body_is_cut_with_its_size_and_digest():
    publisher, channel, _ = _publisher(keep=10)
    consumer = FakeConsumer()
    publisher.publish(consumer, _delivery(consumer, 1, b"x" * 100), _refused())
    _, _, body, props, _ = channel.published[0]
    assert body == b"x" * 10
    assert props.headers["x-dataspace-body-size"] == 100
    assert len(props.headers["x-dataspace-body-sha256"]) == 64


# -- a batch delivered again, published again one request at a time ---------------------
def _split(n: int) -> Outcome:
    items = tuple((f"m{i}", b'{"v": 1, "op": "insert"}') for i in range(n))
    return Outcome(b"", "split", "insert", split=items)


def test_a_split_batch_is_acked_once_every_request_published_again_is_confirmed():
    publisher, channel, published = _publisher()
    consumer = FakeConsumer()
    headers = {"x-dataspace-protocol": 1, "x-delivery-count": 1, "x-death": [{"count": 1}]}
    headers["x-first-death-reason"] = "rejected"
    props = pika.BasicProperties(headers=headers, message_id="the-batch", app_id="a")
    batch = Delivery(consumer.channel, 7, "dataspace", "batch.insert", props, b"", True)
    publisher.publish_split(consumer, batch, _split(3))
    assert consumer.held == 1 and len(published) == 1
    # the batch's own headers, not what the broker added on its way back
    kept = [set(p[3].headers) for p in channel.published]
    assert kept == [{"x-dataspace-protocol", PUBLISH_SEQ_HEADER}] * 3
    assert [(p[0], p[1], p[3].message_id, p[4]) for p in channel.published] == [
        ("dataspace", "data.insert", f"m{i}", True) for i in range(3)
    ]
    assert all(p[3].delivery_mode == 2 and p[3].type == "insert" for p in channel.published)
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=1)))
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=2)))
    assert consumer.channel.calls == [] and publisher.pending
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=3)))
    assert consumer.channel.calls == [("ack", 7)] and consumer.held == 0
    assert not publisher.pending


def test_a_split_batch_with_a_request_refused_goes_back_to_the_queue_once():
    publisher, channel, _ = _publisher()
    consumer = FakeConsumer()
    publisher.publish_split(consumer, _delivery(consumer, 7), _split(3))
    channel.on_confirm(_confirm(pika.spec.Basic.Nack(delivery_tag=2, multiple=True)))
    assert consumer.channel.calls == []  # one still unconfirmed
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=3)))
    assert consumer.channel.calls == [("nack", 7, True)] and consumer.held == 0


def test_a_split_batch_whose_channel_closed_goes_back_to_the_queue_once():
    publisher, channel, _ = _publisher()
    consumer = FakeConsumer()
    publisher.publish_split(consumer, _delivery(consumer, 7), _split(3))
    channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=1)))
    publisher.closed(channel)
    assert consumer.channel.calls == [("nack", 7, True)] and consumer.held == 0
