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

With ordering lanes (the ``lanes`` variant, docs/scaling.md "Ordering"): every
worker has ``DATASPACE_LANES=8`` and the client ``"lanes": True``; the load is one
thread per lane, each writing into a task manager of its own chosen (by
``probe_lanes``, through the real ``dataspace.lanes`` exchange before any worker
consumes) so that every lane carries traffic. Before the cut the lanes must have
spread (each host the single active consumer of at most ``ceil(8 / 3)`` lanes, the
cut host of some); after the broker dropped the cut worker's connection, every lane
the cut host was active on has an active consumer on another host (the broker's
view: ``list_consumers`` -> channel -> connection -> peer port, which is the port a
host's AMQP forwarder connects from), and calls for the task managers of those lanes
are acknowledged (while the link is still down; or, when a transaction the cut worker
left open on the server blocks the head of such a lane, once the link is back).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urlsplit

import psycopg2
import pytest

from dataspace_client import DataSpaceTimeoutError
from dataspace_core.protocol import LANE_QUEUE_PREFIX
from tests import services
from tests.support.worker_process import WorkerProcess

from .lane_load import Loads, probe_lanes, taskmanager_per_lane, verify_loads
from .load import MARGIN, Load, probe
from .netns import AMQP_PORT, PG_PORT, NetnsUnavailable, WorkerHost, unavailable, worker_host
from .workers import CONSUMING, WorkerStarter, tail, worker_env

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

# -- the lanes variant ------------------------------------------------------------------
LANES = 8  # DATASPACE_LANES of every worker: more lanes than hosts, one load thread each
SPREAD = 30.0  # seconds allowed, once the load runs, for the lanes to spread over the hosts
LANES_MOVED = 15.0  # seconds allowed, after the drop, for every lane to be active elsewhere
LANE_ACKS = 3  # acks wanted, per lane of the cut host, of calls started after the drop
LANE_ACKS_WITHIN = 10.0  # seconds allowed for them, the link still down

#: a request line of a worker: "<operation> <outcome>[ (replayed)] in <ms> ms (correlation"
REQUEST_LINE = re.compile(r"dataspace_worker\.consumer: \w+ \w+( \(replayed\))? in [\d.]+ ms")


# -- ordering lanes: the broker's view ----------------------------------------------
def _ctl_json(*args: str) -> list[dict]:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args, "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
    return json.loads(result.stdout or "[]")


def lane_owners(vhost_url: str, hosts: list[WorkerHost]) -> dict[int, int | None]:
    """The broker's view: for each lane with an active consumer, the index of the host
    whose worker it is (None: a connection of no host, e.g. one being opened). A host's
    connections are those of its AMQP forwarder: the broker sees them from 127.0.0.1, on
    the ports the forwarder connects from."""
    vhost = unquote(urlsplit(vhost_url).path.lstrip("/")) or "/"
    with ThreadPoolExecutor(3) as pool:
        consumers = pool.submit(
            _ctl_json, "list_consumers", "-p", vhost, "queue_name", "channel_pid", "active"
        )
        channels = pool.submit(_ctl_json, "list_channels", "pid", "connection")
        connections = pool.submit(_ctl_json, "list_connections", "pid", "peer_port")
        consumers, channels, connections = (f.result() for f in (consumers, channels, connections))
    ports = [host.forwarders[AMQP_PORT].upstream_ports() for host in hosts]
    port_of = {c["pid"]: c["peer_port"] for c in connections}
    connection_of = {c["pid"]: c["connection"] for c in channels}
    owners: dict[int, int | None] = {}
    for consumer in consumers:
        name = consumer["queue_name"]
        if not consumer["active"] or not name.startswith(LANE_QUEUE_PREFIX):
            continue
        port = port_of.get(connection_of.get(consumer["channel_pid"]))
        owners[int(name[len(LANE_QUEUE_PREFIX) :])] = next(
            (i for i, p in enumerate(ports) if port in p), None
        )
    return owners


def try_lane_owners(vhost_url: str, hosts: list[WorkerHost]) -> dict[int, int | None] | None:
    """``lane_owners``, or None when ``rabbitmqctl`` failed (for polling)."""
    try:
        return lane_owners(vhost_url, hosts)
    except (RuntimeError, ValueError, subprocess.SubprocessError):
        return None


def lanes_by_host(owners: dict[int, int | None], hosts: int) -> list[list[int]]:
    return [sorted(lane for lane, h in owners.items() if h == i) for i in range(hosts)]


class HostWorker(WorkerProcess):
    """``dataspace-worker`` run inside a worker host's namespace."""

    def __init__(self, host: WorkerHost, env: dict):
        self.host = host
        super().__init__(env, wrap=host.command)

    def requests(self, since: int = 0) -> int:
        """Request lines logged (from line ``since`` on)."""
        return sum(bool(REQUEST_LINE.search(line)) for line in self.lines[since:])

    def consuming_count(self) -> int:
        return sum(CONSUMING in line for line in list(self.lines))


def _wait(predicate, timeout: float, pause: float = 0.05):
    """Poll ``predicate`` until it returns something true; (value, seconds) or (None, s)."""
    return services.poll(predicate, timeout, pause)


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
    starter = WorkerStarter()
    starter.workers = workers
    starter.stop_all()


@pytest.mark.parametrize("lanes", [0, LANES], ids=["no-lanes", "lanes"])
def test_host_link_cut_under_load(
    lanes,
    hosts,
    host_workers,
    fresh_vhost,
    fresh_database,
    open_space,
    report_figures,
):
    # With lanes: the lanes' task managers are chosen before any worker consumes them.
    lane_of = probe_lanes(fresh_vhost, lanes) if lanes else {}
    workers = []
    for host in hosts:
        env = worker_env(
            host.amqp_url(fresh_vhost, heartbeat=HEARTBEAT),
            host.pg_dsn(fresh_database),
            consumers=CONSUMERS,
        )
        env["DATASPACE_CONNECT_TIMEOUT"] = "5"
        if lanes:
            env["DATASPACE_LANES"] = str(lanes)
        workers.append(host_workers(host, env))
        if len(workers) == 1:  # the first creates the schema; the others start together
            workers[0].wait_for(CONSUMING, 60)
    for worker in workers[1:]:
        worker.wait_for(CONSUMING, 60)
    victim, cut_host = workers[0], hosts[0]
    others = workers[1:]

    name = f"fault-hosts-{uuid.uuid4().hex[:8]}"
    if lanes:  # one thread per lane, each on a task manager of that lane
        space = open_space(fresh_vhost, TIMEOUT, lanes=True)
        per_lane = taskmanager_per_lane(space, lane_of, lanes, name)
        sequence_id = per_lane[0][0]
        load = Loads([Load(space, s, n, TIMEOUT, threads=1) for s, n in per_lane.values()])
        lane_load = {lane: load.loads[i] for i, lane in enumerate(per_lane)}
    else:
        space = open_space(fresh_vhost, TIMEOUT)
        sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))
        load = Load(space, sequence_id, name, TIMEOUT, threads=THREADS)
    load.start()
    phases: dict = {}
    problems: list[str] = []
    cut_at = dropped_at = restored_at = None
    cut_lanes: list[int] = []
    lanes_moved_at = None
    try:
        reached, _ = load.wait_for_acks(WARMUP_ACKS, 30)
        assert reached, f"the load did not get going; first worker:\n{tail(victim.output)}"
        if lanes:
            # The first worker subscribed first: active on every lane until it hands
            # the lanes over its share (ceil(lanes / hosts)) to the others.
            share = -(-lanes // len(hosts))

            def spread():
                owners = try_lane_owners(fresh_vhost, hosts) or {}
                by_host = lanes_by_host(owners, len(hosts))
                return (
                    len(owners) == lanes
                    and None not in owners.values()
                    and all(0 < len(mine) <= share for mine in by_host)
                    and by_host
                )

            by_host, spread_s = _wait(spread, SPREAD, pause=0.5)
            phases.update(lanes_spread_s=round(spread_s, 2), lanes_per_host_before_cut=by_host)
            assert by_host, (
                f"the lanes did not spread over the hosts within {SPREAD:g} s: "
                f"{try_lane_owners(fresh_vhost, hosts)}\nfirst worker:\n{tail(victim.output)}"
            )
            cut_lanes = by_host[0]
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
        if lanes and dropped_at is not None:
            # The broker makes the next subscriber of each of the cut host's lanes
            # its active consumer: a worker of another host.
            def moved():
                owners = try_lane_owners(fresh_vhost, hosts) or {}
                return (
                    len(owners) == lanes
                    and all(h is not None and h != 0 for h in owners.values())
                    and owners
                )

            owners, _ = _wait(moved, LANES_MOVED, pause=0.2)
            if owners:
                lanes_moved_at = time.monotonic()
                phases.update(
                    drop_to_lanes_moved_s=round(lanes_moved_at - dropped_at, 2),
                    lanes_per_host_after_drop=lanes_by_host(owners, len(hosts)),
                )
            else:
                problems.append(
                    f"the cut host's lanes {cut_lanes} had no active consumer on another "
                    f"host {LANES_MOVED:g} s after the drop: {try_lane_owners(fresh_vhost, hosts)}"
                )

            # Calls for the task managers of those lanes, started after the drop.
            def lane_acks() -> dict[int, int]:
                return {
                    lane: sum(c.ok and c.started > dropped_at for c in lane_load[lane].all_calls)
                    for lane in cut_lanes
                }

            _wait(lambda: min(lane_acks().values()) >= LANE_ACKS, LANE_ACKS_WITHIN)
            phases["cut_lanes_acks_after_drop_while_cut"] = lane_acks()
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
        if lanes:
            phases["lanes_per_host_at_end"] = lanes_by_host(
                try_lane_owners(fresh_vhost, hosts) or {}, len(hosts)
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
    figures, verify_problems = verify_loads(
        load,
        fresh_database,
        hung,
        hosts=len(hosts),
        lanes=lanes,
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
    blocked = phases.get("while_cut_of_which_blocked_by_cut_host", 0)
    lane_problems: list[str] = []
    if lanes and cut_lanes and dropped_at is not None:
        # Each of the cut host's lanes served calls started after the drop: while the
        # link was down, or after its return when a transaction the cut worker left
        # open on the server blocked the head of the lane (its claim: docstring).
        stuck = {
            lane: [c for c in lane_load[lane].all_calls if c.started > dropped_at]
            for lane in cut_lanes
        }
        never = [lane for lane, calls in stuck.items() if not any(c.ok for c in calls)]
        late = [
            lane
            for lane, calls in stuck.items()
            if not any(c.ok and c.started + c.elapsed < restored_at for c in calls)
        ]
        figures.update(cut_lanes=cut_lanes, cut_lanes_served_only_after_restore=late)
        if never:
            lane_problems.append(f"lanes {never} of the cut host served no call after the drop")
        if late and not blocked:
            lane_problems.append(
                f"lanes {late} of the cut host served no call while the link was down "
                "(and no transaction of the cut worker blocked another host)"
            )
    report_figures(figures)

    problems += verify_problems + lane_problems
    if not after["ok"]:
        problems.append(f"a new request after the restore failed: {after}")
    if exit_codes != [0] * len(workers):
        problems.append(f"workers did not stop cleanly on SIGTERM: {exit_codes}")
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
