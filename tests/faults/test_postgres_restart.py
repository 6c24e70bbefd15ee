"""PostgreSQL stopped under load (``pg_ctl stop -m fast``, then ``-m immediate``, a crash)
for a few seconds and started again, with the same worker process throughout.

While the database is down the worker holds its requests and retries; a commit
whose answer was lost in the shutdown may have been applied, so its retry must
replay the first reply, not write again or fail with DataSpaceExistsError. After
the restart the same worker serves new requests.
"""

from __future__ import annotations

import time
import uuid

import pytest

from .load import MARGIN, Load, probe, verify
from .workers import tail, worker_env

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

TIMEOUT = 10.0
THREADS = 5
ACKS_PER_PHASE = 800
DOWN = 3.0  # seconds the database stays down each time
MODES = ("fast", "immediate")


def test_postgres_stop_and_crash_under_load(
    throwaway_pg, fresh_vhost, start_worker, open_space, report_figures
):
    env = worker_env(fresh_vhost, throwaway_pg.dsn)
    worker = start_worker(env)
    pid = worker.proc.pid
    space = open_space(fresh_vhost, TIMEOUT)
    name = f"fault-pg-{uuid.uuid4().hex[:8]}"
    sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))

    load = Load(space, sequence_id, name, TIMEOUT, threads=THREADS)
    load.start()
    outages = []
    try:
        reached, _ = load.wait_for_acks(ACKS_PER_PHASE, 60)
        assert reached, f"the load did not get going; worker output:\n{tail(worker.output)}"
        for mode in MODES:
            acked_before = load.acknowledged()
            began = time.monotonic()
            throwaway_pg.stop(mode)
            stopped = time.monotonic()
            time.sleep(DOWN)
            acked_while_down = load.acknowledged() - acked_before
            throwaway_pg.start()
            up = time.monotonic()
            first, first_wait = load.wait_for_acks(1, TIMEOUT + 20)
            more, more_wait = load.wait_for_acks(ACKS_PER_PHASE, 60)
            outages.append(
                {
                    "mode": mode,
                    "stop_seconds": round(stopped - began, 2),
                    "down_seconds": round(up - stopped, 2),
                    "acks_while_down": acked_while_down,
                    "first_ack_after_start_s": round(first_wait, 2) if first else None,
                    "phase_acks_reached": more,
                    "phase_seconds": round(more_wait, 2),
                }
            )
            assert first and more, (
                f"the worker did not serve again after PostgreSQL came back ({outages[-1]}); "
                f"worker output:\n{tail(worker.output)}\n\nPostgreSQL log:\n"
                f"{throwaway_pg.log_tail()}"
            )
    finally:
        hung = load.finish()
    load_seconds = time.monotonic() - load.started_at

    figures, problems = verify(load, throwaway_pg.dsn, hung)
    after = probe(space, sequence_id, within=5)
    if not after["ok"]:
        problems.append(f"a new request after the restarts failed: {after}")
    restarted = worker.proc.poll() is not None or len(start_worker.workers) != 1
    if restarted:
        problems.append(f"the worker (pid {pid}) exited: code {worker.proc.poll()}")
    figures.update(
        outages=outages,
        worker_replays=start_worker.replays(),
        worker_same_process=not restarted,
        worker_retry_warnings=sum("database unavailable" in line for line in worker.lines),
        load_seconds=round(load_seconds, 1),
        probe_after=after,
        margin=MARGIN,
    )
    report_figures(figures)
    assert not problems, "\n".join(problems) + f"\n\nworker output:\n{tail(worker.output)}"
