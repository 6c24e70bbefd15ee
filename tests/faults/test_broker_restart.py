"""The broker restarted under load: a clean stop/start, then kill -9 and start, with
the same worker process and the same client object throughout.

Requests survive in the quorum queue; replies in flight are lost with the
connections. The client re-sends what it was waiting for, with the same
message_id, once it has reconnected within the call's timeout, and the worker
replays the stored reply of a write it had already applied. Afterwards the pool
and the same DataSpace object serve new requests.
"""

from __future__ import annotations

import time
import uuid

import pytest

from .load import MARGIN, Load, probe, verify
from .workers import tail, worker_env

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]

# Longer than a broker restart here (~4 s stop + ~8 s start), so that calls in
# flight can outlive it through the client's re-send.
TIMEOUT = 20.0
THREADS = 5
ACKS_PER_PHASE = 600
RECOVERY = 45.0  # seconds allowed for worker and client to reconnect after a restart


def test_broker_restart_and_kill_9_under_load(
    throwaway_mq, fresh_database, start_worker, open_space, report_figures
):
    env = worker_env(throwaway_mq.url, fresh_database)
    worker = start_worker(env)
    pid = worker.proc.pid
    space = open_space(throwaway_mq.url, TIMEOUT)
    name = f"fault-mq-{uuid.uuid4().hex[:8]}"
    sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))

    load = Load(space, sequence_id, name, TIMEOUT, threads=THREADS)
    load.start()
    restarts = []
    try:
        reached, _ = load.wait_for_acks(ACKS_PER_PHASE, 60)
        assert reached, f"the load did not get going; worker output:\n{tail(worker.output)}"
        for how in ("stop", "kill9"):
            consuming_before = worker.output.count("consuming 'dataspace.requests'")
            began = time.monotonic()
            getattr(throwaway_mq, how)()
            down = time.monotonic()
            throwaway_mq.start()
            up = time.monotonic()
            first, first_wait = load.wait_for_acks(1, RECOVERY)
            more, more_wait = load.wait_for_acks(ACKS_PER_PHASE, 60)
            restarts.append(
                {
                    "how": how,
                    "stop_seconds": round(down - began, 2),
                    "start_seconds": round(up - down, 2),
                    "first_ack_after_start_s": round(first_wait, 2) if first else None,
                    "worker_reconsumed": worker.output.count("consuming 'dataspace.requests'")
                    > consuming_before,
                    "phase_acks_reached": more,
                    "phase_seconds": round(more_wait, 2),
                }
            )
            assert first and more, (
                f"no progress after the broker came back ({restarts[-1]}); worker output:\n"
                f"{tail(worker.output)}\n\nbroker log:\n{throwaway_mq.log_tail(20)}"
            )
    finally:
        hung = load.finish()
    load_seconds = time.monotonic() - load.started_at

    figures, problems = verify(load, fresh_database, hung)
    after = probe(space, sequence_id, within=RECOVERY)  # the same client object
    if not after["ok"]:
        problems.append(f"the same client could not serve a new request afterwards: {after}")
    restarted = worker.proc.poll() is not None or len(start_worker.workers) != 1
    if restarted:
        problems.append(f"the worker (pid {pid}) exited: code {worker.proc.poll()}")
    depths = throwaway_mq.ctl(
        "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged", timeout=30
    ).stdout.split()
    figures.update(
        restarts=restarts,
        worker_replays=start_worker.replays(),
        worker_same_process=not restarted,
        load_seconds=round(load_seconds, 1),
        probe_after=after,
        queues_after=" ".join(depths),
        margin=MARGIN,
    )
    report_figures(figures)
    assert not problems, "\n".join(problems) + f"\n\nworker output:\n{tail(worker.output)}"
