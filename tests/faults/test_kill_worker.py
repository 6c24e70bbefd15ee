"""kill -9 of the worker under load, twice, each time replaced by a new worker.

Requests the killed worker held unacked go back to the queue and the new worker
runs them. Some of them had already committed: without idempotency the new worker
would write them again (a second task manager row) or fail them (DataSpaceExistsError
for an insert that was applied). With it, every acknowledged write is in
PostgreSQL exactly once, and every call returns or raises a DataSpaceError within
its timeout.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from urllib.parse import unquote, urlsplit

import pytest

from .load import MARGIN, Load, probe, verify
from .workers import tail, worker_env

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

TIMEOUT = 10.0
THREADS = 5
ACKS_PER_PHASE = 900
KILLS = 2
GAP = 1.0  # seconds without any worker after each kill


def queue_depths(vhost_url: str) -> dict:
    """{queue: {"ready": n, "unacked": m}} on the local broker (empty if rabbitmqctl fails)."""
    vhost = unquote(urlsplit(vhost_url).path.lstrip("/")) or "/"
    argv = ["rabbitmqctl", "-q", "list_queues", "-p", vhost]
    try:
        out = subprocess.run(
            [*argv, "name", "messages_ready", "messages_unacknowledged"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    depths = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            depths[parts[0]] = {"ready": int(parts[1]), "unacked": int(parts[2])}
    return depths


def settled_queues(vhost_url: str, within: float = 6.0) -> dict:
    """Queue depths once the request queue is empty, or as they are after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        depths = queue_depths(vhost_url)
        left = depths.get("dataspace.requests", {})
        if not any(left.values()) or time.monotonic() > deadline:
            return depths
        time.sleep(0.5)


def test_kill_9_worker_mid_run(
    fresh_vhost, fresh_database, start_worker, open_space, report_figures
):
    env = worker_env(fresh_vhost, fresh_database)
    worker = start_worker(env)
    space = open_space(fresh_vhost, TIMEOUT)
    name = f"fault-kill-{uuid.uuid4().hex[:8]}"
    sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))

    load = Load(space, sequence_id, name, TIMEOUT, threads=THREADS)
    load.start()
    kills = []
    try:
        reached, _ = load.wait_for_acks(ACKS_PER_PHASE, 60)
        assert reached, f"the load did not get going; worker output:\n{tail(worker.output)}"
        for _ in range(KILLS):
            calls_before = load.attempted()
            killed = time.monotonic()
            worker.kill()  # SIGKILL: no drain, no ack, no reply for what it held
            time.sleep(GAP)
            worker = start_worker(env)
            serving = time.monotonic() - killed
            first, first_wait = load.wait_for_acks(1, TIMEOUT + 20)
            more, more_wait = load.wait_for_acks(ACKS_PER_PHASE, 60)
            kills.append(
                {
                    "calls_before_kill": calls_before,
                    "new_worker_consuming_after_s": round(serving, 2),
                    "first_ack_after_new_worker_s": round(first_wait, 2) if first else None,
                    "phase_acks_reached": more,
                    "phase_seconds": round(more_wait, 2),
                }
            )
            assert first and more, (
                f"no progress after the new worker started ({kills[-1]}); worker output:\n"
                f"{tail(worker.output)}"
            )
    finally:
        hung = load.finish()
    load_seconds = time.monotonic() - load.started_at

    figures, problems = verify(load, fresh_database, hung)
    after = probe(space, sequence_id, within=5)
    if not after["ok"]:
        problems.append(f"a new request after the kills failed: {after}")
    figures.update(
        kills=kills,
        worker_replays=start_worker.replays(),
        load_seconds=round(load_seconds, 1),
        probe_after=after,
        queues_after=settled_queues(fresh_vhost),
        margin=MARGIN,
    )
    report_figures(figures)
    assert not problems, "\n".join(problems) + f"\n\nlast worker output:\n{tail(worker.output)}"
