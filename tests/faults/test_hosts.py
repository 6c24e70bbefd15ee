"""Workers on separate hosts, one host's link cut under load (issue 7, "many hosts").

Three worker hosts, each a network namespace of its own with its own address
(``netns.worker_host``), each running one ``dataspace-worker`` that reaches the
machine's RabbitMQ and PostgreSQL only over its host's link; all three consume
the same request queue of one vhost and write to one database. The clients run
on the machine itself. With writes running from several client threads, the
link of one host is cut: its worker is not killed, it just loses the broker and
the database at once, with whatever it held. Its AMQP URL asks for 2 s
heartbeats, so the broker declares that connection dead within seconds and
requeues what the worker held. Then:

- calls started after the cut are acknowledged, within a bounded time, by the
  other two hosts (the cut one can reach nothing);
- the broker drops the cut worker's connection (seen as the forwarder of that
  host's AMQP traffic losing its connection to the broker), and requests the cut
  worker held are answered by the others;
- once the link is back, the cut worker reconnects and consumes again, or exits
  cleanly (which one is reported; anything else fails);
- PostgreSQL holds every acknowledged write exactly once with its value, and no
  doubled rows (``load.verify``).

The drop is seen through the forwarder: up to ~0.15 s after the broker closed
the connection (socat's close delay and the polling), so the first held call
answered by another host may show slightly earlier than the drop.

Figures also show what the cut worker left open in PostgreSQL: its sessions as
the server sees them while the link is down, and the sessions of the other hosts
waiting on a lock one of them holds. When the cut lands inside one of the cut
worker's transactions (now and then: they last milliseconds), that transaction
stays open on the server, with the claim of each request it held (see
``idempotency.claim``), until the link returns; another host given such a
request waits on that claim meanwhile, and the test tolerates it (the call
may be slow, or time out, which a caller may retry).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
import uuid
from collections import Counter

import psycopg2
import pytest

from dataspace_client import DataSpaceTimeoutError
from tests.test_worker_cli import WORKER, WorkerProcess

from .conftest import CONSUMING, tail, worker_env
from .load import MARGIN, Load, probe, verify
from .netns import AMQP_PORT, PG_PORT, NetnsUnavailable, WorkerHost, unavailable, worker_host

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

HOSTS = 3
CONSUMERS = 2  # per worker
HEARTBEAT = 2  # seconds, in the workers' AMQP URLs: the broker notices a dead link in ~2-3x
# Each call's timeout: longer than the broker takes to notice the dead link, requeue and
# redeliver, and than a request blocked behind a transaction the cut worker left open
# waits for the link's return (and TCP's next retransmission) in the test.
TIMEOUT = 20.0
THREADS = 6
WARMUP_ACKS = 300  # acknowledged calls before the cut, every host having served some
FIRST_ACK = 5.0  # seconds allowed from the cut to the first ack of a call started after it
MIN_ACKS_WHILE_CUT = 50  # acknowledged calls, by the other hosts, while the link is down
DROP = 15.0  # seconds allowed from the cut until the broker drops the cut worker's connection
HOLD = 3.0  # seconds the link stays down once the broker dropped the connection
RECONNECT = 30.0  # seconds allowed, once the link is back, to consume again or exit
AFTER_RESTORE_ACKS = 200
STALLED = 1.0  # seconds a call waits across the cut: held by the cut worker

#: a request line of a worker: "<operation> <outcome>[ (replayed)] in <ms> ms (correlation"
REQUEST_LINE = re.compile(r"dataspace_worker\.consumer: \w+ \w+( \(replayed\))? in [\d.]+ ms")


class HostWorker(WorkerProcess):
    """``dataspace-worker`` run inside a worker host's namespace."""

    def __init__(self, host: WorkerHost, env: dict):
        self.host = host
        self.proc = subprocess.Popen(
            host.command([WORKER]),
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def requests(self, since: int = 0) -> int:
        """Request lines logged (from line ``since`` on)."""
        return sum(bool(REQUEST_LINE.search(line)) for line in self.lines[since:])

    def consuming_count(self) -> int:
        return sum(CONSUMING in line for line in list(self.lines))


def _wait(predicate, timeout: float, pause: float = 0.05):
    """Poll ``predicate`` until it returns something true; (value, seconds) or (None, s)."""
    started = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None, time.monotonic() - started
        time.sleep(pause)


def _sessions(pg_dsn: str, cut_ports: set[int]) -> dict:
    """What PostgreSQL shows of the cut host's sessions (by the ports its forwarder
    connects from) and of the other sessions waiting on a lock."""
    with psycopg2.connect(pg_dsn, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pid, client_port, state, wait_event_type, pg_blocking_pids(pid) "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        rows = cur.fetchall()
    conn.close()
    cut = [r for r in rows if r[1] in cut_ports]
    cut_pids = {r[0] for r in cut}
    waiting = [r for r in rows if r[1] not in cut_ports and r[3] == "Lock"]
    return {
        "cut_host_sessions": dict(Counter(r[2] for r in cut)),
        "other_sessions_waiting_on_a_lock": len(waiting),
        "of_which_blocked_by_cut_host": sum(bool(set(r[4]) & cut_pids) for r in waiting),
    }


@pytest.fixture
def hosts():
    reason = unavailable()
    if reason:
        pytest.skip(f"no worker hosts here: {reason}")
    with contextlib.ExitStack() as stack:
        made = []
        try:
            for _ in range(HOSTS):
                made.append(stack.enter_context(worker_host("dsh")))
        except NetnsUnavailable as exc:
            pytest.skip(f"no worker hosts here: {exc}")
        yield made


@pytest.fixture
def host_workers():
    """``host_workers(host, env)``: a worker in a host, consuming; stopped at teardown
    (before the host goes: the fixture is requested after ``hosts``)."""
    workers: list[HostWorker] = []

    def start(host: WorkerHost, env: dict) -> HostWorker:
        worker = HostWorker(host, env)
        workers.append(worker)
        return worker

    start.workers = workers
    yield start
    for worker in workers:
        if worker.proc.poll() is None:
            with contextlib.suppress(Exception):
                worker.terminate(10)
        worker.kill()


def test_host_link_cut_under_load(
    hosts, host_workers, fresh_vhost, fresh_database, open_space, report_figures
):
    workers = []
    for host in hosts:
        env = worker_env(
            host.amqp_url(fresh_vhost, heartbeat=HEARTBEAT),
            host.pg_dsn(fresh_database),
            consumers=CONSUMERS,
        )
        env["DATASPACE_CONNECT_TIMEOUT"] = "5"
        workers.append(host_workers(host, env))
        if len(workers) == 1:  # the first creates the schema; the others start together
            workers[0].wait_for(CONSUMING, 60)
    for worker in workers[1:]:
        worker.wait_for(CONSUMING, 60)
    victim, cut_host = workers[0], hosts[0]
    others = workers[1:]

    space = open_space(fresh_vhost, TIMEOUT)
    name = f"fault-hosts-{uuid.uuid4().hex[:8]}"
    sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))

    load = Load(space, sequence_id, name, TIMEOUT, threads=THREADS)
    load.start()
    phases: dict = {}
    problems: list[str] = []
    cut_at = dropped_at = restored_at = None
    try:
        reached, _ = load.wait_for_acks(WARMUP_ACKS, 30)
        assert reached, f"the load did not get going; first worker:\n{tail(victim.output)}"
        served, _ = _wait(lambda: all(w.requests() for w in workers), 10)
        phases["requests_per_host_before_cut"] = [w.requests() for w in workers]
        assert served, f"not every host served requests: {phases}"

        amqp = cut_host.forwarders[AMQP_PORT]
        amqp_before = amqp.children()
        pg_ports = cut_host.forwarders[PG_PORT].upstream_ports()
        lines_at_cut = [len(w.lines) for w in workers]
        cut_at = time.monotonic()
        cut_host.cut()

        def acked_after_cut():
            return any(c.ok and c.started > cut_at for c in load.all_calls)

        flowing, _ = _wait(acked_after_cut, FIRST_ACK)
        if not flowing:
            problems.append(
                f"no call started after the cut was acknowledged within {FIRST_ACK:g} s"
            )

        # The broker dropped the connection when the cut host's AMQP forwarder has
        # no connection left (no new one can come while the link is down).
        gone, _ = _wait(lambda: not amqp.children(), DROP)
        if gone:
            dropped_at = time.monotonic()
        else:
            problems.append(f"the broker kept the cut worker's connection over {DROP:g} s")
        # Let the requeued requests go to the other hosts, with the link still down.
        time.sleep(max(0.0, (dropped_at or time.monotonic()) + HOLD - time.monotonic()))
        # The server's view of the cut worker's sessions does not change while the
        # link is down: nothing of theirs reaches it.
        sessions = _sessions(fresh_database, pg_ports)
        while_cut = [w.requests(n) for w, n in zip(workers, lines_at_cut, strict=True)]
        phases.update(
            cut_host=f"{cut_host.name} ({cut_host.address})",
            amqp_connections_of_cut_host_before=len(amqp_before),
            requests_per_host_while_cut=while_cut,
            **{f"while_cut_{k}": v for k, v in sessions.items()},
        )
        idle = [i + 2 for i, n in enumerate(while_cut[1:]) if not n]
        if idle:
            problems.append(f"host(s) {idle} handled no request while the link was down")

        lines_at_restore = len(victim.lines)
        consuming_before = victim.consuming_count()
        restored_at = time.monotonic()
        cut_host.restore()

        def back():
            if victim.proc.poll() is not None:
                return f"exited with code {victim.proc.returncode}"
            if victim.consuming_count() > consuming_before:
                return "reconnected and consuming"
            return None

        outcome, back_s = _wait(back, RECONNECT)
        phases.update(
            cut_worker_after_restore=outcome or f"neither within {RECONNECT:g} s",
            cut_worker_back_after_s=round(back_s, 2),
        )
        if outcome is None:
            problems.append(
                f"the cut worker neither consumed again nor exited within {RECONNECT:g} s "
                "of the link's return"
            )
        elif outcome.startswith("exited") and victim.proc.returncode != 0:
            problems.append(f"the cut worker {outcome} after the link came back")
        more_after, more_after_s = load.wait_for_acks(AFTER_RESTORE_ACKS, 30)
        if not more_after:
            problems.append(f"fewer than {AFTER_RESTORE_ACKS} acks within 30 s of the restore")
        phases.update(
            acks_after_restore_s=round(more_after_s, 2),
            cut_worker_requests_after_restore=victim.requests(lines_at_restore),
        )
    finally:
        hung = load.finish()
        if cut_at is not None and restored_at is None:
            cut_host.restore()  # so the worker can stop cleanly at teardown
    load_seconds = time.monotonic() - load.started_at

    calls = load.all_calls
    new_after_cut = [c for c in calls if c.ok and c.started > cut_at]
    # Calls sent before the broker dropped the cut worker's connection and still
    # waiting a second after the cut: the cut worker held them (the broker goes on
    # delivering to it until it declares it dead; another host answers in
    # milliseconds). Answered, they were answered by another host once the broker
    # had requeued them (or replayed, if the cut worker had committed them).
    dead_at = dropped_at or restored_at or float("inf")
    held = [
        c
        for c in calls
        if c.started < dead_at and c.started + c.elapsed > cut_at and c.elapsed > STALLED
    ]
    moved = [c for c in held if c.ok]
    end = restored_at or float("inf")
    while_cut = [c for c in calls if c.started > cut_at and c.started + c.elapsed < end]
    after_drop = [c for c in while_cut if dropped_at and c.started + c.elapsed > dropped_at]
    figures, verify_problems = verify(
        load,
        fresh_database,
        hung,
        hosts=len(hosts),
        consumers_per_worker=CONSUMERS,
        heartbeat=HEARTBEAT,
        cut_to_first_ack_by_another_host_s=round(
            min(c.started + c.elapsed for c in new_after_cut) - cut_at, 3
        )
        if new_after_cut
        else None,
        cut_to_broker_dropped_connection_s=round(dropped_at - cut_at, 2) if dropped_at else None,
        held_by_cut_worker=len(held),
        held_answered_by_others=len(moved),
        held_timed_out=sum(isinstance(c.error, DataSpaceTimeoutError) for c in held),
        held_answered_before_drop_seen=sum(
            c.started + c.elapsed < dropped_at for c in moved if dropped_at is not None
        ),
        cut_to_first_held_answered_s=round(min(c.started + c.elapsed for c in moved) - cut_at, 2)
        if moved
        else None,
        calls_while_cut=len(while_cut),
        acks_while_cut=sum(c.ok for c in while_cut),
        acks_while_cut_after_drop=sum(c.ok for c in after_drop),
        timeouts_while_cut=sum(isinstance(c.error, DataSpaceTimeoutError) for c in while_cut),
        link_cut_s=round(restored_at - cut_at, 2) if restored_at else None,
        **phases,
    )
    after = probe(space, sequence_id, within=15)
    lost = [
        line.split(": ", 1)[-1][:200]
        for line in victim.lines
        if " dataspace_worker" in line and (" lost: " in line or " unavailable " in line)
    ]
    exit_codes = []
    for worker in workers:
        try:
            exit_codes.append(worker.terminate(15))
        except subprocess.TimeoutExpired:
            exit_codes.append("no exit within 15 s of SIGTERM")
    figures.update(
        worker_replays=sum(" (replayed) in " in line for w in workers for line in list(w.lines)),
        cut_worker_connection_warnings=len(lost),
        cut_worker_connection_warning_samples=lost[:3],
        requests_per_host=[w.requests() for w in workers],
        exit_codes_on_sigterm=exit_codes,
        load_seconds=round(load_seconds, 1),
        probe_after=after,
        margin=MARGIN,
    )
    report_figures(figures)

    problems += verify_problems
    if not after["ok"]:
        problems.append(f"a new request after the restore failed: {after}")
    if exit_codes != [0] * len(workers):
        problems.append(f"workers did not stop cleanly on SIGTERM: {exit_codes}")
    blocked = phases.get("while_cut_of_which_blocked_by_cut_host", 0)
    if sum(c.ok for c in while_cut) < MIN_ACKS_WHILE_CUT:
        problems.append(f"fewer than {MIN_ACKS_WHILE_CUT} acks while the link was down")
    if dropped_at is not None and not any(c.ok for c in after_drop) and not blocked:
        problems.append(
            "no call was acknowledged between the broker dropping the cut worker's "
            "connection and the link's return"
        )
    # Without a transaction of the cut worker left open on the server, nothing
    # can keep another host from running what the cut worker held.
    open_on_server = {"active", "idle in transaction"} & set(
        phases.get("while_cut_cut_host_sessions", {})
    )
    if held and not moved and not open_on_server:
        problems.append(
            f"none of the {len(held)} calls the cut worker held was answered by another host "
            "(and it left no transaction open on the server)"
        )
    assert not problems, (
        "\n".join(problems)
        + f"\n\ncut worker output:\n{tail(victim.output)}"
        + "".join(f"\n\nworker {i} output:\n{tail(w.output)}" for i, w in enumerate(others, 2))
    )
