"""The pool's intake decisions without a broker: a fake channel and a fake
connection record what ``Intake`` asks of them (bytes in hand, pausing, the
prefetch wanted, holding the socket's reads)."""

from __future__ import annotations

import pika
import pika.frame

from dataspace_worker.intake import Intake

MIB = 1024 * 1024


class FakeChannel:
    """Records settlements; a content assembler whose ``process`` passes frames on."""

    def __init__(self):
        self.settled: list[tuple] = []
        self._content_assembler = type("Assembler", (), {"process": lambda _self, f: f})()

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.settled.append(("ack", delivery_tag, multiple))

    def basic_nack(self, delivery_tag=0, multiple=False, requeue=True):
        self.settled.append(("nack", delivery_tag, multiple))

    def basic_reject(self, delivery_tag=0, requeue=True):
        self.settled.append(("reject", delivery_tag))


class _AsyncPlaintextTransport:  # named as pika's: only a plain transport is held
    _STATE_ACTIVE = 1

    def __init__(self):
        self._state = self._STATE_ACTIVE
        self.readers: list[tuple] = []
        self._nbio = self
        self._sock = self

    def fileno(self):
        return 7

    def remove_reader(self, fd):
        self.readers.append(("remove", fd))

    def set_reader(self, fd, callback):
        self.readers.append(("set", fd))

    def _on_socket_readable(self):
        pass


class FakeConnection:
    is_open = True

    def __init__(self, heartbeat: int = 60):
        self._transport = _AsyncPlaintextTransport()
        self.ioloop = self
        self.params = pika.ConnectionParameters(heartbeat=heartbeat)
        self.later: list[float] = []
        self.callbacks: list = []

    def call_later(self, delay, callback):
        self.later.append(delay)
        self.callbacks.append(callback)


def _intake(bound=10 * MIB, large=4 * MIB, confirms=lambda: False, stopping=lambda: False):
    calls = []
    intake = Intake(bound, large, lambda: calls.append("resubscribe"), confirms, stopping)
    connection = FakeConnection(heartbeat=8)
    intake.opened(connection)
    return intake, calls, connection


def _header(size: int) -> pika.frame.Header:
    return pika.frame.Header(1, size, pika.BasicProperties())


def test_a_new_connection_probes_with_prefetch_1_until_a_small_delivery():
    intake, calls, _ = _intake()
    channel = FakeChannel()
    intake.track(channel)
    assert intake.wanted_prefetch(16) == 1
    intake.took(channel, 1, 100)
    assert intake.wanted_prefetch(16) == 16 and calls == ["resubscribe"]


def test_a_large_delivery_keeps_the_prefetch_at_1_for_a_while():
    intake, calls, connection = _intake()
    channel = FakeChannel()
    intake.took(channel, 1, 100)  # probing over
    intake.took(channel, 2, 5 * MIB)
    assert intake.wanted_prefetch(16) == 1
    assert connection.later == [5.0]  # back up once the care is over
    assert calls == ["resubscribe", "resubscribe"]


def test_a_redelivered_request_keeps_the_prefetch_at_1_for_a_while():
    """After a worker died holding a window: one at a time, so that a request that
    kills workers spends its own deliveries only, not those of the ones beside it."""
    intake, calls, connection = _intake()
    channel = FakeChannel()
    intake.took(channel, 1, 100, redelivered=True)  # the first after a crash: stays at 1
    assert intake.wanted_prefetch(128) == 1 and not intake.probing
    assert connection.later == [5.0]  # back up once the care is over
    intake.took(channel, 2, 100, redelivered=True)  # prolongs the care, no new timer
    assert intake.wanted_prefetch(128) == 1 and connection.later == [5.0]
    intake.careful_until = 0.0  # the care is over: a first delivery of the window
    intake.took(channel, 3, 100)
    assert intake.wanted_prefetch(128) == 128


def test_a_redelivered_request_lowers_a_full_window_to_1():
    intake, calls, connection = _intake()
    channel = FakeChannel()
    intake.took(channel, 1, 100)  # probing over: full windows
    assert intake.wanted_prefetch(128) == 128 and calls == ["resubscribe"]
    intake.took(channel, 2, 100, redelivered=True)
    assert intake.wanted_prefetch(128) == 1 and calls == ["resubscribe", "resubscribe"]
    for callback in connection.callbacks:  # CAREFUL_FOR later, nothing else came
        intake.careful_until = 0.0
        callback()
    assert intake.wanted_prefetch(128) == 128 and calls[-1] == "resubscribe"


def test_over_the_bound_it_pauses_and_takes_again_at_half():
    intake, calls, _ = _intake(bound=10 * MIB, large=100 * MIB)
    channel = FakeChannel()
    intake.track(channel)
    for tag in range(1, 7):
        intake.took(channel, tag, 2 * MIB)
    assert intake.paused and intake.wanted_prefetch(16) is None
    assert intake.ledger.total == 12 * MIB
    channel.basic_ack(3, multiple=True)  # 6 MiB left: over half of the bound
    assert intake.paused
    channel.basic_nack(4)  # 4 MiB left
    assert not intake.paused and intake.wanted_prefetch(16) == 16
    assert channel.settled == [("ack", 3, True), ("nack", 4, False)]
    assert calls.count("resubscribe") == 3  # probing over, paused, taking again


def test_a_closed_channel_gives_back_what_it_held():
    intake, _, _ = _intake(bound=10 * MIB, large=100 * MIB)
    channel, other = FakeChannel(), FakeChannel()
    intake.took(channel, 1, 3 * MIB)
    intake.took(other, 1, 1 * MIB)
    intake.channel_closed(channel)
    assert intake.ledger.total == 1 * MIB


def test_a_header_over_the_bound_holds_the_reads_until_its_body_fits():
    intake, _, connection = _intake(bound=10 * MIB, large=4 * MIB)
    channel = FakeChannel()
    intake.track(channel)
    intake.watch_headers(channel)
    process = channel._content_assembler.process
    intake.took(channel, 1, 6 * MIB)
    process(_header(6 * MIB))  # 12 MiB would be in hand: the body stays in the broker
    assert intake.reads_held_for == 6 * MIB
    assert connection._transport.readers == [("remove", 7)]
    channel.basic_ack(1)
    assert intake.reads_held_for is None
    assert connection._transport.readers == [("remove", 7), ("set", 7)]


def test_reads_are_not_held_while_a_dead_letter_awaits_its_confirm():
    intake, _, connection = _intake(bound=10 * MIB, large=4 * MIB, confirms=lambda: True)
    channel = FakeChannel()
    intake.watch_headers(channel)
    intake.took(channel, 1, 8 * MIB)
    channel._content_assembler.process(_header(8 * MIB))
    assert intake.reads_held_for is None and connection._transport.readers == []


def test_a_body_larger_than_the_bound_is_read_once_nothing_else_is_in_hand():
    intake, _, connection = _intake(bound=10 * MIB, large=4 * MIB)
    channel = FakeChannel()
    intake.track(channel)
    intake.watch_headers(channel)
    intake.took(channel, 1, 1 * MIB)
    channel._content_assembler.process(_header(20 * MIB))
    assert intake.reads_held_for == 20 * MIB
    channel.basic_ack(1)
    assert intake.reads_held_for is None  # else it would never be read


def test_a_lost_connection_forgets_everything():
    intake, _, _ = _intake(bound=10 * MIB, large=100 * MIB)
    channel = FakeChannel()
    for tag in range(1, 7):
        intake.took(channel, tag, 2 * MIB)
    intake.lost()
    assert intake.ledger.total == 0 and not intake.paused and intake.reads_held_for is None


def test_with_nothing_in_hand_a_body_over_the_bound_is_read_at_once():
    """No settlement would ever end that hold: the worker would stall until pika
    gave the connection up for its heartbeats, again and again."""
    intake, _, connection = _intake(bound=10 * MIB, large=4 * MIB)
    channel = FakeChannel()
    intake.watch_headers(channel)
    channel._content_assembler.process(_header(20 * MIB))
    assert intake.reads_held_for is None and connection._transport.readers == []


def test_a_hold_lasts_half_a_heartbeat_at_most_then_reads_go_on_until_a_settlement():
    intake, _, connection = _intake(bound=10 * MIB, large=4 * MIB)
    channel = FakeChannel()
    intake.track(channel)
    intake.watch_headers(channel)
    intake.took(channel, 1, 8 * MIB)
    channel._content_assembler.process(_header(8 * MIB))
    assert intake.reads_held_for == 8 * MIB and 4.0 in connection.later  # heartbeat 8 s
    connection.callbacks[connection.later.index(4.0)]()  # the request in hand is stuck
    assert intake.reads_held_for is None
    intake.took(channel, 2, 8 * MIB)
    channel._content_assembler.process(_header(8 * MIB))
    assert intake.reads_held_for is None  # not again before a settlement
    channel.basic_ack(1)
    channel._content_assembler.process(_header(8 * MIB))
    assert intake.reads_held_for == 8 * MIB


def test_no_hold_while_stopping():
    intake, _, connection = _intake(bound=10 * MIB, large=4 * MIB, stopping=lambda: True)
    channel = FakeChannel()
    intake.watch_headers(channel)
    intake.took(channel, 1, 8 * MIB)
    channel._content_assembler.process(_header(8 * MIB))
    assert intake.reads_held_for is None
