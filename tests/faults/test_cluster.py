"""A node of a three-node RabbitMQ cluster killed under load (issue 7).

The test starts its own cluster on this machine (``cluster.throwaway_cluster``:
three nodes, separate names, ports and data), a worker subprocess given all three
URLs (``DATASPACE_AMQP_URL``, comma-separated) and a client given all three (a
list). Both connect to the first node, which also leads the request queue, a
quorum queue with a member on every node. With writes running from several
client threads, that node is killed with SIGKILL. Then:

- calls go on being acknowledged, within a bounded time, through the other two
  nodes (the quorum queue elects a leader among them; worker and client
  reconnect to the next live address, and the client re-sends what it was
  waiting for, with the same message_id);
- the killed node is started again and rejoins: ``cluster_status`` reports three
  running nodes and the request queue three members online;
- PostgreSQL holds every acknowledged write exactly once with its value, and no
  doubled rows (``load.verify``).

With ordering lanes (the ``lanes`` variant, docs/scaling.md "Ordering"): the nodes
run the plugin ``rabbitmq_consistent_hash_exchange``, the worker has
``DATASPACE_LANES=8`` and the client ``"lanes": True``; the load is one thread per
lane, each on a task manager of that lane (``lane_load.probe_lanes``). The lane
queues are quorum queues with a member on every node, led by the first node. Besides
the checks above: every lane serves calls started after the kill while the node is
down (the worker, reconnected to another node, is the single active consumer of each
lane again, and the exchange routes through the surviving nodes); after the rejoin
every lane queue has three members online, every lane serves calls, and a new client
connected to the rejoined node gets an insert and a read through each lane.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest

from dataspace_core.protocol import LANE_QUEUE_PREFIX, REQUEST_QUEUE
from tests import services

from .cluster import throwaway_cluster
from .instances import InstanceError, InstanceUnavailable
from .lane_load import Loads, probe_lanes, taskmanager_per_lane, verify_loads
from .load import MARGIN, Load, probe
from .workers import tail, worker_env

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

SIZE = 3
TIMEOUT = 10.0  # each call's timeout: longer than a failover here, shorter than a node restart
THREADS = 5
WARMUP_ACKS = 300  # acknowledged calls before the kill
FAILOVER = 20.0  # seconds allowed from the kill to the first ack of a call started after it
AFTER_KILL = 4.0  # seconds of load on two nodes once calls flow again
REJOIN = 30.0  # seconds allowed for the restarted node to show as running and as a member
AFTER_REJOIN_ACKS = 100
LANES = 8  # DATASPACE_LANES of the worker in the lanes variant
LANES_PLUGIN = "rabbitmq_consistent_hash_exchange"


@pytest.fixture
def cluster(lanes):
    plugins = (LANES_PLUGIN,) if lanes else ()
    with contextlib.ExitStack() as stack:
        try:
            instance = stack.enter_context(throwaway_cluster(SIZE, plugins=plugins))
        except InstanceUnavailable as exc:
            pytest.skip(f"no throwaway RabbitMQ cluster here: {exc}")
        except InstanceError as exc:
            pytest.skip(f"a throwaway RabbitMQ cluster would not start here: {exc}")
        yield instance


def _wait(predicate, timeout: float, pause: float = 0.2):
    """Poll ``predicate`` until it returns something true; (value, seconds) or (None, s).
    A ``rabbitmqctl`` that fails while the cluster changes counts as not yet."""
    return services.poll(predicate, timeout, pause, suppress=(InstanceError,))


@pytest.mark.parametrize("lanes", [0, LANES], ids=["no-lanes", "lanes"])
def test_cluster_node_killed_under_load(
    lanes, cluster, fresh_database, start_worker, open_space, report_figures
):
    # With lanes: the lanes' task managers are chosen before the worker consumes them
    # (this declares the lane queues on the first node, as the worker would).
    lane_of = probe_lanes(cluster.urls[0], lanes) if lanes else {}
    # Several broker addresses: comma-separated for the worker, a list for the client.
    env = worker_env(",".join(cluster.urls), fresh_database)
    if lanes:
        env["DATASPACE_LANES"] = str(lanes)
    worker = start_worker(env, timeout=30)
    pid = worker.proc.pid

    queues = cluster.queues()
    lane_queues = [f"{LANE_QUEUE_PREFIX}{i}" for i in range(lanes)]
    nodes = sorted(n.node for n in cluster.nodes)
    for name in (REQUEST_QUEUE, *lane_queues):
        queue = queues.get(name)
        assert queue is not None, f"no queue {name} on the cluster"
        assert queue["type"] == "quorum", queue
        assert sorted(queue["members"]) == nodes, queue
        assert sorted(queue["online"]) == sorted(queue["members"]), queue

    name = f"fault-cluster-{uuid.uuid4().hex[:8]}"
    if lanes:  # one thread per lane, each on a task manager of that lane
        space = open_space(cluster.urls, TIMEOUT, lanes=True)
        per_lane = taskmanager_per_lane(space, lane_of, lanes, name)
        sequence_id = per_lane[0][0]
        load = Loads([Load(space, s, n, TIMEOUT, threads=1) for s, n in per_lane.values()])
        lane_load = {lane: load.loads[i] for i, lane in enumerate(per_lane)}
        phases_lanes = {
            "lane_leaders_before_kill": sorted(
                {queues[q]["leader"].split("@")[0][-1] for q in lane_queues}
            )
        }
    else:
        space = open_space(cluster.urls, TIMEOUT)
        sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))
        load = Load(space, sequence_id, name, TIMEOUT, threads=THREADS)
        phases_lanes = {}
    load.start()
    phases: dict = {**phases_lanes}
    early: list[str] = []
    queue_after = None
    try:
        reached, _ = load.wait_for_acks(WARMUP_ACKS, 30)
        assert reached, f"the load did not get going; worker output:\n{tail(worker.output)}"

        connections = cluster.connections()
        leader_before = cluster.queue(REQUEST_QUEUE)["leader"]
        # The node worker and client hold their connections on (the first, which
        # they all try first), which also leads the request queue when the worker
        # declared it there.
        victim = cluster.node_named(max(connections, key=lambda n: connections[n]))
        survivors = [n for n in cluster.nodes if n is not victim]
        phases.update(
            connections_before_kill={n.split("@")[0][-1]: c for n, c in connections.items()},
            killed=victim.node,
            leader_before_kill=leader_before,
        )

        lines_at_kill = len(worker.lines)
        killed_at = time.monotonic()
        victim.kill9()

        def new_leader():
            row = cluster.queue(REQUEST_QUEUE, via=survivors[0])
            return row and row["leader"] != victim.node and row["leader"] in row["online"] and row

        row, leader_s = _wait(new_leader, FAILOVER, pause=0.1)
        phases.update(
            leader_after_kill=row and row["leader"],
            leader_elected_s=round(leader_s, 2) if row else None,
        )

        def acked_after_kill():
            return any(c.ok and c.started > killed_at for c in load.all_calls)

        flowing, _ = _wait(acked_after_kill, FAILOVER - (time.monotonic() - killed_at), 0.05)
        if flowing:
            time.sleep(AFTER_KILL)
        else:  # reported below, after the node is back and the writes are checked
            early.append(
                f"no call started after the kill was acknowledged within {FAILOVER:g} s "
                "while the node was down"
            )
        running_while_down = cluster.running_nodes(via=survivors[0])

        restart_at = time.monotonic()
        victim.start()
        started_s = time.monotonic() - restart_at
        rejoin_s = started_s + cluster.wait_running(SIZE, REJOIN, via=survivors[0])

        def all_members_online():
            rows = cluster.queues(via=victim)
            row = rows.get(REQUEST_QUEUE)
            return (
                all(
                    q in rows and len(rows[q]["members"]) == SIZE and len(rows[q]["online"]) == SIZE
                    for q in (REQUEST_QUEUE, *lane_queues)
                )
                and row
            )

        queue_after, _ = _wait(all_members_online, REJOIN)
        member_s = time.monotonic() - restart_at
        rejoined_at = time.monotonic()
        more, more_s = load.wait_for_acks(AFTER_REJOIN_ACKS, 30)
        if lanes:  # every lane serves calls once the node is back (bounded)
            _wait(
                lambda: all(
                    any(c.ok and c.started > rejoined_at for c in one.all_calls)
                    for one in load.loads
                ),
                10,
                pause=0.1,
            )
        phases.update(
            running_while_down=len(running_while_down),
            node_start_s=round(started_s, 2),
            rejoin_s=round(rejoin_s, 2),
            queue_members_online_again_s=round(member_s, 2) if queue_after else None,
            queue_after_rejoin=queue_after,
            acks_after_rejoin_reached=more,
            acks_after_rejoin_s=round(more_s, 2),
        )
    finally:
        hung = load.finish()
    load_seconds = time.monotonic() - load.started_at

    calls = load.all_calls
    after_kill = [c for c in calls if c.ok and c.started + c.elapsed > killed_at]
    started_after = [c for c in calls if c.ok and c.started > killed_at]
    during_outage = [c for c in after_kill if c.started + c.elapsed < restart_at]
    figures, problems = verify_loads(
        load,
        fresh_database,
        hung,
        acks_after_kill=len(after_kill),
        acks_while_node_down=len(during_outage),
        kill_to_first_ack_s=round(min(c.started + c.elapsed for c in after_kill) - killed_at, 2)
        if after_kill
        else None,
        kill_to_first_ack_of_new_call_s=round(
            min(c.started + c.elapsed for c in started_after) - killed_at, 2
        )
        if started_after
        else None,
        **phases,
    )
    # Why the worker could not go on, if it could not: its reconnection warnings.
    refused = [
        line.split(" unavailable (", 1)[1].rsplit("); retrying", 1)[0][:200]
        for line in worker.lines[lines_at_kill:]
        if " dataspace_worker" in line and " unavailable (" in line
    ]
    # Replies to clients of the killed node, dropped by the guard (guarded_replies.py)
    # instead of taking the worker's connection down; and lanes handed over, which
    # a worker alone must never do (it would count workers of the node that is down).
    dropped = [line for line in worker.lines if "reply dropped:" in line]
    handovers = [line for line in worker.lines if "handing lanes" in line]
    figures.update(
        worker_reconnect_failures=len(refused),
        worker_reconnect_reasons=sorted(set(refused))[:4],
        worker_connections_lost=sum(
            "dataspace_worker.consumer: connection to " in line and " lost: " in line
            for line in worker.lines
        ),
        replies_dropped=len(dropped),
        lane_handovers=len(handovers),
    )
    after = probe(space, sequence_id, within=15)  # the same client object, all nodes up
    lane_problems: list[str] = []
    if lanes:
        down = {
            lane: sum(
                c.ok and killed_at < c.started and c.started + c.elapsed < restart_at
                for c in one.all_calls
            )
            for lane, one in lane_load.items()
        }
        rejoined = {
            lane: sum(c.ok and c.started > rejoined_at for c in one.all_calls)
            for lane, one in lane_load.items()
        }
        # A new client on the rejoined node: its lanes exchange routes to every lane.
        fresh = open_space([victim.url], 3, lanes=True)
        on_rejoined = {lane: probe(fresh, s, within=5) for lane, (s, _n) in per_lane.items()}
        figures.update(
            lanes=lanes,
            lane_acks_of_calls_started_while_node_down=down,
            lane_acks_after_rejoin=rejoined,
            lane_probes_via_rejoined_node_ok=sum(p["ok"] for p in on_rejoined.values()),
            lane_leaders_after_rejoin=sorted(
                {
                    row["leader"].split("@")[0][-1]
                    for q, row in cluster.queues().items()
                    if q in lane_queues
                }
            ),
        )
        if not all(down.values()):
            lane_problems.append(
                f"lanes {[lane for lane, n in down.items() if not n]} acknowledged no call "
                "started after the kill while the node was down"
            )
        if handovers:
            lane_problems.append(f"a worker alone handed lanes over: {handovers[:2]}")
        if not all(rejoined.values()):
            lane_problems.append(
                f"lanes {[lane for lane, n in rejoined.items() if not n]} acknowledged no "
                "call after the rejoin"
            )
        failed = {lane: p for lane, p in on_rejoined.items() if not p["ok"]}
        if failed:
            lane_problems.append(f"a client on the rejoined node failed on lanes: {failed}")
    restarted = worker.proc.poll() is not None or len(start_worker.workers) != 1
    figures.update(
        worker_replays=start_worker.replays(),
        worker_same_process=not restarted,
        load_seconds=round(load_seconds, 1),
        probe_after=after,
        margin=MARGIN,
    )
    report_figures(figures)

    problems = early + problems + lane_problems
    if not after["ok"]:
        problems.append(f"the same client could not serve a new request afterwards: {after}")
    if restarted:
        problems.append(f"the worker (pid {pid}) exited: code {worker.proc.poll()}")
    if not during_outage:
        problems.append("no call was acknowledged while the killed node was down")
    if phases["running_while_down"] != SIZE - 1:
        problems.append(f"{phases['running_while_down']} nodes running while one was down")
    if queue_after is None:
        problems.append(f"the request (and lane) queues did not get {SIZE} members online again")
    if not more:
        problems.append(f"fewer than {AFTER_REJOIN_ACKS} acks within 30 s after the rejoin")
    assert not problems, "\n".join(problems) + f"\n\nworker output:\n{tail(worker.output)}"
