"""The consumer pool: one AMQP connection, N consumers, each with its own database thread.

pika is not thread-safe and a blocking connection does no I/O while its thread
waits on the database, so the roles are split:

- one I/O thread owns the connection (a ``SelectConnection``) and every channel,
  keeps heartbeats flowing, and does every publish and ack;
- each consumer has a channel with a bounded prefetch and a database thread
  (database_thread.py) that takes that channel's deliveries in order, runs them,
  and hands them back to the I/O thread as one ``Handled`` batch.

The parts, each with one job: ``ConsumerChannels`` (channels.py) opens,
subscribes, cancels and reopens the channels; ``Settler`` (settle.py) carries out
each handled request's fate, which ``settle.disposition`` decides in one place
(reply, ack, dead letter, requeue, a lane given back); ``Intake`` (intake.py)
bounds the bytes in hand; ``DeadLetterPublisher`` (dead_letters.py) and
``GuardedReplies`` (guarded_replies.py) publish with confirms; ``PoolConnection``
(pool_connection.py) runs the connection: when it drops, the I/O thread
re-declares the topology and reconnects with bounded backoff while the database
threads carry on. This module holds them together: start, stop and drain.

Stopping (SIGTERM, Ctrl-C): cancel the consumers, let each database thread
finish what its channel had delivered, ack it, close, return.
"""

from __future__ import annotations

import logging
import threading
import time

import pika

from dataspace_core.amqp import patches  # noqa: F401  (one bad header must not break us)
from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.limits import MAX_MESSAGE_BYTES
from dataspace_core.urls import mask_password

from .bounds import MAX_HEADERS, RequestBounds
from .channels import CHANNEL_REOPEN_PAUSE, ConsumerChannels
from .database_thread import Consumer, make_consumers
from .dead_letters import DEAD_LETTER_BODY, DeadLetterPublisher
from .delivery import Delivery
from .dispatch import Dispatcher, Outcome
from .guarded_replies import GuardedReplies
from .identity import Identity
from .inline_reads import InlineReads
from .intake import Intake
from .lanes import LaneCensus, rebalance
from .pool_connection import PoolConnection
from .settle import Settler
from .topology import Topology

#: "consumer": the name the pool's log lines have always had (operators filter on it)
log = logging.getLogger("dataspace_worker.consumer")

__all__ = ["MAX_BYTES_IN_HAND", "MAX_HEADERS", "WorkerPool"]

#: bytes of request bodies delivered and not yet settled, across every consumer,
#: over which the pool stops taking deliveries (setting ``max_bytes_in_hand``)
MAX_BYTES_IN_HAND = 256 * 1024 * 1024


class WorkerPool:
    """Consumes the request queue with ``consumers`` consumers until stopped.

    This holds the parts together and runs the connection: the consumers and their
    database threads (database_thread.py), their channels (channels.py), what
    settles a handled request (settle.py), the intake (intake.py), dead letters
    (dead_letters.py), guarded replies and the lane census (lanes.py)."""

    def __init__(
        self,
        amqp_url: str,
        dispatcher: Dispatcher,
        topology: Topology,
        *,
        consumers: int = 4,
        prefetch: int = 4,
        connect_timeout: float = 10.0,
        stop_event: threading.Event | None = None,
        reaper=None,
        max_headers: int = MAX_HEADERS,
        max_message_size: int = MAX_MESSAGE_BYTES,
        dead_letter_body: int = DEAD_LETTER_BODY,
        max_bytes_in_hand: int = MAX_BYTES_IN_HAND,
        identity: Identity | None = None,
        inline_reads: bool = False,
    ):
        """``identity``: how this worker names its connections and consumer tags
        (default: the host name and this pid).

        ``reaper``: a dispatcher for retention messages; when given, one more
        consumer (prefetch 1) takes the reaper queue, as a single active consumer
        among all workers.

        What a client can make the worker publish or hold (docs/security.md):
        ``max_headers``, the largest encoded header table a request may carry;
        ``max_message_size``, the broker's (a larger reply is replaced by a
        ``too_large`` error); ``dead_letter_body``, body bytes a dead letter keeps;
        ``max_bytes_in_hand``, request body bytes delivered and not yet settled
        over which the pool stops taking deliveries."""
        self.bounds = RequestBounds(max_headers, max_message_size, dead_letter_body)
        self.max_bytes_in_hand = max_bytes_in_hand
        self.amqp_url = amqp_url
        self.masked_url = mask_password(amqp_url)
        self.dispatcher = dispatcher
        self.topology = topology
        self.prefetch = prefetch
        self.stopping = stop_event or threading.Event()
        self.identity = identity or Identity.of_this_process()
        self.consuming = threading.Event()
        self._lock = threading.Lock()
        self.consumers = make_consumers(
            topology,
            dispatcher,
            reaper,
            consumers,
            prefetch,
            bounds=self.bounds,
            hand_back=self.settle_later,
        )
        self.lanes = [c for c in self.consumers if c.lane is not None]

        # several URLs: a cluster's nodes, tried in turn (dataspace_core.amqp)
        self._addresses = broker_addresses(
            amqp_url,
            name=self.identity.connection_name("consumers"),
            connect_timeout=connect_timeout,
        )
        # replies that may crash their channel go out on a connection of their own
        self._guard = GuardedReplies(
            lambda: self._addresses.current,
            self.stopping,
            self.identity.connection_name("guarded replies"),
        )
        #: bytes in hand, prefetch care, socket holds (I/O thread). A delivery of
        #: ``large`` bytes lowers the prefetch to 1 for a while: full prefetch
        #: windows of smaller ones hold max_bytes_in_hand at most
        self.intake = Intake(
            max_bytes_in_hand,
            max(1, max_bytes_in_hand // (prefetch * len(self.consumers))),
            lambda: self.channels.resubscribe(),
            lambda: self.dead_letters.pending,
            self.stopping.is_set,
        )
        #: the channel dead letters go out on, in confirm mode (I/O thread only)
        self.dead_letters = DeadLetterPublisher(
            self.bounds.dead_letter_body, lambda: self.intake.resume_reads()
        )
        for consumer in self.consumers:  # a batch delivered again: split, if it can be
            consumer.can_split = self.dead_letters.can_publish
        self.amqp = PoolConnection(
            self._addresses,
            topology,
            stopping=self.stopping,
            lock=self._lock,
            opened=self._on_open,
            lost=self._connection_lost,
            before_close=self.intake.resume_reads,
            masked_url=self.masked_url,
        )
        self.settler = Settler(
            self._guard, self.dead_letters, self.intake, self.amqp.loop.call_soon, self._lock
        )
        self.channels = ConsumerChannels(
            self.consumers,
            topology.request_queue.name,
            intake=self.intake,
            dead_letters=self.dead_letters,
            give_back=self.settler.give_back,
            consumer_tag=self.identity.consumer_tag,
            connection=lambda: self._connection,
            reconnect=lambda reason: self.amqp.reconnect(reason),
            stopping=self.stopping,
            consuming=self.consuming,
            masked_url=self.masked_url,
            prefetch=prefetch,
        )
        #: fast reads answered on the I/O thread (inline_reads.py), or None
        self.inline = InlineReads.serving(self, consumers) if inline_reads else None
        #: the channel consuming dataspace.lanes.workers (counted among the lane
        #: workers), with lanes only
        self.census = None
        if topology.lane_workers_queue is not None:
            self.census = self.channels.census = LaneCensus(
                topology.lane_workers_queue,
                self.identity.consumer_tag,
                self.call_soon,
                self.channels.reopen_later,
                self.channels.census_wanted,
                CHANNEL_REOPEN_PAUSE,
            )
        self._io_thread = threading.Thread(target=self._run, name="dataspace-amqp-io", daemon=True)

    # -- control (any thread) ---------------------------------------------------
    def start(self) -> None:
        for consumer in self.consumers:
            consumer.thread.start()
        self._guard.start()
        self._io_thread.start()

    def alive(self) -> bool:
        """Whether the I/O thread and every database thread still run (for /livez)."""
        if self.stopping.is_set():
            return True  # threads end on purpose while stopping
        threads = [self._io_thread] + [c.thread for c in self.consumers]
        return all(t.is_alive() for t in threads) and self._guard.alive()

    def connected(self) -> bool:
        """Whether the AMQP connection is open (for the health endpoint)."""
        return self.amqp.connected()

    @property
    def fatal(self) -> str | None:
        """Why the pool gave up for good (the broker refused it), or None."""
        return self.amqp.fatal

    @property
    def connections_opened(self) -> int:
        return self.amqp.connections_opened

    @property
    def handled(self) -> int:
        return sum(c.handled for c in self.consumers) + (self.inline.handled if self.inline else 0)

    def call_soon(self, callback) -> bool:
        """Run ``callback`` on the I/O thread; False if the connection is gone."""
        return self.amqp.call_soon(callback)

    @property
    def _connection(self) -> pika.SelectConnection | None:
        return self.amqp.connection

    def settle_later(self, handled) -> None:
        """Hand a database thread's handled batch to the I/O thread (Settler)."""
        self.settler.settle_later(handled)

    # -- the bounds (the database threads use ``bounds`` itself; tests ask the pool) --
    def oversized_headers(self, delivery: Delivery) -> Outcome | None:
        return self.bounds.oversized_headers(delivery)

    def sendable(self, outcome: Outcome) -> Outcome:
        return self.bounds.sendable(outcome)

    def stop(self, drain_timeout: float = 30.0) -> bool:
        """Stop consuming, finish and ack the requests in hand, close.

        Returns False if some request was still running after ``drain_timeout``
        (it stays unacked and the broker redelivers it).
        """
        self.stopping.set()
        self.call_soon(self.channels.cancel_consumers)
        deadline = time.monotonic() + drain_timeout
        for consumer in self.consumers:
            if self._connection is None or not self._io_thread.is_alive():
                consumer.inbox.put(None)
        for consumer in self.consumers:
            consumer.thread.join(max(0.0, deadline - time.monotonic()))
        drained = not any(c.thread.is_alive() for c in self.consumers)
        # Replies confirmed and acks sent before closing, or finished work is redone.
        while (
            not self.settler.settled() or self.inline is not None and self.inline.pending
        ) and time.monotonic() < deadline:
            time.sleep(0.01)
        drained = drained and not (self.inline is not None and self.inline.pending)
        self._guard.stop()
        self.call_soon(self.channels.close_lanes)
        self.call_soon(self.amqp.close)
        self._io_thread.join(10)
        return drained

    # -- I/O thread ---------------------------------------------------------------
    def _run(self) -> None:
        self.amqp.run()
        for consumer in self.consumers:
            consumer.inbox.put(None)

    def _connection_lost(self) -> bool:
        """After a connection: what was scheduled on its loop will never run (the
        broker requeued those deliveries); whether it got as far as consuming."""
        self.settler.connection_lost()
        self.intake.lost()
        if self.inline is not None:
            self.inline.detach()
        reached = self.consuming.is_set()
        self.consuming.clear()
        return reached

    def check_topology(self) -> bool:
        """Whether every queue the pool consumes still exists; if one is gone, start over.

        RabbitMQ 3.10 sends no consumer cancel when a quorum queue is deleted, so
        a worker would keep consuming from nothing. Run periodically (the command
        does, every minute): a missing queue makes the pool reconnect, which
        declares the topology again.
        """
        if self.stopping.is_set():
            return True
        return self.amqp.check_topology(sorted({c.queue_name for c in self.consumers}))

    def _on_open(self, connection) -> None:
        """A new connection: channels, the guard's view of the nodes, the intake,
        the I/O thread's sessions for reads."""
        self.intake.opened(connection)
        self._guard.connected()  # which nodes run: learnt again on this connection
        if self.inline is not None:
            self.inline.attach(connection.ioloop)
        self.channels.open(connection)

    def rebalance(self, window: float = 10.0) -> list[int]:
        """Hand lanes to other workers when this one is active on more than its
        share (``lanes.rebalance``); the lanes given away. Run periodically (the
        command does, every few seconds)."""
        if not self.lanes or self.stopping.is_set():
            return []

        def give_up_later(extra: list[Consumer]) -> None:
            self.call_soon(lambda: self.channels.give_up_lanes(extra))

        return rebalance(self.lanes, self.census, window, give_up_later)
