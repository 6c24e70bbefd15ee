"""The exchanges and queues the worker declares: the broker side of docs/protocol.md.

Queue arguments live only here.  RabbitMQ refuses to redeclare a queue with
other arguments (406 PRECONDITION_FAILED, "inequivalent arg"), so changing one
means a new queue name or a migration step, never an edit in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataspace_client.protocol import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    REAP_ROUTING_KEY,
    REAPER_QUEUE,
    REQUEST_BINDING,
    REQUEST_QUEUE,
    SCHEDULE_QUEUE,
)


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[tuple[str, str], ...]  # (name, type)
    queues: tuple[Queue, ...]

    @property
    def request_queue(self) -> Queue:
        return self.queues[0]

    @property
    def reaper_queue(self) -> Queue:
        return self.queues[2]

    @property
    def schedule_queue(self) -> Queue:
        return self.queues[3]


def topology(delivery_limit: int = 10) -> Topology:
    """The service's topology.  ``delivery_limit`` bounds redeliveries of one request.

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
    requests = Queue(REQUEST_QUEUE, dict(work), ((EXCHANGE, REQUEST_BINDING),))
    dead = Queue(
        DEAD_LETTER_QUEUE,
        {"x-queue-type": "quorum"},
        ((DEAD_LETTER_EXCHANGE, "#"),),
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
    return Topology(
        exchanges=((EXCHANGE, "topic"), (DEAD_LETTER_EXCHANGE, "topic")),
        queues=(requests, dead, reaper, schedule),
    )


def declare_blocking(channel, topo: Topology) -> None:
    """Declare everything on a pika BlockingChannel (tests and tools use this)."""
    for name, kind in topo.exchanges:
        channel.exchange_declare(name, kind, durable=True)
    for queue in topo.queues:
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        for exchange, key in queue.bindings:
            channel.queue_bind(queue.name, exchange, key)
