"""One consumer of the worker pool: a channel on a queue (owned by the pool's I/O
thread) and the database thread that runs its deliveries in order.

The I/O thread puts each delivery on ``Consumer.inbox``; the database thread takes
a batch (``_take``), refuses what must not run (oversized headers, a bad
``reply_to``), runs the rest through the dispatcher, logs and counts the
outcomes, and hands them back to the I/O thread as one ``Handled`` (the pool
schedules ``Settler.settle`` with it, settle.py), which replies, acks or
dead-letters them. The database thread never touches a channel."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dataspace_core.errors import DataSpaceError, DataSpaceRedeliveredError
from dataspace_core.protocol import (
    OPERATIONS,
    READS_QUEUE,
    ProtocolError,
    encode_error,
    operation_named_by,
)

from . import batch_requests, metrics
from .bounds import RequestBounds
from .dead_letters import DEAD_LETTERS
from .delivery import Delivery, refused_reply_to
from .dispatch import Outcome, Request
from .logs import printable
from .settle import is_dead_letter

#: the pool's logger: request and dead-letter lines read as before this module split off
log = logging.getLogger("dataspace_worker.consumer")
#: bodies one batch may hold: small requests batch by the prefetch window, large
#: ones run alone (a batch's transaction holds several copies of each value)
BATCH_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Handled:
    """What a database thread hands the I/O thread: a batch of one consumer's
    deliveries and their outcomes, in delivery order, to be settled."""

    consumer: Consumer
    deliveries: list[Delivery]
    outcomes: list[Outcome]

    def __iter__(self) -> Iterator[tuple[Delivery, Outcome]]:
        return zip(self.deliveries, self.outcomes, strict=True)

    def __len__(self) -> int:
        return len(self.deliveries)


class Consumer:
    """One channel on a queue and the thread that runs its deliveries in order."""

    def __init__(
        self,
        index: int,
        queue_name: str,
        dispatcher,
        prefetch: int,
        *,
        bounds: RequestBounds,
        hand_back: Callable[[Handled], None],
        lane: int | None = None,
    ):
        """``bounds``: the size checks every outcome goes through; ``hand_back``:
        how a handled batch reaches the I/O thread (the pool's ``settle_later``)."""
        self.index = index
        #: the ordering lane this consumer serves, or None (docs/scaling.md)
        self.lane = lane
        #: when its channel last delivered (I/O thread): a lane that delivers is one
        #: this worker is the single active consumer of
        self.last_delivery = 0.0
        #: its channel is being closed on purpose, to hand the lane to another worker
        self.yielding = False
        #: a lane stopping: run nothing more; what it holds goes back to the lane
        self.stop_now = False
        #: a lane channel given back after a request to retry: what else it delivered
        #: is skipped (the broker returns it, in order, when the channel closes)
        self.given_back = None
        self.bounds = bounds
        self._hand_back = hand_back
        #: whether a batch delivered again can be split (the pool's dead-letter
        #: channel is open, DeadLetterPublisher.can_publish); else it runs as usual
        self.can_split: Callable[[], bool] = lambda: False
        self.queue_name = queue_name
        self.dispatcher = dispatcher
        self.prefetch = prefetch
        self.inbox: queue.Queue[Delivery | None] = queue.Queue()
        self.channel = None
        self.consumer_tag: str | None = None
        #: the tag the broker's consume-ok confirmed (the subscription is in place)
        self.confirmed_tag: str | None = None
        self.handled = 0
        #: the prefetch its current subscription was made with (request queue consumers)
        self.granted: int | None = None
        #: deliveries of this channel whose ack waits for a dead letter's confirm
        self.held = 0
        #: some of its deliveries run on the I/O thread (inline_reads.py): acked one by one
        self.inline = False
        self._carry: Delivery | None = None  # taken from the inbox, for the next batch
        self.thread = threading.Thread(
            target=self._work, name=f"dataspace-consumer-{index}", daemon=True
        )

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            started = time.monotonic()
            with metrics.IN_FLIGHT.track_inprogress():
                outcomes = [self.bounds.sendable(o) for o in self._outcomes(batch)]
            # what a dead letter keeps of a large refused body: cut here, off the I/O
            # thread, and the whole body let go of before the reply goes out
            batch = [self.bounds.keepable(d, o) for d, o in zip(batch, outcomes, strict=True)]
            elapsed = time.monotonic() - started
            if self.lane is not None and any(o.retry for o in outcomes):
                self.given_back = batch[0].channel  # see settle.Disposition.GIVE_BACK
            for delivery, outcome in zip(batch, outcomes, strict=True):
                self.report(delivery, outcome, elapsed)
            self.handled += len(batch)
            self._hand_back(Handled(self, batch, outcomes))
            # hold no body while waiting for the next batch (up to prefetch x size)
            batch = outcomes = delivery = outcome = None

    def _take(self) -> list[Delivery] | None:
        """The next deliveries to run: one, waited for, then whatever else the
        prefetch window already holds (without waiting), up to ``BATCH_BYTES`` of
        bodies (large values go one at a time); None to stop."""
        batch: list[Delivery] = []
        size = 0
        delivery = self._carry or self.inbox.get()
        self._carry = None
        while delivery is not None:
            if self.stop_now:  # unacked: returned to the lane when its channel closes
                return None
            if delivery.channel.is_open and delivery.channel is not self.given_back:
                if batch and size + len(delivery.body) > BATCH_BYTES:
                    self._carry = delivery  # starts the next batch
                    return batch
                batch.append(delivery)
                size += len(delivery.body)
            if len(batch) >= self.prefetch:
                break
            try:
                delivery = self.inbox.get_nowait()
            except queue.Empty:
                if batch:
                    break
                delivery = self.inbox.get()
        else:
            if not batch:
                return None
            self.inbox.put(None)  # stop after this batch
        return batch

    def _outcomes(self, batch: list[Delivery]) -> list[Outcome]:
        """``_handle_bounded``, except that a bug in it (the dispatcher answers its
        own) does not end this thread, which would leave the consumer's
        deliveries unsettled, and the consumer deaf, until the worker restarts:
        the batch's requests then run one by one, and each one the bug hits is
        answered ``internal`` (the others, as usual)."""
        try:
            return self._handle_bounded(batch)
        except Exception:
            if len(batch) == 1:
                return [self._internal(batch[0])]
        outcomes = []
        for delivery in batch:
            try:
                outcomes += self._handle_bounded([delivery])
            except Exception:
                outcomes.append(self._internal(delivery))
        return outcomes

    def _internal(self, delivery: Delivery) -> Outcome:
        """The outcome of a request a bug in the checks failed on (logged)."""
        log.exception(
            "%s: a bug while checking request %s: answered 'internal', and the consumer "
            "goes on; please report this trace",
            self.thread.name,
            printable(delivery.properties.message_id),
        )
        error = DataSpaceError("the worker failed on this request (a bug, logged)")
        return Outcome(encode_error(error), "internal", "?", reason=str(error))

    def _handle_bounded(self, batch: list[Delivery]) -> list[Outcome]:
        """``_handle``, except that a request whose header table is over the limit
        is refused unread (RequestBounds.oversized_headers)."""
        outcomes = [self.bounds.oversized_headers(d) for d in batch]
        admitted = [d for d, o in zip(batch, outcomes, strict=True) if o is None]
        if len(admitted) == len(batch):
            return self._handle(batch)
        handled = iter(self._handle(admitted) if admitted else [])
        return [o if o is not None else next(handled) for o in outcomes]

    def _handle(self, batch: list[Delivery]) -> list[Outcome]:
        refused = [refused_reply_to(d) or self._refused_again(d) for d in batch]
        if any(refused):  # not run, not answered: only the others run
            kept = [d for d, r in zip(batch, refused, strict=True) if r is None]
            outcomes = iter(self._handle(kept) if kept else [])
            return [r or next(outcomes) for r in refused]
        if not any(batch_requests.is_batch(d) for d in batch):
            return self.dispatcher.handle_batch([request_of(d) for d in batch])
        return self._handle_with_batches(batch)

    def _handle_with_batches(self, batch: list[Delivery]) -> list[Outcome]:
        """``_handle`` for deliveries among which some are batch messages, in
        delivery order: each batch message's requests as one database batch of
        their own (a failure sends only them one by one: at most ``MAX_ITEMS``),
        settled by one outcome made of theirs (batch_requests.py); the other
        deliveries, run by run, as usual."""
        outcomes: list[Outcome] = []
        singles: list[Delivery] = []
        for delivery in [*batch, None]:
            if delivery is not None and not batch_requests.is_batch(delivery):
                singles.append(delivery)
                continue
            if singles:
                outcomes += self.dispatcher.handle_batch([request_of(d) for d in singles])
                singles = []
            if delivery is not None:
                outcomes.append(self._handle_batch_message(delivery))
        return outcomes

    def _handle_batch_message(self, delivery: Delivery) -> Outcome:
        try:
            requests = batch_requests.requests_of(delivery, self.dispatcher.max_body)
        except ProtocolError as exc:
            return batch_requests.refused(delivery, exc)
        if delivery.redelivered and self.can_split():
            return batch_requests.split(delivery, requests)
        done = self.dispatcher.handle_batch(requests)
        return batch_requests.outcome_of(delivery, requests, done)

    def _refused_again(self, delivery: Delivery) -> Outcome | None:
        """A fast read delivered again is not run: its first delivery went unanswered,
        and the worker that took it may have died running it (the fast read queue
        has no delivery limit). The client asks once more through the request queue."""
        if not delivery.redelivered or self.queue_name != READS_QUEUE:
            return None
        operation = operation_named_by(delivery.routing_key) or "?"
        error = DataSpaceRedeliveredError(
            f"{operation}: delivered again after its first delivery went unanswered "
            "(a worker may have died running it); ask through the request queue"
        )
        return Outcome(encode_error(error), "read_redelivered", operation, reason=str(error))

    def report(self, delivery: Delivery, outcome: Outcome, elapsed: float) -> None:
        """Count an outcome, log it (DEBUG), and warn of a dead letter."""
        props = delivery.properties
        dead = is_dead_letter(delivery, outcome)
        _count(outcome, elapsed, dead)
        if log.isEnabledFor(logging.DEBUG):  # one line per request: DEBUG only
            log.debug(
                "%s %s%s in %.1f ms (%s)",
                outcome.operation,
                outcome.code,
                " (replayed)" if outcome.replayed else "",
                elapsed * 1000,
                # a fire-and-forget request has no correlation id: its message_id
                f"correlation {printable(props.correlation_id)}"
                if props.correlation_id is not None
                else f"message_id {printable(props.message_id)}",
                extra={
                    "operation": outcome.operation,
                    "outcome": outcome.code,
                    "correlation_id": props.correlation_id,
                    "message_id": props.message_id,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
        known = outcome.operation in OPERATIONS
        if dead and DEAD_LETTERS.add(
            f"{outcome.code} {outcome.operation}" if known else outcome.code
        ):
            log.warning(
                "dead-lettering %s request %s: %s (more within a minute are summed up in one line)",
                # a body that names no operation: the routing key it was sent with
                outcome.operation if known else printable(delivery.routing_key),
                printable(props.message_id),
                outcome.reason,
            )


def request_of(delivery: Delivery) -> Request:
    """What the dispatcher reads of a delivery."""
    p = delivery.properties
    return Request(
        delivery.body,
        p.message_id,
        p.content_type,
        p.headers,
        delivery.routing_key,
        p.user_id,
        p.correlation_id,
    )


def make_consumers(
    topology,
    dispatcher,
    reaper,
    consumers: int,
    prefetch: int,
    *,
    bounds: RequestBounds,
    hand_back: Callable[[Handled], None],
) -> list[Consumer]:
    """A pool's consumers: ``consumers`` on the request queue, one on the reaper
    queue (prefetch 1, with a ``reaper`` dispatcher), one per ordering lane of
    ``topology`` (topology.py): the broker keeps one active per lane across all
    workers, and ``WorkerPool.rebalance`` spreads them; then ``consumers`` more on
    the fast read queue, if the topology has it."""
    queues = [(topology.request_queue.name, dispatcher, prefetch, None)] * consumers
    if reaper is not None:
        queues.append((topology.reaper_queue.name, reaper, 1, None))
    queues += [(q.name, dispatcher, prefetch, i) for i, q in enumerate(topology.lane_queues)]
    if topology.reads_queue is not None:
        queues += [(topology.reads_queue.name, dispatcher, prefetch, None)] * consumers
    return [
        Consumer(index, name, serves, window, bounds=bounds, hand_back=hand_back, lane=lane)
        for index, (name, serves, window, lane) in enumerate(queues)
    ]


def _count(outcome: Outcome, elapsed: float, dead: bool) -> None:
    for part in outcome.parts or (outcome,):  # a batch message: each of its requests
        metrics.labelled(metrics.REQUESTS, part.operation, part.code).inc()
        metrics.labelled(metrics.LATENCY, part.operation).observe(elapsed)
        if part.replayed:
            metrics.IDEMPOTENT_DUPLICATES.inc()
    if dead:
        metrics.DEAD_LETTERED.labels(outcome.code).inc()
    if outcome.operation == "reap":
        metrics.REAPS.labels(outcome.code).inc()
