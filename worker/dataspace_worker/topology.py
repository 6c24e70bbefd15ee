"""The exchanges and queues the worker declares: the broker side of docs/protocol.md.

Queue arguments live only here.  RabbitMQ refuses to redeclare a queue with
other arguments (406 PRECONDITION_FAILED, "inequivalent arg"), so changing one
means a new queue name or a migration step, never an edit in place.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import pika
from pika.exceptions import ChannelClosedByBroker

from dataspace_core.batches import BATCH_BINDING
from dataspace_core.protocol import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_KEPT_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_SORT_EXCHANGE,
    DEAD_READS_DISCARD_QUEUE,
    DEAD_READS_EXCHANGE,
    EXCHANGE,
    LANE_BINDING,
    LANE_HEADER,
    LANE_QUEUE_PREFIX,
    LANE_WORKERS_QUEUE,
    LANES_EXCHANGE,
    OPERATIONS,
    READS_QUEUE,
    REAP_ROUTING_KEY,
    REAPER_QUEUE,
    REQUEST_BINDING,
    REQUEST_QUEUE,
    SCHEDULE_QUEUE,
)

log = logging.getLogger(__name__)

#: broker memory the fast read queue's messages may hold (a read's body is small)
READS_MAX_BYTES = 64 * 1024 * 1024
#: milliseconds without a consumer after which the fast read queue goes
READS_EXPIRE_MS = 60_000


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)
    durable: bool = True
    #: arguments of each of its bindings (a headers exchange's match)
    binding_arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[tuple[str, str], ...]  # (name, type)
    queues: tuple[Queue, ...]
    #: exchange name -> its arguments (exchanges not named here have none)
    exchange_arguments: dict = field(default_factory=dict)
    #: exchange-to-exchange bindings: (source, destination, routing key)
    exchange_bindings: tuple[tuple[str, str, str], ...] = ()
    #: queue bindings of earlier versions to remove: (queue, exchange, routing key)
    stale_bindings: tuple[tuple[str, str, str], ...] = ()

    def queue(self, name: str) -> Queue | None:
        """The queue of that name, or None."""
        return next((q for q in self.queues if q.name == name), None)

    @property
    def request_queue(self) -> Queue:
        return self.queue(REQUEST_QUEUE)

    @property
    def reads_queue(self) -> Queue | None:
        """The fast read queue (None in a topology without it)."""
        return self.queue(READS_QUEUE)

    @property
    def reaper_queue(self) -> Queue:
        return self.queue(REAPER_QUEUE)

    @property
    def schedule_queue(self) -> Queue:
        return self.queue(SCHEDULE_QUEUE)

    @property
    def lane_queues(self) -> tuple[Queue, ...]:
        """The ordering lanes, lane 0 first (none unless ``lanes`` was given)."""
        return tuple(q for q in self.queues if q.name.startswith(LANE_QUEUE_PREFIX))

    @property
    def lane_workers_queue(self) -> Queue | None:
        """The queue whose consumer count is the number of workers serving lanes."""
        return self.queue(LANE_WORKERS_QUEUE)


def topology(delivery_limit: int = 10, lanes: int = 0) -> Topology:
    """The service's topology.  ``delivery_limit`` bounds redeliveries of one request;
    ``lanes`` ordering lanes, if any (docs/scaling.md).

    Quorum queues: durable and replicated on a cluster, with a delivery limit
    that dead-letters a request whose handling keeps failing; dead-lettering is
    at-least-once, which needs ``reject-publish`` overflow.
    """
    # Requests and retention messages alike: bounded redeliveries, then
    # at-least-once dead-lettering (which needs reject-publish overflow).
    work = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    # batches of fire-and-forget requests (batches.py): an older worker binds no
    # ``batch.#``, so while none of these runs the broker returns a batch unroutable
    requests = Queue(
        REQUEST_QUEUE, dict(work), ((EXCHANGE, REQUEST_BINDING), (EXCHANGE, BATCH_BINDING))
    )
    dead = Queue(
        DEAD_LETTER_QUEUE,
        {"x-queue-type": "quorum"},
        ((DEAD_LETTER_KEPT_EXCHANGE, ""),),
    )
    # Dead letters are sorted (docs/protocol.md, "Dead letters"): the sort exchange
    # passes reads on to a headers exchange that drops those the broker expired
    # (their caller gave up; nobody else wants them), into a queue that keeps
    # nothing. What no binding takes goes to each exchange's alternate exchange,
    # which fans it out to dataspace.dead: a dead letter is dropped only when it is
    # both a read and expired. (Topic bindings match whole words: one per read.)
    discard = Queue(
        DEAD_READS_DISCARD_QUEUE,
        {"x-queue-type": "classic", "x-max-length": 0, "x-overflow": "drop-head"},
        ((DEAD_READS_EXCHANGE, ""),),
        binding_arguments={"x-match": "all-with-x", "x-first-death-reason": "expired"},
    )
    reads = tuple(
        (DEAD_LETTER_SORT_EXCHANGE, DEAD_READS_EXCHANGE, f"*.{op.name}")
        for op in OPERATIONS.values()
        if not op.write
    )
    sorting = (
        (DEAD_LETTER_EXCHANGE, DEAD_LETTER_SORT_EXCHANGE, "#"),
        *reads,
    )
    # Reads on the fast path (``read.<op>``, one binding per read: topic bindings
    # match whole words): a classic transient queue, its messages transient too.
    # Nothing to write to disk or to replicate: a read changes nothing, so a lost
    # one is asked again (the client re-sends it after a lost connection, and
    # through the request queue when it comes back unroutable). No delivery limit
    # on a classic queue: a read delivered again is refused by the worker
    # (database_thread.py) and the client asks once more through the request
    # queue, whose delivery limit ends a read that keeps killing workers. No
    # dead-lettering: an expired read just goes. Like the lane workers' queue it
    # goes when its node goes, and workers declare it again on another.
    # Bounded: a flood of large bodies (a reader account may send up to the broker's
    # max_message_size) holds at most READS_MAX_BYTES of broker memory, the oldest
    # dropped first (their callers ask again through the request queue after
    # ``no_worker_check``). Expires when no worker has consumed it for a minute
    # (workers rolled back to a release without it): reads then come back
    # unroutable and go through the request queue at once.
    fast_reads = Queue(
        READS_QUEUE,
        {
            "x-queue-type": "classic",
            "x-max-length-bytes": READS_MAX_BYTES,
            "x-overflow": "drop-head",
            "x-expires": READS_EXPIRE_MS,
        },
        tuple((EXCHANGE, op.read_routing_key) for op in OPERATIONS.values() if op.fast_read),
        durable=False,
    )
    # One reap at a time across every worker: a single active consumer.
    reaper = Queue(
        REAPER_QUEUE,
        {**work, "x-single-active-consumer": True},
        ((EXCHANGE, REAP_ROUTING_KEY),),
    )
    # The pending scheduled reap (see reaper.py). Classic: on RabbitMQ 3.10 a
    # quorum queue accepted a second message despite max-length 1 and
    # reject-publish (measured), which would let runs pile up.
    schedule = Queue(
        SCHEDULE_QUEUE,
        {
            "x-queue-type": "classic",
            "x-max-length": 1,
            "x-overflow": "reject-publish",
            "x-dead-letter-exchange": EXCHANGE,
            "x-dead-letter-routing-key": REAP_ROUTING_KEY,
        },
    )
    # Ordering lanes: requests naming a task manager, hashed by it (plugin
    # rabbitmq_consistent_hash_exchange; each binding's key is its weight); one
    # active consumer per lane across all workers keeps each lane in order.
    lane_queues = tuple(
        Queue(
            f"{LANE_QUEUE_PREFIX}{i}",
            {**work, "x-single-active-consumer": True},
            ((LANES_EXCHANGE, "1"),),
        )
        for i in range(lanes)
    )
    exchanges = [
        (EXCHANGE, "topic"),
        (DEAD_LETTER_EXCHANGE, "topic"),
        (DEAD_LETTER_KEPT_EXCHANGE, "fanout"),
        (DEAD_LETTER_SORT_EXCHANGE, "topic"),
        (DEAD_READS_EXCHANGE, "headers"),
    ]
    kept = {"alternate-exchange": DEAD_LETTER_KEPT_EXCHANGE}
    exchange_arguments: dict = {DEAD_LETTER_SORT_EXCHANGE: kept, DEAD_READS_EXCHANGE: kept}
    exchange_bindings: tuple = sorting
    if lanes:
        # Clients publish lane requests to the topic exchange too (``lane.<op>``,
        # which topic permissions check); it passes them on to the hash exchange,
        # which picks the lane by the task manager in the LANE_HEADER header.
        exchanges.append((LANES_EXCHANGE, "x-consistent-hash"))
        exchange_arguments[LANES_EXCHANGE] = {"hash-header": LANE_HEADER}
        exchange_bindings += ((EXCHANGE, LANES_EXCHANGE, LANE_BINDING),)
        # A lane's consumer count is 1 (its active consumer): workers count
        # themselves by consuming this queue, which receives nothing. Classic and
        # transient: a classic queue forgets the consumers of a node that went down
        # at once; a quorum queue keeps counting them until that node is back
        # (measured: a worker alone counted two, and handed half its lanes to
        # nobody every 5 s). It goes when its node goes; workers declare it again.
        lane_queues += (Queue(LANE_WORKERS_QUEUE, {"x-queue-type": "classic"}, durable=False),)
    return Topology(
        exchanges=tuple(exchanges),
        queues=(requests, fast_reads, dead, reaper, schedule, *lane_queues, discard),
        exchange_arguments=exchange_arguments,
        exchange_bindings=exchange_bindings,
        # dataspace.dead took every dead letter straight from dataspace.dead before
        # the sorting; left bound, it would get each one twice
        stale_bindings=((DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "#"),),
    )


def declare_blocking(channel, topo: Topology) -> None:
    """Declare everything on a pika BlockingChannel (the worker, tests and tools).

    A classic queue lives on one node of a cluster: while that node is down the
    broker refuses to declare it (404, "home node ... is down"). That must not
    keep a worker from consuming through the other nodes, so such a queue is
    skipped, with a warning, and declared again at the next reconnection.
    """
    for name, kind in topo.exchanges:
        channel.exchange_declare(
            name, kind, durable=True, arguments=topo.exchange_arguments.get(name)
        )
    for source, destination, key in topo.exchange_bindings:
        channel.exchange_bind(destination, source, key)
    for queue in topo.queues:
        try:
            channel.queue_declare(queue.name, durable=queue.durable, arguments=queue.arguments)
        except ChannelClosedByBroker as exc:
            if exc.reply_code != 404 or queue.arguments.get("x-queue-type") != "classic":
                raise
            log.warning("queue %s unavailable, skipped for now: %s", queue.name, exc.reply_text)
            channel = channel.connection.channel()
            continue
        for exchange, key in queue.bindings:
            channel.queue_bind(queue.name, exchange, key, arguments=queue.binding_arguments or None)
    for queue_name, exchange, key in topo.stale_bindings:
        channel.queue_unbind(queue_name, exchange, key)


@contextmanager
def short_connection(parameters: pika.ConnectionParameters):
    """A blocking connection, closed after use: for declaring and checking, beside
    the worker's own ``SelectConnection``."""
    connection = pika.BlockingConnection(parameters)
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


def declare(parameters: pika.ConnectionParameters, topo: Topology) -> None:
    """Declare ``topo`` (idempotent) on a short-lived connection."""
    with short_connection(parameters) as connection:
        declare_blocking(connection.channel(), topo)


def missing_queue(parameters: pika.ConnectionParameters, names: list[str]) -> str | None:
    """The first of the queues ``names`` that does not exist, or None (each looked
    at with a passive declare, on a short-lived connection)."""
    with short_connection(parameters) as connection:
        for name in names:
            try:
                connection.channel().queue_declare(name, passive=True)
            except ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                return name
    return None
