"""How a worker is put together from its settings, in one place.

The ``dataspace-worker`` command (cli.py) and the tests' in-process worker
(tests/services.py, ``running_pool``) both build theirs with ``build_worker``: the
topology, the reap schedule, the request dispatcher, the reaper's dispatcher and
the pool, wired the same way. The command then starts it with ``start_worker``,
which adds the periodic upkeep threads."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from dataspace_core.amqp.addresses import broker_addresses

from .config import WorkerSettings
from .dead_letters import log_dead_letter_summary
from .dispatch import Dispatcher
from .identity import Identity
from .maintenance import RequestLogSweeper, every
from .reaper import ReaperDispatcher, Schedule
from .topology import Topology, topology
from .worker_pool import WorkerPool

SWEEP_INTERVAL = 60.0
TOPOLOGY_CHECK_INTERVAL = 60.0
#: seconds between two looks at how the ordering lanes are spread (WorkerPool.rebalance)
LANE_REBALANCE_INTERVAL = 5.0
ARM_INTERVAL = 60.0
#: seconds between two looks at whether a dead-letter summary line is due
DEAD_LETTER_SUMMARY_INTERVAL = 5.0


def database_connections(settings: WorkerSettings) -> int:
    """Connections the worker's database pool holds: one per consumer (on the
    request queue, and as many on the fast read queue) and per lane (their
    database threads), and one each for the reaper and the request-log sweeper,
    which need one at times."""
    return 2 * settings.consumers + settings.lanes + 2


def database_config(settings: WorkerSettings, identity: Identity) -> dict:
    """The ``PostgresDataSource`` configuration of the command's worker."""
    return {
        "dsn": settings.pg_dsn,
        "pool_size": database_connections(settings),
        "retry_timeout": None,  # a worker waits for its database until stopped
        "connect_timeout": max(1, int(settings.connect_timeout)),
        "reap_batch": settings.reap_batch,
        "create_database": settings.create_database,
        "application_name": f"dataspace-worker {identity.label}"[:63],
    }


@dataclass(frozen=True)
class Worker:
    """A built worker: its pool and what the command's upkeep needs beside it."""

    pool: WorkerPool
    datasource: object  # postgres.PostgresDataSource
    topology: Topology
    #: the reap schedule held in the broker, with ``retention_days`` only
    schedule: Schedule | None


def build_worker(
    settings: WorkerSettings,
    datasource,
    *,
    stop: threading.Event,
    identity: Identity | None = None,
    trust_scheduled_reaps: bool = True,
) -> Worker:
    """The pool (not started) serving ``settings`` on ``datasource``; ``stop`` is
    set to stop it. ``trust_scheduled_reaps``: a reap message published by the
    account of ``amqp_url`` with the schedule queue's expiry is taken as the
    scheduled reap (the command); False trusts none (the tests' pools)."""
    topo = topology(settings.delivery_limit, settings.lanes)
    identity = identity or Identity.of_this_process(settings.name)
    schedule = None
    if settings.retention_days:
        schedule = Schedule(
            settings.amqp_url,
            settings.retention_days,
            settings.reap_interval,
            queue_arguments=topo.schedule_queue.arguments,
            connection_name=identity.connection_name("reap schedule"),
        )
    # the account the schedule's messages carry as user_id: only those are trusted
    # as the scheduled reap
    service_user = broker_addresses(settings.amqp_url).user if trust_scheduled_reaps else None
    pool = WorkerPool(
        settings.amqp_url,
        Dispatcher(datasource, settings.max_body),
        topo,
        consumers=settings.consumers,
        prefetch=settings.prefetch,
        connect_timeout=settings.connect_timeout,
        stop_event=stop,
        max_headers=settings.max_headers,
        max_message_size=settings.max_message_size,
        dead_letter_body=settings.dead_letter_body,
        max_bytes_in_hand=settings.max_bytes_in_hand,
        identity=identity,
        reaper=ReaperDispatcher(datasource, schedule, settings.max_body, service_user=service_user),
        inline_reads=True,
    )
    return Worker(pool, datasource, topo, schedule)


def start_worker(worker: Worker, settings: WorkerSettings, stop: threading.Event) -> None:
    """Start the pool and the upkeep threads (each ends when ``stop`` is set): the
    topology check, the lanes' rebalancing, the dead-letter summary, the request-log
    sweeper and, with a schedule, arming it (once the pool consumes, then
    periodically)."""
    pool, schedule = worker.pool, worker.schedule
    pool.start()
    every(TOPOLOGY_CHECK_INTERVAL, pool.check_topology, stop, "dataspace-topology-check")
    if settings.lanes:
        every(LANE_REBALANCE_INTERVAL, pool.rebalance, stop, "dataspace-lane-rebalance")
    every(DEAD_LETTER_SUMMARY_INTERVAL, log_dead_letter_summary, stop, "dataspace-dead-summary")
    sweeper = RequestLogSweeper(worker.datasource, settings.idempotency_ttl)
    every(SWEEP_INTERVAL, sweeper.sweep, stop, "dataspace-sweeper")
    if schedule is not None:
        # Arm now (once the topology exists) and keep trying: a refusal means one
        # run is pending already; a success heals a schedule lost with a node.
        pool.consuming.wait(settings.connect_timeout)
        schedule.try_arm()
        every(min(ARM_INTERVAL, settings.reap_interval), schedule.try_arm, stop, "dataspace-arm")
