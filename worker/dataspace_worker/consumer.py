"""The consumer pool: one AMQP connection, N consumers, each with its own database thread.

pika is not thread-safe and a blocking connection does no I/O while its thread
waits on the database, so the roles are split:

- one I/O thread owns the connection (a ``SelectConnection``) and every channel,
  keeps heartbeats flowing, and does every publish and ack;
- each consumer has a channel with a bounded prefetch and a database thread that
  takes that channel's deliveries in order, runs them, and hands the reply and
  the ack back to the I/O thread with ``add_callback_threadsafe``.

A request is acked only after its transaction committed and its reply was
published (the ack follows the reply on the same channel, so the broker sees
them in that order; a batch is acked with one ``multiple`` ack). A request
that is dead-lettered is acked only once the broker confirmed its copy in
``dataspace.dead`` (those go over a separate channel in confirm mode). The
reply to a redelivered request goes out on a connection of its own, confirmed,
and its request is acked after that (guarded_replies.py: RabbitMQ 3.10 crashes
the connection that replies to a client of a node that is down). A
delivery from a channel that has since closed is skipped: the broker has
already requeued it.  When the connection drops, the I/O thread
re-declares the topology and reconnects with bounded backoff; database threads
carry on.

Stopping (SIGTERM, Ctrl-C): cancel the consumers, let each database thread
finish what its channel had delivered, ack it, close, return.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from functools import partial

import pika
import pika.data
import pika.frame
from pika.exceptions import (
    AMQPError,
    ChannelClosedByBroker,
)

from dataspace_core.amqp import patches  # noqa: F401  (one bad header must not break us)
from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.amqp.failures import describe
from dataspace_core.amqp.patches import close_select_connection, close_without_cancel
from dataspace_core.amqp.reconnect import ConnectionCallbacks, ConnectionLoop
from dataspace_core.errors import DataSpaceTooLargeError
from dataspace_core.limits import MAX_MESSAGE_BYTES
from dataspace_core.protocol import (
    ProtocolError,
    encode_error,
)
from dataspace_core.urls import mask_password

from . import metrics
from .database_thread import Consumer
from .dead_letters import (
    DEAD_LETTER_BODY,
    DeadLetterPublisher,
    table_size,
)
from .delivery import Delivery, reply_properties, truncated
from .dispatch import Dispatcher, Outcome
from .guarded_replies import GuardedReplies, GuardedReply, Result
from .identity import Identity
from .intake import Intake
from .lanes import LaneCensus, give_up, lanes_to_give
from .reply_addresses import ReplyAddress
from .topology import Topology, declare_blocking

log = logging.getLogger(__name__)
#: seconds before a channel closed on purpose is opened again (a lane handed to
#: another worker, a dead-letter channel that refused a publish)
CHANNEL_REOPEN_PAUSE = 1.0
#: ... and a lane channel given back because a request of it must be retried
RETRY_REOPEN_PAUSE = 0.2

# -- what a client can make the worker publish or hold (issue 12) ------------------
#: largest header table a request may carry, encoded (setting ``max_headers``)
MAX_HEADERS = 16 * 1024
#: bytes of request bodies delivered and not yet settled, across every consumer,
#: over which the pool stops taking deliveries (setting ``max_bytes_in_hand``)
MAX_BYTES_IN_HAND = 256 * 1024 * 1024


class WorkerPool:
    """Consumes the request queue with ``consumers`` consumers until stopped."""

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
        self.max_headers = max_headers
        self.max_message_size = max_message_size
        self.dead_letter_body = min(dead_letter_body, max_message_size)
        self.max_bytes_in_hand = max_bytes_in_hand
        self.amqp_url = amqp_url
        self.masked_url = mask_password(amqp_url)
        self.dispatcher = dispatcher
        self.topology = topology
        self.prefetch = prefetch
        self.stopping = stop_event or threading.Event()
        request_queue = topology.request_queue.name
        self.consumers = [
            Consumer(i, self, request_queue, dispatcher, prefetch) for i in range(consumers)
        ]
        if reaper is not None:
            self.consumers.append(
                Consumer(consumers, self, topology.reaper_queue.name, reaper, prefetch=1)
            )
        # One consumer (channel and database thread) per ordering lane: the broker
        # keeps one active per lane across all workers; rebalance() spreads them.
        self.lanes = [
            Consumer(len(self.consumers) + i, self, lane.name, dispatcher, prefetch, lane=i)
            for i, lane in enumerate(topology.lane_queues)
        ]
        self.consumers.extend(self.lanes)
        #: bytes in hand, prefetch care, socket holds (I/O thread). A delivery of
        #: ``large`` bytes lowers the prefetch to 1 for a while: full prefetch
        #: windows of smaller ones hold max_bytes_in_hand at most
        self.intake = Intake(
            max_bytes_in_hand,
            max(1, max_bytes_in_hand // (prefetch * len(self.consumers))),
            self._resubscribe,
            lambda: self.dead_letters.pending,
            self.stopping.is_set,
        )
        self.consuming = threading.Event()
        self.connections_opened = 0
        #: why the pool gave up for good (the broker refused it), or None
        self.fatal: str | None = None
        self._finishing = 0  # replies scheduled on the I/O thread, not yet published
        # the channel dead letters go out on, in confirm mode (I/O thread only)
        self.dead_letters = DeadLetterPublisher(
            self.dead_letter_body, lambda: self.intake.resume_reads()
        )
        # the channel consuming dataspace.lanes.workers, once it consumes, and the
        # counts asked on it not yet answered (I/O thread)

        self.identity = identity or Identity.of_this_process()
        self.census = None
        if topology.lane_workers_queue is not None:
            self.census = LaneCensus(
                topology.lane_workers_queue,
                self.identity.consumer_tag,
                self.call_soon,
                self._reopen_later,
                self._census_wanted,
                CHANNEL_REOPEN_PAUSE,
            )

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
        self._lock = threading.Lock()
        self._loop = ConnectionLoop(
            self._addresses,
            ConnectionCallbacks(self._on_open, self._on_open_error, self._on_closed),
            stopped=self.stopping.is_set,
            wait=self.stopping.wait,
            lock=self._lock,
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
        connection = self._connection
        return connection is not None and connection.is_open

    @property
    def handled(self) -> int:
        return sum(c.handled for c in self.consumers)

    def call_soon(self, callback) -> bool:
        """Run ``callback`` on the I/O thread; False if the connection is gone."""
        return self._loop.call_soon(callback)

    @property
    def _connection(self) -> pika.SelectConnection | None:
        return self._loop.connection

    def schedule_finish(self, consumer: Consumer, handled: list[tuple[Delivery, Outcome]]) -> None:
        """Hand handled requests to the I/O thread for their replies and acks."""
        self._schedule_settling(partial(self.finish, consumer, handled))

    def _schedule_settling(self, callback) -> None:
        """Run ``callback`` (which publishes or acks) on the I/O thread; stopping
        waits for it (see ``_settled``)."""
        with self._lock:
            self._finishing += 1

        def run():
            try:
                callback()
            finally:
                with self._lock:
                    self._finishing -= 1

        if not self.call_soon(run):  # no connection: the broker redelivers it
            with self._lock:
                self._finishing -= 1

    def _settled(self) -> bool:
        """Every reply published, every dead letter confirmed, every ack sent."""
        if self._guard.pending:  # first: a guarded reply's settling is scheduled
            return False  # (``_finishing`` goes up) before it stops being pending
        with self._lock:
            if self._finishing:
                return False
        return not self.dead_letters.pending

    def stop(self, drain_timeout: float = 30.0) -> bool:
        """Stop consuming, finish and ack the requests in hand, close.

        Returns False if some request was still running after ``drain_timeout``
        (it stays unacked and the broker redelivers it).
        """
        self.stopping.set()
        self.call_soon(self._cancel_consumers)
        deadline = time.monotonic() + drain_timeout
        for consumer in self.consumers:
            if self._connection is None or not self._io_thread.is_alive():
                consumer.inbox.put(None)
        for consumer in self.consumers:
            consumer.thread.join(max(0.0, deadline - time.monotonic()))
        drained = not any(c.thread.is_alive() for c in self.consumers)
        # Replies confirmed and acks sent before closing, or finished work is redone.
        while not self._settled() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._guard.stop()
        self.call_soon(self._close_lanes)
        self.call_soon(self._close_connection)
        self._io_thread.join(10)
        return drained

    # -- I/O thread ---------------------------------------------------------------
    def _run(self) -> None:
        self._loop.run(self._connection_ended, prepare=self._prepare)
        for consumer in self.consumers:
            consumer.inbox.put(None)

    def _prepare(self) -> str | None:
        """Declare the topology before each connection; None when done, else why
        not (the loop tries the next address after a pause). A refusal retrying
        cannot cure stops the pool."""
        try:
            self._declare_topology()
        except ChannelClosedByBroker as exc:
            if exc.reply_code in (403, 406):  # no permission, or inequivalent arguments
                self._give_up(f"the broker refused the topology: {exc.reply_text}")
            return describe(exc).text
        except (AMQPError, OSError) as exc:
            problem = describe(exc)
            if problem.configuration:  # credentials, vhost, certificate, plugin
                self._give_up(
                    f"broker {self._addresses.current_url} refused this worker: {problem}"
                )
            return problem.text
        return None

    def _connection_ended(self, connection, _crash) -> bool:
        """After a connection: what was scheduled on its loop will never run (the
        broker requeued those deliveries); whether it got as far as consuming."""
        with self._lock:
            self._finishing = 0
        self.intake.lost()
        reached = self.consuming.is_set()
        self.consuming.clear()
        return reached

    def _give_up(self, reason: str) -> None:
        """A refusal that retrying cannot cure: stop the pool and say why."""
        self.fatal = reason
        log.debug("%s; stopping", reason)  # the command says it, once, as it exits
        self.stopping.set()

    def check_topology(self) -> bool:
        """Whether every queue the pool consumes still exists; if one is gone, start over.

        RabbitMQ 3.10 sends no consumer cancel when a quorum queue is deleted, so
        a worker would keep consuming from nothing. Run periodically (the command
        does, every minute): a missing queue makes the pool reconnect, which
        declares the topology again.
        """
        if self.stopping.is_set():
            return True
        with self._short_connection() as connection:
            for name in sorted({c.queue_name for c in self.consumers}):
                try:
                    connection.channel().queue_declare(name, passive=True)
                except ChannelClosedByBroker as exc:
                    if exc.reply_code != 404:
                        raise
                    self.call_soon(lambda n=name: self._reconnect(f"queue '{n}' is gone"))
                    return False
            return True

    @contextmanager
    def _short_connection(self):
        """A blocking connection to the current broker address, closed after use:
        for declaring and checking, beside the I/O thread's own connection."""
        connection = pika.BlockingConnection(self._addresses.current)
        try:
            yield connection
        finally:
            if connection.is_open:
                connection.close()

    def _declare_topology(self) -> None:
        """Declare exchanges, queues and bindings (idempotent) on a short-lived connection."""
        with self._short_connection() as connection:
            declare_blocking(connection.channel(), self.topology)

    def _on_open(self, connection) -> None:
        if self.stopping.is_set():
            connection.close()
            return
        self.connections_opened += 1
        self.intake.opened(connection)
        self._guard.connected()  # which nodes run: learnt again on this connection
        connection.channel(on_open_callback=self._on_dead_channel_open)

    def _on_dead_channel_open(self, channel, with_consumers: bool = True) -> None:
        """The dead-letter channel first, then (on a new connection) the consumers'."""
        channel.add_on_close_callback(self._on_dead_channel_closed)
        self.dead_letters.opened(channel)
        if not with_consumers:
            return
        if self.census is not None:
            channel.connection.channel(on_open_callback=self.census.open)
        for consumer in self.consumers:
            channel.connection.channel(on_open_callback=partial(self._on_channel_open, consumer))

    def _on_dead_channel_closed(self, channel, reason) -> None:
        """Unconfirmed dead letters are in doubt: their requests go back to the queue.
        Closed by the broker: start over; closed here after a refusal: a new channel
        after a pause."""
        self.dead_letters.closed(channel)
        if self.stopping.is_set():
            return
        if isinstance(reason, ChannelClosedByBroker):
            self._reconnect(f"dead-letter channel closed by the broker: {reason}")
            return
        self._reopen_later(
            CHANNEL_REOPEN_PAUSE, partial(self._on_dead_channel_open, with_consumers=False)
        )

    def _census_wanted(self) -> bool:
        """A closed census channel is opened again unless stopping or the connection
        is gone (a new connection opens a new one)."""
        connection = self._connection
        return not self.stopping.is_set() and connection is not None and connection.is_open

    def _on_open_error(self, connection, error) -> None:
        log.warning("cannot connect to %s: %s", self._addresses.current_url, describe(error))
        connection.ioloop.stop()

    def _on_closed(self, connection, reason) -> None:
        if not self.stopping.is_set():
            log.warning("connection to %s lost: %s; reconnecting", self.masked_url, reason)
        connection.ioloop.stop()

    def _on_channel_open(self, consumer: Consumer, channel) -> None:
        consumer.channel = channel
        consumer.held = 0
        consumer.given_back = None  # a new channel: nothing of it was given back
        channel.add_on_close_callback(partial(self._on_channel_closed, consumer))
        channel.add_on_cancel_callback(partial(self._on_cancelled, consumer))
        self.intake.track(channel)
        if self._shared(consumer):  # subscribed as the bytes in hand allow
            self.intake.watch_headers(channel)
            consumer.consumer_tag = None
            if self.stopping.is_set():
                consumer.inbox.put(None)
            self._resubscribe()
            return
        channel.basic_qos(
            prefetch_count=consumer.prefetch,
            callback=lambda _frame: self._consume(consumer, channel),
        )

    def _consume(self, consumer: Consumer, channel) -> None:
        if self.stopping.is_set():
            consumer.inbox.put(None)
            return
        if consumer.consumer_tag is not None or channel is not consumer.channel:
            return  # consuming already (resumed while its qos was on the way), or closed
        if self.intake.paused and self._shared(consumer):
            return  # over max_bytes_in_hand: Intake.released subscribes it again
        consumer.consumer_tag = tag = channel.basic_consume(
            consumer.queue_name,
            partial(self._on_message, consumer),
            consumer_tag=self.identity.consumer_tag(consumer.queue_name),
            callback=lambda _frame: self._on_consuming(consumer, tag),
        )

    def _on_consuming(self, consumer: Consumer, tag: str) -> None:
        """A consume-ok: the pool is consuming once every consumer's subscription is
        confirmed (a tag is known before its consume-ok: a second worker started on
        that signal could otherwise become the single active consumer of a lane)."""
        consumer.confirmed_tag = tag
        if all(
            c.consumer_tag and c.confirmed_tag == c.consumer_tag and c.channel and c.channel.is_open
            for c in self.consumers
        ):
            if not self.consuming.is_set():
                requests = self.topology.request_queue.name
                served = [c for c in self.consumers if c.queue_name == requests]
                others = sorted({c.queue_name for c in self.consumers} - {requests})
                log.info(
                    "consuming '%s' on %s with %d consumers, prefetch %d%s",
                    requests,
                    self.masked_url,
                    len(served),
                    self.prefetch,
                    "".join(f"; and '{q}'" for q in others),
                )
            self.consuming.set()

    def _on_channel_closed(self, consumer: Consumer, channel, reason) -> None:
        self.intake.channel_closed(channel)
        if consumer.channel is channel:
            consumer.channel = None
            consumer.consumer_tag = None
            consumer.held = 0
        if self.stopping.is_set():
            consumer.inbox.put(None)
            return
        if consumer.yielding:  # closed on purpose: back in the lane's line after a pause
            consumer.yielding = False
            pause = CHANNEL_REOPEN_PAUSE if consumer.given_back is None else RETRY_REOPEN_PAUSE
            self._reopen_later(pause, partial(self._on_channel_open, consumer))
            return
        if isinstance(reason, ChannelClosedByBroker):
            self._reconnect(f"consumer {consumer.index} channel closed by the broker: {reason}")

    def _reopen_later(self, pause: float, on_open) -> None:
        """Open a channel (``on_open`` gets it) after ``pause`` seconds, on this
        connection if it is still the pool's and open, and the pool not stopping."""
        connection = self._connection
        if connection is None or not connection.is_open:
            return

        def reopen():
            if connection is self._connection and connection.is_open:
                if not self.stopping.is_set():
                    connection.channel(on_open_callback=on_open)

        connection.ioloop.call_later(pause, reopen)

    # -- ordering lanes ------------------------------------------------------------
    def rebalance(self, window: float = 10.0) -> list[int]:
        """Hand lanes to other workers when this one is active on more than its share.

        Single active consumer makes the first subscriber of a lane its consumer,
        so the first worker would keep every lane. Every worker subscribes to
        every lane and counts the workers (the consumer count of
        ``dataspace.lanes.workers``, which each of them consumes; a classic queue,
        which forgets the consumers of a node that goes down at once, where a
        quorum queue counts them until the node is back). If this worker
        received deliveries from more than ``ceil(lanes / workers)`` lanes within
        ``window`` seconds, it closes the extra lanes' channels and subscribes
        again after a pause, at the back of their lines: the broker makes the next
        worker active and returns what this one had not acked (a request it was
        still applying is fenced by its idempotency claim). Returns the lanes given
        away. Run periodically (the command does).
        """
        if not self.lanes or self.stopping.is_set():
            return []
        counted = self.census.count() if self.census is not None else None
        if counted is None:
            return []  # not counted now (reconnecting, or the queue went with its node)
        workers = max(1, counted)
        active, extra = lanes_to_give(self.lanes, workers, window)
        if extra:
            log.info(
                "active on %d of %d lanes with %d workers: handing lanes %s to the others",
                len(active),
                len(self.lanes),
                workers,
                [c.lane for c in extra],
            )
            self.call_soon(lambda: self._give_up_lanes(extra))
        return [c.lane for c in extra]

    def _on_cancelled(self, consumer: Consumer, _frame) -> None:
        """The broker cancelled a consumer (its queue was deleted, say)."""
        if not self.stopping.is_set():
            self._reconnect(f"the broker cancelled consumer {consumer.index}")

    def _reconnect(self, reason: str) -> None:
        """Start over: reconnect with backoff and declare the topology again."""
        log.warning("%s; reconnecting", reason)
        connection = self._connection
        if connection is not None and connection.is_open:
            self.intake.resume_reads()  # its close-ok must be read
            connection.close()

    def _on_message(self, consumer: Consumer, channel, method, properties, body) -> None:
        consumer.last_delivery = time.monotonic()
        if method.redelivered:
            metrics.REDELIVERED.inc()
        self.intake.took(channel, method.delivery_tag, len(body))
        consumer.inbox.put(
            Delivery(
                channel,
                method.delivery_tag,
                method.exchange,
                method.routing_key,
                properties,
                body,
                bool(method.redelivered),
            )
        )

    # -- bounds on what a client can make the worker publish or hold -----------------
    def oversized_headers(self, delivery: Delivery) -> Outcome | None:
        """A ``bad_request`` outcome for a request whose header table encodes larger
        than ``max_headers`` (not run; its dead letter does not copy the table), else
        None. A table near the broker's frame_max is fine to publish, but anything
        the worker built from it (a dead letter: the table and its own headers) would
        not fit in a frame: the broker would close the connection at each redelivery."""
        size = table_size(delivery.properties.headers)
        if size <= self.max_headers:
            return None
        reason = (
            f"header table of {size if size is not None else 'unencodable'} bytes is over "
            f"the limit of {self.max_headers}"
        )
        return Outcome(encode_error(ProtocolError(reason)), "bad_request", "?", reason=reason)

    def sendable(self, outcome: Outcome) -> Outcome:
        """``outcome``, or a ``too_large`` error in its place when its reply body is
        over the broker's max_message_size: the broker would refuse that reply by
        closing the channel, again at every redelivery. The request is settled
        with the error reply; it is never retried."""
        body = outcome.body
        if body is None or len(body) <= self.max_message_size:
            return outcome
        reason = (
            f"{outcome.operation}: the reply of {len(body)} bytes is over the broker's "
            f"max_message_size ({self.max_message_size} bytes); read the products one at "
            "a time: get_dataproduct(taskmanager_id, generation_id, key) for each key"
        )
        log.warning("%s", reason)
        metrics.REPLIES_TOO_LARGE.inc()
        error = encode_error(DataSpaceTooLargeError(reason))
        return Outcome(error, "too_large", outcome.operation, reason=reason)

    def keepable(self, delivery: Delivery, outcome: Outcome) -> Delivery:
        """``delivery``, with its body cut to ``dead_letter_body`` bytes (and its size
        and SHA-256 noted) when the request failed and may be dead-lettered: the dead
        letter keeps no more, and the whole body need not be held until it is
        confirmed. Runs on the database thread (hashing 100 MiB takes a while)."""
        if outcome.code == "ok" or outcome.retry or delivery.body_size is not None:
            return delivery
        if len(delivery.body) <= self.dead_letter_body:
            return delivery
        return truncated(delivery, self.dead_letter_body)

    def _shared(self, consumer: Consumer) -> bool:
        """A consumer of the request queue (not a lane, not the reaper)."""
        return consumer.lane is None and consumer.queue_name == self.topology.request_queue.name

    def _resubscribe(self) -> None:
        """Subscribe each request queue consumer as ``Intake.wanted_prefetch`` says.

        RabbitMQ applies a channel's basic.qos to consumers subscribed after it only,
        so a consumer is cancelled and subscribed again with the new prefetch; what it
        holds is run and settled as usual. Lanes and the reaper are left alone: each
        is a single active consumer, and a cancel would hand it to another worker
        while this one still holds its earlier requests (their order would not hold);
        they stay bounded by their prefetch count."""
        if self.stopping.is_set():
            return
        for consumer in self.consumers:
            channel = consumer.channel
            if not self._shared(consumer) or channel is None or not channel.is_open:
                continue
            wanted = self.intake.wanted_prefetch(consumer.prefetch)
            tag = consumer.consumer_tag
            if tag is not None and consumer.granted == wanted:
                continue
            if tag is not None:
                consumer.consumer_tag = None
                channel.basic_cancel(tag, callback=lambda _frame: None)
                # pika rejects (requeues) what arrives between a cancel and its
                # cancel-ok; those are taken as usual instead (no redelivery, no
                # delivery count spent); pika forgets the consumer at the cancel-ok
                channel._cancelled.discard(tag)
            if wanted is not None:
                consumer.granted = wanted
                channel.basic_qos(prefetch_count=wanted)  # pika sends it, then the consume
                self._consume(consumer, channel)

    def finish(self, consumer: Consumer, handled: list[tuple[Delivery, Outcome]]) -> None:
        """Publish the replies (and dead letters) of handled requests, then settle them.

        Runs on the I/O thread. A reply needs no confirm: it is transient, and
        the ack that follows it on the same channel reaches the broker after it.
        When every request of the batch is answered and no earlier one of the
        channel waits, one ``multiple`` ack settles them all. A dead-lettered
        request is acked once the broker confirmed its dead letter, and
        requeued if the broker refused it (it is then handled again).
        """
        channel = consumer.channel
        if channel is None or not channel.is_open:
            return  # the broker requeued them when their channel closed
        ackable = []
        for delivery, outcome in handled:
            if delivery.channel is not channel:
                continue  # from a channel since closed: requeued already
            if outcome.retry and consumer.lane is not None:
                # A requeued request would come back after the later ones of its
                # lane this consumer already holds: give the lane's whole window
                # back instead, in order, and take it again after a pause.
                self._ack(consumer, channel, ackable, len(ackable))
                consumer.yielding = True
                self._give_back(channel)
                return
            if outcome.retry:
                channel.basic_nack(delivery.tag, requeue=True)
                continue
            # Only to a direct reply-to address (any other was refused before it ran),
            # on this channel only if its node is known to run (guarded_replies.py).
            address = delivery.reply_address
            if not isinstance(address, ReplyAddress):
                address = None
            route = self._guard.route(address, delivery.redelivered) if address else "drop"
            if route == "guard":
                self._reply_guarded(consumer, delivery, outcome, address)
                continue
            if route == "direct":  # direct reply-to replies must not be mandatory on 3.x
                channel.basic_publish(
                    "", address.address, outcome.body, reply_properties(delivery, outcome)
                )
            reply_to = address.address if address else None
            if outcome.dead_letter(reply_to):
                self.dead_letters.publish(consumer, delivery, outcome)
            else:
                ackable.append(delivery.tag)
        self._ack(consumer, channel, ackable, len(handled))

    def _reply_guarded(
        self, consumer: Consumer, delivery: Delivery, outcome: Outcome, address: ReplyAddress
    ) -> None:
        """Reply through the guard (guarded_replies.py); settle the request after it."""
        consumer.held += 1

        def done(result: Result) -> None:
            self._schedule_settling(
                partial(self._after_guarded_reply, consumer, delivery, outcome, result)
            )

        self._guard.put(
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
        """Settle a request whose reply went through the guard (I/O thread)."""
        channel = delivery.channel
        if channel is not consumer.channel or not channel.is_open:
            return  # requeued when its channel closed
        consumer.held -= 1
        if result == "failed" and consumer.lane is not None:
            # stopping with the reply unsent: the lane's window goes back in order
            consumer.yielding = True
            self._give_back(channel)
        elif result == "failed":  # stopping with the reply unsent: it is run (or replayed) again
            channel.basic_nack(delivery.tag, requeue=True)
        elif outcome.dead_letter(delivery.properties.reply_to):
            self.dead_letters.publish(consumer, delivery, outcome)
        else:
            channel.basic_ack(delivery.tag)

    @staticmethod
    def _ack(consumer: Consumer, channel, tags: list[int], batch: int) -> None:
        """Ack ``tags``: with one ``multiple`` ack when they are the whole batch of
        ``batch`` deliveries and no earlier delivery of the channel waits."""
        if not tags:
            return
        if consumer.held == 0 and len(tags) == batch:
            channel.basic_ack(max(tags), multiple=True)
        else:
            for tag in tags:
                channel.basic_ack(tag)

    def _cancel_consumers(self) -> None:
        self.intake.resume_reads()  # the cancel-oks and the close handshake need reading
        for consumer in self.consumers:
            if consumer.lane is not None:
                # A lane is not cancelled (the next worker would get its later
                # requests before those held here): it finishes the batch in hand,
                # then its channel is closed outright (_close_lanes).
                consumer.stop_now = True
                consumer.inbox.put(None)
                continue
            channel, tag = consumer.channel, consumer.consumer_tag
            if channel is not None and channel.is_open and tag:
                channel.basic_cancel(tag, callback=lambda _f, c=consumer: c.inbox.put(None))
            else:
                consumer.inbox.put(None)

    def _close_lanes(self) -> None:
        for consumer in self.lanes:
            channel = consumer.channel
            if channel is not None and channel.is_open:
                self._give_back(channel)

    def _close_connection(self) -> None:
        self.intake.resume_reads()  # its close-ok must be read
        close_select_connection(self._connection)

    def _give_back(self, channel) -> None:
        """Close a lane's channel without a cancel: its unacked window returns to the
        lane in order. Reads go on first, so that its close-ok comes in (its bodies
        leave the bytes in hand only then)."""
        self.intake.resume_reads()
        close_without_cancel(channel)

    def _give_up_lanes(self, consumers: list[Consumer]) -> None:
        self.intake.resume_reads()  # the channels' close-oks must be read
        give_up(consumers)
