"""A handled request's fate without a broker: ``settle.disposition`` for every kind
of outcome, and ``Settler`` carrying it out on fake channels that record what they
are asked (publish, ack, nack, close); the test plays the broker's and the
guard's parts."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pika
import pika.frame
import pika.spec
import pytest

from dataspace_core.protocol import DEAD_LETTER_EXCHANGE
from dataspace_worker.dead_letters import DeadLetterPublisher
from dataspace_worker.delivery import Delivery, refused_reply_to
from dataspace_worker.dispatch import Outcome
from dataspace_worker.settle import Disposition, Settler, disposition

#: a well-formed direct reply-to address (reply_addresses.py)
REPLY_TO = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABYJwAAAABrE1hc.abcdefghijklmnopqrstuv=="

OK = Outcome(b"{}", "ok", "insert")
NOT_FOUND = Outcome(b'{"error": 1}', "not_found", "get_taskmanager", reason="no such")
POISON = Outcome(b'{"error": 2}', "bad_request", "insert", reason="malformed")
UNAVAILABLE = Outcome.unavailable("insert")


class FakeChannel:
    """A channel that records every call made on it."""

    def __init__(self):
        self.is_open = True
        self.calls: list[tuple] = []
        self.consumer_tags: list[str] = []
        self._cancelled: set = set()
        self.connection = SimpleNamespace(params=pika.ConnectionParameters())

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.calls.append(("ack", delivery_tag, multiple))

    def basic_nack(self, delivery_tag=0, multiple=False, requeue=True):
        self.calls.append(("nack", delivery_tag, requeue))

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        self.calls.append(("publish", exchange, routing_key, body))

    def add_on_return_callback(self, callback):
        self.on_return = callback

    def confirm_delivery(self, ack_nack_callback):
        self.on_confirm = ack_nack_callback

    def close(self):
        self.is_open = False
        self.calls.append(("close",))


class FakeGuard:
    """The guard: routes replies as told, records what it is handed."""

    def __init__(self, route: str = "direct"):
        self.how = route
        self.put_replies: list = []
        self.pending = 0

    def route(self, _address, redelivered: bool) -> str:
        return "guard" if redelivered and self.how == "direct" else self.how

    def put(self, reply) -> None:
        self.put_replies.append(reply)


def _consumer(lane: int | None = None, inline: bool = False):
    return SimpleNamespace(channel=FakeChannel(), held=0, lane=lane, yielding=False, inline=inline)


def _delivery(consumer, tag: int, reply_to: str | None = REPLY_TO, redelivered=False):
    props = pika.BasicProperties(reply_to=reply_to, correlation_id=f"c-{tag}")
    return Delivery(consumer.channel, tag, "dataspace", "data.insert", props, b"{}", redelivered)


def _settler(route: str = "direct"):
    guard = FakeGuard(route)
    reads = []
    dead = DeadLetterPublisher(1024, lambda: None)
    dead_channel = FakeChannel()
    dead.opened(dead_channel)
    intake = SimpleNamespace(resume_reads=lambda: reads.append(1))
    settler = Settler(guard, dead, intake, lambda callback: callback() or True, threading.Lock())
    return settler, guard, dead_channel


class Handled:
    """What a database thread hands over (database_thread.Handled, without a Consumer)."""

    def __init__(self, consumer, *pairs):
        self.consumer = consumer
        self.pairs = list(pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self):
        return len(self.pairs)


def _confirm(method) -> pika.frame.Method:
    return pika.frame.Method(1, method)


# -- the disposition, for every kind of outcome --------------------------------------
def _fate(outcome, reply_to=REPLY_TO, *, lane=False, route="direct", redelivered=False, **kw):
    consumer = _consumer()
    delivery = _delivery(consumer, 1, reply_to, redelivered)
    return disposition(delivery, outcome, on_lane=lane, route=FakeGuard(route).route, **kw)


@pytest.mark.parametrize(
    ("outcome", "reply_to", "expected"),
    [
        (OK, REPLY_TO, Disposition.REPLY_AND_ACK),
        (OK, None, Disposition.ACK),  # fire-and-forget, done
        (NOT_FOUND, REPLY_TO, Disposition.REPLY_AND_ACK),  # the caller is told
        (NOT_FOUND, None, Disposition.DEAD_LETTER),  # nobody to tell: kept
        (POISON, REPLY_TO, Disposition.REPLY_AND_DEAD_LETTER),
        (POISON, None, Disposition.DEAD_LETTER),
        (UNAVAILABLE, REPLY_TO, Disposition.REQUEUE),
        (UNAVAILABLE, None, Disposition.REQUEUE),
    ],
)
def test_each_outcome_has_one_disposition(outcome, reply_to, expected):
    assert _fate(outcome, reply_to) is expected


def test_a_request_to_retry_on_a_lane_gives_the_window_back():
    assert _fate(UNAVAILABLE, lane=True) is Disposition.GIVE_BACK
    assert _fate(OK, lane=True) is Disposition.REPLY_AND_ACK


def test_a_bad_reply_to_is_dead_lettered_unanswered():
    consumer = _consumer()
    delivery = _delivery(consumer, 1, "some.queue")
    outcome = refused_reply_to(delivery)
    fate = disposition(delivery, outcome, on_lane=False, route=FakeGuard().route)
    assert fate is Disposition.DEAD_LETTER


def test_the_guard_decides_how_a_reply_goes():
    assert _fate(OK, redelivered=True) is Disposition.GUARDED_REPLY
    assert _fate(OK, route="guard") is Disposition.GUARDED_REPLY
    assert _fate(OK, route="drop") is Disposition.ACK  # node gone: acked unanswered
    assert _fate(POISON, route="drop") is Disposition.DEAD_LETTER


def test_after_the_guard_a_request_is_acked_dead_lettered_or_run_again():
    assert _fate(OK, guarded="sent") is Disposition.ACK
    assert _fate(OK, guarded="dropped") is Disposition.ACK
    assert _fate(POISON, guarded="sent") is Disposition.DEAD_LETTER
    assert _fate(OK, guarded="failed") is Disposition.REQUEUE
    assert _fate(OK, guarded="failed", lane=True) is Disposition.GIVE_BACK


def test_the_route_is_not_asked_when_there_is_no_reply_to_send():
    asked = []

    def route(address, redelivered):
        asked.append(address)
        return "direct"

    consumer = _consumer()
    for outcome, reply_to in ((UNAVAILABLE, REPLY_TO), (OK, None)):
        disposition(_delivery(consumer, 1, reply_to), outcome, on_lane=False, route=route)
    assert asked == []


# -- the Settler ---------------------------------------------------------------------
def test_replies_go_before_one_multiple_ack_for_the_batch():
    settler, _guard, _dead = _settler()
    consumer = _consumer()
    batch = Handled(consumer, *((_delivery(consumer, tag), OK) for tag in (1, 2, 3)))
    settler.settle(batch)
    calls = consumer.channel.calls
    assert [c[0] for c in calls] == ["publish", "publish", "publish", "ack"]
    assert calls[0][1:3] == ("", REPLY_TO)
    assert calls[-1] == ("ack", 3, True)


def test_a_consumer_with_reads_on_the_io_thread_acks_one_by_one():
    """Some of its deliveries run on the I/O thread (inline_reads.py), in no order
    with its database thread's batches: a multiple ack could settle one still running."""
    settler, _guard, _dead = _settler()
    consumer = _consumer(inline=True)
    settler.settle(Handled(consumer, *((_delivery(consumer, tag), OK) for tag in (2, 3))))
    acks = [c for c in consumer.channel.calls if c[0] == "ack"]
    assert acks == [("ack", 2, False), ("ack", 3, False)]


def test_a_dead_lettered_request_is_acked_only_after_the_confirm():
    settler, _guard, dead_channel = _settler()
    consumer = _consumer()
    batch = Handled(consumer, (_delivery(consumer, 1), OK), (_delivery(consumer, 2, None), POISON))
    settler.settle(batch)
    # the answered one is acked alone: the other waits for its dead letter
    assert consumer.channel.calls[-1] == ("ack", 1, False)
    assert consumer.held == 1 and not settler.settled()
    assert dead_channel.calls[0][:2] == ("publish", DEAD_LETTER_EXCHANGE)
    dead_channel.on_confirm(_confirm(pika.spec.Basic.Ack(delivery_tag=1)))
    assert consumer.channel.calls[-1] == ("ack", 2, False)
    assert consumer.held == 0 and settler.settled()


def test_a_poison_request_is_answered_and_dead_lettered():
    settler, _guard, dead_channel = _settler()
    consumer = _consumer()
    settler.settle(Handled(consumer, (_delivery(consumer, 1), POISON)))
    assert [c[0] for c in consumer.channel.calls] == ["publish"]  # the error reply, no ack
    assert len(dead_channel.calls) == 1
    dead_channel.on_confirm(_confirm(pika.spec.Basic.Nack(delivery_tag=1)))
    assert consumer.channel.calls[-1] == ("nack", 1, True)  # refused: run again


def test_a_request_to_retry_is_requeued_and_the_others_acked_one_by_one():
    settler, _guard, _dead = _settler()
    consumer = _consumer()
    batch = Handled(consumer, (_delivery(consumer, 1), OK), (_delivery(consumer, 2), UNAVAILABLE))
    settler.settle(batch)
    calls = consumer.channel.calls
    assert ("nack", 2, True) in calls and ("ack", 1, False) in calls
    assert not any(c[0] == "ack" and c[2] for c in calls)  # not a multiple ack


def test_a_lane_gives_its_window_back_after_acking_what_went_before():
    settler, _guard, _dead = _settler()
    consumer = _consumer(lane=0)
    batch = Handled(
        consumer,
        (_delivery(consumer, 1), OK),
        (_delivery(consumer, 2), UNAVAILABLE),
        (_delivery(consumer, 3), OK),
    )
    settler.settle(batch)
    calls = consumer.channel.calls
    assert calls == [
        ("publish", "", REPLY_TO, b"{}"),
        ("ack", 1, True),
        ("close",),  # the rest of the window goes back in order
    ]
    assert consumer.yielding


def test_a_guarded_reply_settles_its_request_when_the_guard_is_done():
    settler, guard, _dead = _settler()
    consumer = _consumer()
    settler.settle(Handled(consumer, (_delivery(consumer, 1, redelivered=True), OK)))
    assert consumer.channel.calls == [] and consumer.held == 1
    (reply,) = guard.put_replies
    assert reply.reply_to == REPLY_TO and reply.wanted()
    reply.done("sent")
    assert consumer.channel.calls == [("ack", 1, False)] and consumer.held == 0


def test_a_guarded_reply_unsent_while_stopping_is_run_again():
    settler, guard, _dead = _settler()
    consumer = _consumer()
    settler.settle(Handled(consumer, (_delivery(consumer, 1, redelivered=True), OK)))
    guard.put_replies[0].done("failed")
    assert consumer.channel.calls == [("nack", 1, True)]


def test_deliveries_of_a_closed_channel_are_left_to_the_broker():
    settler, _guard, _dead = _settler()
    consumer = _consumer()
    old = _delivery(consumer, 1)
    consumer.channel = FakeChannel()  # reopened: the old delivery was requeued
    settler.settle(Handled(consumer, (old, OK), (_delivery(consumer, 1), OK)))
    assert old.channel.calls == []
    assert [c[0] for c in consumer.channel.calls] == ["publish", "ack"]
    consumer.channel.is_open = False
    settler.settle(Handled(consumer, (_delivery(consumer, 2), OK)))
    assert len(consumer.channel.calls) == 2


def test_settlement_is_counted_until_it_has_run():
    ran = []
    settler, _guard, _dead = _settler()
    settler._call_soon = lambda callback: ran.append(callback) or True
    consumer = _consumer()
    settler.settle_later(Handled(consumer, (_delivery(consumer, 1), OK)))
    assert not settler.settled()
    ran[0]()
    assert settler.settled() and consumer.channel.calls[-1] == ("ack", 1, True)
    settler._call_soon = lambda callback: False  # no connection: nothing is counted
    settler.settle_later(Handled(consumer, (_delivery(consumer, 2), OK)))
    assert settler.settled()


def test_a_connection_lost_while_scheduling_leaves_no_settlement_counted():
    """The database thread counts its batch, the I/O thread loses the connection
    (and forgets every count), then scheduling fails: the count must not go below
    zero, or ``settled`` would stay false and a stop would wait out its drain."""
    settler, _guard, _dead = _settler()

    def lost_meanwhile(_callback) -> bool:
        settler.connection_lost()
        return False

    settler._call_soon = lost_meanwhile
    consumer = _consumer()
    settler.settle_later(Handled(consumer, (_delivery(consumer, 1), OK)))
    assert settler.settled()
    ran = []
    settler._call_soon = lambda callback: ran.append(callback) or True
    settler.settle_later(Handled(consumer, (_delivery(consumer, 2), OK)))
    assert not settler.settled()  # still counted once scheduled again
    ran[0]()
    assert settler.settled()
