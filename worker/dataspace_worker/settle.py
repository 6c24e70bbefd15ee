"""A handled request's fate, decided in one place, and the part that carries it out.

``disposition`` looks at a delivery and its outcome (and, for a reply, at what the
guard knows of the caller's node) and says what becomes of the request: answered
and acked, acked unanswered, dead-lettered (answered first or not), answered
through the guard, requeued, or, on an ordering lane, given back with its lane's
whole window. ``Settler`` does it, on the I/O thread:

- a reply needs no confirm: it is transient, and the ack that follows it on the
  same channel reaches the broker after it; a batch whose requests are all acked
  here, with no earlier one of the channel waiting, gets one ``multiple`` ack
  (not on a channel some of whose reads run on the I/O thread);
- a dead-lettered request is acked once the broker confirmed its dead letter
  (``DeadLetterPublisher``), requeued if the broker refused it; so is a batch
  delivered again, once the broker confirmed each of its requests published
  again alone;
- a reply through the guard (guarded_replies.py: RabbitMQ 3.10 crashes the
  connection that replies to a client of a node that is down) settles its
  request when the guard is done with it;
- a delivery from a channel that has since closed is left alone: the broker
  requeued it when the channel closed.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from dataspace_core.amqp.patches import close_without_cancel

from .dead_letters import DeadLetterPublisher
from .delivery import Delivery, reply_properties
from .dispatch import Outcome
from .guarded_replies import GuardedReplies, GuardedReply, Result, Route
from .intake import Intake
from .reply_addresses import ReplyAddress

if TYPE_CHECKING:
    from .database_thread import Consumer, Handled


class Disposition(enum.Enum):
    """What becomes of a handled request."""

    #: answered on the consumer's channel, then acked
    REPLY_AND_ACK = "reply and ack"
    #: acked unanswered: no ``reply_to``, or the caller's node is known to be gone
    ACK = "ack"
    #: answered on the consumer's channel with its error, then dead-lettered
    REPLY_AND_DEAD_LETTER = "reply and dead-letter"
    #: dead-lettered unanswered; acked once the broker confirmed the dead letter
    DEAD_LETTER = "dead-letter"
    #: answered on the guard's connection; settled when the guard is done with it
    GUARDED_REPLY = "guarded reply"
    #: the store was unavailable: back to the queue, to be tried again
    REQUEUE = "requeue"
    #: the same on an ordering lane: the lane's whole unacked window goes back, in
    #: order (a requeued request would come back after later ones of its lane)
    GIVE_BACK = "give back"
    #: a batch delivered again: its requests published again one by one, confirmed;
    #: acked once the broker has them all (batch_requests.split)
    SPLIT = "split"

    @property
    def replies(self) -> bool:
        """Whether a reply goes out on the consumer's channel."""
        return self in (Disposition.REPLY_AND_ACK, Disposition.REPLY_AND_DEAD_LETTER)

    @property
    def dead_letters(self) -> bool:
        return self in (Disposition.DEAD_LETTER, Disposition.REPLY_AND_DEAD_LETTER)


def reply_address(delivery: Delivery) -> ReplyAddress | None:
    """Where a reply may go: a direct reply-to address, or None (no ``reply_to``, or
    one refused before the request ran: it gets no reply anywhere)."""
    address = delivery.reply_address
    return address if isinstance(address, ReplyAddress) else None


def is_dead_letter(delivery: Delivery, outcome: Outcome) -> bool:
    """Whether the request is kept in the dead-letter queue: a malformed one, or one
    that failed for good and whose sender cannot be told (no reply address)."""
    address = reply_address(delivery)
    return outcome.dead_letter(address.address if address else None)


def disposition(
    delivery: Delivery,
    outcome: Outcome,
    *,
    on_lane: bool,
    route: Callable[[ReplyAddress, bool], Route],
    guarded: Result | None = None,
) -> Disposition:
    """The one place that decides a handled request's fate.

    ``on_lane``: it came from an ordering lane. ``route``: how a reply to an address
    goes out (``GuardedReplies.route``: "direct", "guard" or "drop"); asked only
    when there is a reply to send (it counts and logs the replies it drops).
    ``guarded``: the guard's result, when the reply went through the guard already.
    """
    if outcome.split:
        return Disposition.SPLIT
    if outcome.retry or guarded == "failed":  # a reply unsent while stopping: run again
        return Disposition.GIVE_BACK if on_lane else Disposition.REQUEUE
    dead = is_dead_letter(delivery, outcome)
    address = reply_address(delivery)
    how = "drop" if guarded is not None or address is None else route(address, delivery.redelivered)
    if how == "guard":
        return Disposition.GUARDED_REPLY
    if how == "direct":
        return Disposition.REPLY_AND_DEAD_LETTER if dead else Disposition.REPLY_AND_ACK
    return Disposition.DEAD_LETTER if dead else Disposition.ACK


class Settler:
    """Carries out each handled request's disposition (I/O thread, except
    ``settle_later`` and ``settled``)."""

    def __init__(
        self,
        guard: GuardedReplies,
        dead_letters: DeadLetterPublisher,
        intake: Intake,
        call_soon: Callable[[Callable[[], None]], bool],
        lock: threading.Lock,
    ):
        """``call_soon`` runs a callback on the I/O thread (False when the connection
        is gone); ``lock`` guards the count of settlements scheduled and not run."""
        self.guard = guard
        self.dead_letters = dead_letters
        self._intake = intake
        self._call_soon = call_soon
        self._lock = lock
        self._scheduled = 0  # settling callbacks scheduled on the I/O thread, not yet run

    # -- any thread ---------------------------------------------------------------
    def settle_later(self, handled: Handled) -> None:
        """Hand a database thread's batch to the I/O thread to be settled."""
        self._schedule(partial(self.settle, handled))

    def _schedule(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (which publishes or acks) on the I/O thread, counted
        until it has run (see ``settled``)."""
        with self._lock:
            self._scheduled += 1

        def run():
            try:
                callback()
            finally:
                self._done_scheduling()

        if not self._call_soon(run):  # no connection: the broker redelivers it
            self._done_scheduling()

    def _done_scheduling(self) -> None:
        """One scheduled callback ran or could not be scheduled. Never below zero: a
        connection lost between the count and the scheduling reset it already
        (``connection_lost``), and a count of -1 would keep ``settled`` false until
        the drain timed out."""
        with self._lock:
            self._scheduled = max(0, self._scheduled - 1)

    def settled(self) -> bool:
        """Every reply published, every dead letter confirmed, every ack sent."""
        if self.guard.pending:  # first: a guarded reply's settling is scheduled
            return False  # (``_scheduled`` goes up) before it stops being pending
        with self._lock:
            if self._scheduled:
                return False
        return not self.dead_letters.pending

    def connection_lost(self) -> None:
        """What was scheduled on the lost connection's loop will never run (the
        broker requeued those deliveries)."""
        with self._lock:
            self._scheduled = 0

    # -- I/O thread -----------------------------------------------------------------
    def settle(self, handled: Handled) -> None:
        """Carry out the disposition of each request of a handled batch, in order."""
        consumer = handled.consumer
        channel = consumer.channel
        if channel is None or not channel.is_open:
            return  # the broker requeued them when their channel closed
        ackable: list[int] = []
        for delivery, outcome in handled:
            if delivery.channel is not channel:
                continue  # from a channel since closed: requeued already
            fate = disposition(
                delivery, outcome, on_lane=consumer.lane is not None, route=self.guard.route
            )
            if fate is Disposition.GIVE_BACK:
                # what is settled already goes first; the rest returns with the window
                self._ack(consumer, channel, ackable, len(ackable))
                self._give_back_lane(consumer, channel)
                return
            if fate is Disposition.REQUEUE:
                channel.basic_nack(delivery.tag, requeue=True)
            elif fate is Disposition.SPLIT:
                self.dead_letters.publish_split(consumer, delivery, outcome)
            elif fate is Disposition.GUARDED_REPLY:
                self._reply_guarded(consumer, delivery, outcome)
            else:
                if fate.replies:  # direct reply-to replies must not be mandatory on 3.x
                    address = reply_address(delivery).address
                    channel.basic_publish(
                        "", address, outcome.body, reply_properties(delivery, outcome)
                    )
                if fate.dead_letters:
                    self.dead_letters.publish(consumer, delivery, outcome)
                else:
                    ackable.append(delivery.tag)
        self._ack(consumer, channel, ackable, len(handled))

    def _reply_guarded(self, consumer: Consumer, delivery: Delivery, outcome: Outcome) -> None:
        """Reply through the guard (guarded_replies.py); settle the request after it."""
        consumer.held += 1
        address = reply_address(delivery)

        def done(result: Result) -> None:
            self._schedule(partial(self._after_guarded_reply, consumer, delivery, outcome, result))

        self.guard.put(
            GuardedReply(
                address.address,
                outcome.body,
                reply_properties(delivery, outcome),
                done,
                wanted=lambda: delivery.channel is consumer.channel and delivery.channel.is_open,
                address=address,
            )
        )

    def _after_guarded_reply(
        self, consumer: Consumer, delivery: Delivery, outcome: Outcome, result: Result
    ) -> None:
        """Settle a request whose reply went through the guard."""
        channel = delivery.channel
        if channel is not consumer.channel or not channel.is_open:
            return  # requeued when its channel closed
        consumer.held -= 1
        fate = disposition(
            delivery,
            outcome,
            on_lane=consumer.lane is not None,
            route=self.guard.route,
            guarded=result,
        )
        if fate is Disposition.GIVE_BACK:
            self._give_back_lane(consumer, channel)
        elif fate is Disposition.REQUEUE:
            channel.basic_nack(delivery.tag, requeue=True)
        elif fate is Disposition.DEAD_LETTER:
            self.dead_letters.publish(consumer, delivery, outcome)
        else:
            channel.basic_ack(delivery.tag)

    @staticmethod
    def _ack(consumer: Consumer, channel, tags: list[int], batch: int) -> None:
        """Ack ``tags``: with one ``multiple`` ack when they are the whole batch of
        ``batch`` deliveries and no earlier delivery of the channel waits (never on
        a channel some of whose reads run on the I/O thread: inline_reads.py)."""
        if not tags:
            return
        if consumer.held == 0 and len(tags) == batch and not consumer.inline:
            channel.basic_ack(max(tags), multiple=True)
        else:
            for tag in tags:
                channel.basic_ack(tag)

    def _give_back_lane(self, consumer: Consumer, channel) -> None:
        """Give a lane's window back; its channel opens again after a short pause
        (``Consumer.given_back`` is set: ``ConsumerChannels._on_channel_closed``)."""
        consumer.yielding = True
        self.give_back(channel)

    def give_back(self, channel) -> None:
        """Close a lane's channel without a cancel: its unacked window returns to the
        lane in order. Reads go on first, so that its close-ok comes in (its bodies
        leave the bytes in hand only then)."""
        self._intake.resume_reads()
        close_without_cancel(channel)
