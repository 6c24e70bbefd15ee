"""How much a worker takes in from the broker: the request bytes it holds
(``max_bytes_in_hand``), the prefetch its request-queue consumers are subscribed
with, and when it stops reading its socket (docs/security.md, "request bytes in
hand").

RabbitMQ bounds deliveries by count only (prefetch), so a pool that may be sent
60 MiB requests bounds their bytes itself:

- a new connection starts with prefetch 1 (``probing``) until a first delivery
  shows the queue does not hold large bodies;
- a large delivery, seen by its content header before its body comes in, drops
  the prefetch to 1 for ``CAREFUL_FOR`` seconds;
- so does a request delivered again (``redelivered``): it may be what killed a
  worker, and a worker that dies holding a window of requests spends a delivery
  of each (a quorum queue counts every return towards its delivery limit), so
  that the innocent requests taken with a poison one would be dead-lettered
  with it; one at a time, only the poison one reaches the limit;
- over ``max_bytes_in_hand`` the consumers are cancelled (``paused``) until half
  of that is settled;
- a body whose header says it would take the pool over the bound is not read
  from the socket until enough is settled: what the broker already sent in a
  prefetch window waits in the broker.

Everything here runs on the pool's I/O thread. The pool owns the channels; it
asks ``wanted_prefetch`` what to subscribe with, and is told to do so again by
the ``resubscribe`` callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import pika.frame

from dataspace_core.amqp.patches import read_again, stop_reading

from . import metrics
from .in_hand import Ledger

log = logging.getLogger("dataspace_worker.consumer")

#: seconds without a large delivery before the channels' prefetch goes back up from 1
CAREFUL_FOR = 5.0
#: longest a hold of the socket's reads lasts (at most half the connection's
#: heartbeat): past it, reads go on until something is settled. Requests in hand
#: that cannot be settled (the database is down, say) must not cost the connection
#: its heartbeats, and them a delivery attempt each when pika gives it up
HOLD_MAX = 10.0


class Intake:
    """The pool's intake state and the decisions made from it."""

    def __init__(
        self,
        max_bytes_in_hand: int,
        large: int,
        resubscribe: Callable[[], None],
        confirms_pending: Callable[[], bool],
        stopping: Callable[[], bool] = lambda: False,
    ):
        self.max_bytes_in_hand = max_bytes_in_hand
        #: a delivery this large lowers every channel's prefetch to 1 for a while
        self.large = large
        self._resubscribe = resubscribe
        self._confirms_pending = confirms_pending
        self._stopping = stopping
        #: request body bytes delivered and not settled, by channel and tag
        self.ledger = Ledger()
        #: taking no more deliveries on the request queue while over the bound
        self.paused = False
        #: channels' prefetch lowered to 1 (large or redelivered deliveries seen)
        #: until this time
        self.careful_until = 0.0
        #: prefetch 1 on a new connection until a first delivery shows the queue
        #: does not hold large bodies (a backlog would come in whole windows)
        self.probing = True
        #: bytes of the large body whose header made the pool stop reading its
        #: socket, or None while it reads
        self.reads_held_for: int | None = None
        #: a hold ran HOLD_MAX out: no other until something is settled
        self._hold_spent = False
        self._connection = None

    # -- connection life ---------------------------------------------------------------
    def opened(self, connection) -> None:
        """A new connection: probe again; its socket is read from the start."""
        self._connection = connection
        self.probing = True
        self.reads_held_for = None
        self._hold_spent = False

    def lost(self) -> None:
        """The connection is gone: the broker took back everything in hand."""
        self._connection = None
        self.ledger.clear()
        self.paused = False
        self.reads_held_for = None
        self._hold_spent = False
        self.careful_until = 0.0
        metrics.BYTES_IN_HAND.set(0)

    # -- what came in --------------------------------------------------------------------
    def took(self, channel, tag: int, size: int, redelivered: bool = False) -> None:
        """Count a delivery's body in hand; resubscribe when that changes what the
        consumers should take (``redelivered``: a request queue delivery the broker
        marked as delivered before)."""
        self.ledger.add(channel, tag, size)
        metrics.BYTES_IN_HAND.set(self.ledger.total)
        changed = self.saw(size, redelivered)
        if not self.paused and self.ledger.total > self.max_bytes_in_hand:
            self.paused = changed = True
            metrics.CONSUMPTION_PAUSES.inc()
            log.info(
                "holding %d bytes of requests (max_bytes_in_hand %d): taking no more "
                "until half of that is settled",
                self.ledger.total,
                self.max_bytes_in_hand,
            )
        if changed:
            self._resubscribe()

    def saw(self, size: int, redelivered: bool = False) -> bool:
        """Note a delivery: a large one, or one delivered again, starts (or
        prolongs) CAREFUL_FOR seconds of prefetch 1; a first small one on a new
        connection ends probing. True when the consumers' wanted prefetch changed."""
        if size >= self.large or redelivered:
            changed = self.probing or time.monotonic() >= self.careful_until
            self.probing = False
            self.careful_until = time.monotonic() + CAREFUL_FOR
            if changed and self._connection is not None:
                self._connection.ioloop.call_later(
                    CAREFUL_FOR, partial(self._end_care, self._connection)
                )
            return changed
        if self.probing:
            self.probing = False
            return time.monotonic() >= self.careful_until
        return False

    def watch_headers(self, channel) -> None:
        """Act on a large delivery's content header, before its body comes in: the
        body of a 60 MiB request takes a while to arrive, and meanwhile the broker
        fills a whole prefetch window with the large requests published (all of
        them held at once: 944 MiB measured with 16 x 60 MiB, a bound of 362)."""
        assembler = channel._content_assembler
        process = assembler.process

        def watched(frame_value):
            if isinstance(frame_value, pika.frame.Header) and frame_value.body_size >= self.large:
                if self.saw(frame_value.body_size):
                    self._resubscribe()
                if self.ledger.total + frame_value.body_size > self.max_bytes_in_hand:
                    self.hold_reads(frame_value.body_size)
            return process(frame_value)

        assembler.process = watched

    # -- the socket ------------------------------------------------------------------------
    def hold_reads(self, size: int) -> None:
        """Stop reading the socket before a body of ``size`` bytes comes in over the
        bound, until something in hand is settled (``released``), or for HOLD_MAX
        seconds at most. Not when nothing is in hand (no settlement would end it),
        nor while a dead letter awaits its confirm (the confirm settles its request,
        and needs reading), nor while stopping; only on a plain TCP transport (a TLS
        one manages its reader itself)."""
        connection = self._connection
        if (
            self.reads_held_for is not None
            or self._hold_spent
            or self.ledger.total == 0
            or self._confirms_pending()
            or self._stopping()
            or not stop_reading(connection)
        ):
            return
        self.reads_held_for = size
        heartbeat = getattr(connection.params, "heartbeat", None)
        limit = HOLD_MAX if not isinstance(heartbeat, int) or heartbeat <= 0 else heartbeat / 2
        connection.ioloop.call_later(min(HOLD_MAX, limit), partial(self._hold_over, connection))
        metrics.READ_HOLDS.inc()
        log.debug(
            "holding %d bytes of requests: reading the next %d-byte one once settled",
            self.ledger.total,
            size,
        )

    def resume_reads(self) -> None:
        """Read the socket again (after ``hold_reads``). Called before anything whose
        answer must be read: a dead letter's confirm, a channel or connection close,
        the cancels at stop. The reader goes back whenever the transport still runs
        (a closing connection must read its close-ok)."""
        if self.reads_held_for is None:
            return
        self.reads_held_for = None
        read_again(self._connection)

    def _hold_over(self, connection) -> None:
        """HOLD_MAX ran out with reads still held: read again, and hold no more until
        something is settled."""
        if connection is self._connection and self.reads_held_for is not None:
            log.debug("holding reads for long: reading on until a request is settled")
            self._hold_spent = True
            self.resume_reads()

    # -- what was settled ------------------------------------------------------------------
    def track(self, channel) -> None:
        """Count every settlement made on a consumer channel, wherever it is made
        (ack, nack, reject: each releases its bodies from the ledger)."""
        ledger = self.ledger
        ack, nack, reject = channel.basic_ack, channel.basic_nack, channel.basic_reject

        def basic_ack(delivery_tag=0, multiple=False):
            ack(delivery_tag, multiple)
            ledger.settle(channel, delivery_tag, multiple)
            self.released()

        def basic_nack(delivery_tag=0, multiple=False, requeue=True):
            nack(delivery_tag, multiple, requeue)
            ledger.settle(channel, delivery_tag, multiple)
            self.released()

        def basic_reject(delivery_tag=0, requeue=True):
            reject(delivery_tag, requeue)
            ledger.settle(channel, delivery_tag, False)
            self.released()

        channel.basic_ack, channel.basic_nack, channel.basic_reject = (
            basic_ack,
            basic_nack,
            basic_reject,
        )

    def channel_closed(self, channel) -> None:
        """The channel closed: its unsettled deliveries went back to the queue."""
        self.ledger.drop(channel)
        self.released()

    def released(self) -> None:
        """Bodies were settled or given back: read the socket again when the body
        waiting there fits (or nothing else is in hand); take deliveries again when
        down to half the bound."""
        total = self.ledger.total
        metrics.BYTES_IN_HAND.set(total)
        self._hold_spent = False
        held = self.reads_held_for
        if held is not None and (total == 0 or total + held <= self.max_bytes_in_hand):
            self.resume_reads()
        if self.paused and total <= self.max_bytes_in_hand // 2:
            self.paused = False
            log.info("holding %d bytes of requests: taking deliveries again", total)
            self._resubscribe()

    # -- the prefetch ------------------------------------------------------------------------
    def wanted_prefetch(self, prefetch: int) -> int | None:
        """What a request-queue consumer should be subscribed with: None (not at all)
        while paused; 1 while probing or careful; else ``prefetch``."""
        if self.paused:
            return None
        if self.probing or time.monotonic() < self.careful_until:
            return 1
        return prefetch

    def _end_care(self, connection) -> None:
        """CAREFUL_FOR seconds after a large or redelivered delivery: back to the full
        prefetch, unless another came meanwhile."""
        if connection is not self._connection or not connection.is_open:
            return
        left = self.careful_until - time.monotonic()
        if left > 0:
            connection.ioloop.call_later(left, partial(self._end_care, connection))
            return
        self._resubscribe()
