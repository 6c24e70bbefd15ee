"""Ordering lanes (docs/scaling.md, issue 7), with in-process worker pools.

- the topology a pool with ``lanes=4`` declares: the consistent-hash exchange, the
  lane queues (quorum, single active consumer) and their bindings;
- which requests a client with ``"lanes": True`` sends through ``dataspace.lanes``
  (those naming a task manager by sequence_id) and which through ``dataspace``;
- fire-and-forget chains (insert, then updates 1..N) for many task managers,
  interleaved, through two pools: every product ends at N, and a log of what
  PostgreSQL applied (a trigger on ``dataproduct``) is in order per product and
  per task manager; a read after one's own fire-and-forget writes sees them;
- ``WorkerPool.rebalance``: the first pool, active on every lane, hands lanes to
  the second one; both then deliver, and the order holds across the move.

- a lane handed over while its worker holds requests of it (rebalance under
  load, a worker stopping), and a request given back to its lane after a store
  outage, keep their order (these found three bugs, fixed in the pool, now
  worker_pool.py and its parts: handovers now close the lane's channel without
  cancelling its consumer first, and a retry gives the lane's whole window back).

The applied-sequence log (``applied_database``, ``check_applied``) lives in
tests/support/lanes.py, shared with tests/faults/test_lane_order.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pika
import pytest
from psycopg2 import extensions

from dataspace_client import DataSpace
from dataspace_core.protocol import (
    EXCHANGE,
    LANE_HEADER,
    LANE_QUEUE_PREFIX,
    LANE_WORKERS_QUEUE,
    LANES_EXCHANGE,
    OPERATIONS,
    REQUEST_QUEUE,
)
from tests import services
from tests.support.broker_admin import rabbitmqctl_json
from tests.support.contract import header, metadata
from tests.support.lanes import (
    Applied,
    applied_database,
    check_applied,
    label_sessions,
    lanes_space,
    publish_round,
    wait_until_applied,
    wait_until_settled,
)

pytestmark = pytest.mark.timeout(60)

LANES = 4


def message_counts(channel, queues: list[str]) -> dict[str, int]:
    """Messages ready in ``queues`` (a pika BlockingChannel's passive declares)."""
    return {q: channel.queue_declare(q, passive=True).method.message_count for q in queues}


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def applied_dsn(pg_dsn):
    """A database of this module's own whose ``applied_log`` records every product write."""
    with applied_database(extensions.make_dsn(pg_dsn, dbname="postgres")) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def lanes_vhost(amqp_url):
    """A vhost the ordering tests share (each starts and stops its own pools, and
    checks only its own task managers): one vhost instead of one per test saves
    seconds of rabbitmqctl."""
    with services.scratch_vhost(services.with_vhost(amqp_url, "/")) as url:
        if url.endswith("/%2F"):
            pytest.skip("needs rabbitmqctl to create a vhost")
        yield url


@pytest.fixture
def lane_pool(lanes_vhost, applied_dsn):
    """``lane_pool(tag)``: an in-process pool with LANES lanes on ``lanes_vhost``, its
    database sessions named ``tag``; stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(tag: str, **kwargs):
            kwargs.setdefault("consumers", 1)
            pool = stack.enter_context(
                services.running_pool(lanes_vhost, applied_dsn, lanes=LANES, **kwargs)
            )
            label_sessions(pool, tag)
            return pool

        yield start


# -- topology and routing -------------------------------------------------------------
#: operations that name a task manager by sequence_id: through the lanes
LANE_CALLS = {
    "insert": {
        "taskmanager_id": 7,
        "generation_id": 1,
        "key": "k",
        "value": b"v",
        "header": header(),
        "metadata": metadata(),
    },
    "update": {
        "taskmanager_id": 7,
        "generation_id": 1,
        "key": "k",
        "value": b"v",
        "header": header(),
        "metadata": metadata(),
    },
    "get_dataproduct": {"taskmanager_id": 7, "generation_id": 1, "key": "k"},
    "get_dataproducts": {"taskmanager_id": 7, "key": None},
    "get_datablock": {"taskmanager_id": 7, "generation_id": 1},
    "get_header": {"taskmanager_id": 7, "generation_id": 1, "key": "k"},
    "get_metadata": {"taskmanager_id": 7, "generation_id": 1, "key": "k"},
    "duplicate_datablock": {"taskmanager_id": 7, "generation_id": 1, "new_generation_id": 2},
    "delete": {"taskmanager_id": 7, "all_generations": False},
    "mark_expired": {"taskmanager_id": 7, "generation_id": 1, "key": "k", "expiry_time": 5},
    "mark_demented": {"taskmanager_id": 7, "keys": ["k"], "generation_id": 1},
}
#: operations that do not: through ``dataspace`` as before
PLAIN_CALLS = {
    "store_taskmanager": {
        "taskmanager_name": "tm",
        "taskmanager_id": "5D2B8D2A-1B1B-4B1B-8B1B-1B1B1B1B1B1B",
        "datestamp": None,
    },
    "get_taskmanager": {
        "taskmanager_name": "tm",
        "taskmanager_id": "5D2B8D2A-1B1B-4B1B-8B1B-1B1B1B1B1B1B",
    },
    "get_taskmanagers": {"taskmanager_name": "tm", "start_time": None, "end_time": None},
    "get_last_generation_id": {"taskmanager_name": "tm", "taskmanager_id": None},
    "delete_data_older_than": {"days": 30},
    "get_schema": {"table": None},
}


def test_every_operation_has_a_routing_case():
    assert set(LANE_CALLS) | set(PLAIN_CALLS) | {"create_tables", "reap"} == set(OPERATIONS)


def test_the_pool_declares_the_lanes(own_vhost, pool_factory):
    pool_factory(own_vhost, consumers=1, lanes=LANES)
    queues = {
        q["name"]: q
        for q in rabbitmqctl_json(own_vhost, "list_queues", "name", "type", "arguments")
    }
    bindings = {
        (b["source_name"], b["destination_name"], b["routing_key"])
        for b in rabbitmqctl_json(
            own_vhost, "list_bindings", "source_name", "destination_name", "routing_key"
        )
    }
    lane_names = [f"{LANE_QUEUE_PREFIX}{i}" for i in range(LANES)]
    assert sorted(q for q in queues if q.startswith(LANE_QUEUE_PREFIX)) == lane_names
    request_args = {a[0]: a[2] for a in queues[REQUEST_QUEUE]["arguments"]}
    for name in lane_names:
        assert queues[name]["type"] == "quorum"
        args = {a[0]: a[2] for a in queues[name]["arguments"]}
        # what a request queue has (delivery limit, dead-lettering), and one consumer
        assert args == {**request_args, "x-single-active-consumer": True}, name
        # weight 1 each on the hash ring: an even share of task managers
        assert (LANES_EXCHANGE, name, "1") in bindings
    assert queues[LANE_WORKERS_QUEUE]["type"] == "classic"  # forgets a lost node's consumers
    assert (LANES_EXCHANGE, LANE_WORKERS_QUEUE, "1") not in bindings  # it receives nothing
    assert not [b for b in bindings if b[0] == LANES_EXCHANGE and b[1] not in lane_names]
    assert (EXCHANGE, REQUEST_QUEUE, "data.#") in bindings

    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = connection.channel()
        # the broker accepts a redeclaration only with the same type
        channel.exchange_declare(LANES_EXCHANGE, "x-consistent-hash", durable=True)
        # one pool: the consumer of every lane, and one worker counted
        for name in [*lane_names, LANE_WORKERS_QUEUE]:
            assert channel.queue_declare(name, passive=True).method.consumer_count == 1, name
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.exchange_declare(LANES_EXCHANGE, "topic", durable=True)
        assert refused.value.reply_code == 406
    finally:
        connection.close()


def test_a_worker_counts_itself_again_when_the_census_queue_goes(own_vhost, pool_factory):
    """``dataspace.lanes.workers`` is transient: it goes with its node (deleted here,
    as the broker does then). The broker cancels the workers' consumers; each
    declares the queue again and is counted again."""
    pool = pool_factory(own_vhost, consumers=1, lanes=LANES)
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = connection.channel()
        channel.queue_delete(LANE_WORKERS_QUEUE)

        def counted():
            try:
                frame = channel.queue_declare(LANE_WORKERS_QUEUE, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                return None  # not there yet (the channel is closed: open another)
            return frame.method.consumer_count == 1

        back = False
        deadline = time.monotonic() + 10
        while not back and time.monotonic() < deadline:
            back = counted()
            if back is None:
                channel = connection.channel()
            time.sleep(0.1)
        assert back, "the worker did not declare and consume the census queue again"
        assert pool.rebalance() == []  # counted: one worker, every lane its share
        assert pool.connections_opened == 1  # no reconnection for it
    finally:
        connection.close()


def test_workers_are_counted_on_the_pools_own_connection(own_vhost, pool_factory, monkeypatch):
    """rebalance() runs every 5 s: it asks on the census channel, and opens no
    connection of its own (each would show in the broker's log and UI)."""
    first = pool_factory(own_vhost, consumers=1, lanes=LANES)

    def no_connection(*_args, **_kwargs):
        raise AssertionError("rebalance opened a connection")

    monkeypatch.setattr(pika, "BlockingConnection", no_connection)
    assert first.census.count() == 1
    monkeypatch.undo()
    second = pool_factory(own_vhost, consumers=1, lanes=LANES)
    monkeypatch.setattr(pika, "BlockingConnection", no_connection)
    counts, _ = services.poll(lambda: (first.census.count(), second.census.count()) == (2, 2), 10)
    assert counts, (first.census.count(), second.census.count())
    assert first.rebalance() == [] and second.rebalance() == []  # nothing delivered yet


def test_a_client_with_lanes_routes_by_task_manager(own_vhost):
    """Publish each operation once with nobody consuming, and see where it lands."""
    from dataspace_worker.topology import declare_blocking, topology

    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    declare_blocking(channel, topology(lanes=LANES))
    lane_names = [f"{LANE_QUEUE_PREFIX}{i}" for i in range(LANES)]
    queues = [REQUEST_QUEUE, *lane_names]

    landed: dict[tuple[bool, str], set[str]] = {}
    for lanes in (True, False):
        with lanes_space(own_vhost, lanes=lanes) as space:
            source = space.datasource
            assert source.lanes is lanes
            calls = [*LANE_CALLS.items(), *PLAIN_CALLS.items()]
            # a sequence_id given as text is the same task manager, and the same lane
            calls.append(("insert", {**LANE_CALLS["insert"], "taskmanager_id": " 7"}))
            for operation, args in calls:
                before = message_counts(channel, queues)
                source.publish(operation, args)
                source.flush(10)
                after = message_counts(channel, queues)
                landed[lanes, operation] = landed.get((lanes, operation), set()) | {
                    q for q in after if after[q] != before[q]
                }
            # the route itself: exchange and routing key
            for operation, args in LANE_CALLS.items():
                op = OPERATIONS[operation]
                route = source._route(op, {**args, "taskmanager_id": 7})
                plain = op.read_routing_key if op.fast_read else op.routing_key
                assert route == ((f"lane.{operation}", "7") if lanes else (plain, None))
                # what is published without waiting for a reply never takes it
                assert source._route(op, {**args, "taskmanager_id": 7}, call=False)[0] in (
                    f"lane.{operation}",
                    op.routing_key,
                )
            for operation, args in PLAIN_CALLS.items():
                op = OPERATIONS[operation]
                # no lane to go through: a read takes the fast read queue
                plain = op.read_routing_key if op.fast_read else op.routing_key
                assert source._route(op, args) == (plain, None)

    # one lane for task manager 7, the same for every operation that names it
    lane_of_7 = landed[True, "insert"]
    assert len(lane_of_7) == 1 and lane_of_7 <= set(lane_names)
    for operation in LANE_CALLS:
        assert landed[True, operation] == lane_of_7, operation
        assert landed[False, operation] == {REQUEST_QUEUE}, operation
    for operation in PLAIN_CALLS:
        assert landed[True, operation] == {REQUEST_QUEUE}, operation
        assert landed[False, operation] == {REQUEST_QUEUE}, operation

    # many task managers: each lane gets a fair share (the exchange hashes the keys)
    before = message_counts(channel, lane_names)
    channel.confirm_delivery()
    sequence_ids = range(1, 2001)
    for sequence_id in sequence_ids:  # as clients do: to the topic exchange, lane in a header
        channel.basic_publish(
            EXCHANGE,
            "lane.insert",
            b"{}",
            pika.BasicProperties(headers={LANE_HEADER: str(sequence_id)}),
        )
    after = message_counts(channel, lane_names)
    connection.close()
    counts = {q: after[q] - before[q] for q in lane_names}
    assert sum(counts.values()) == len(sequence_ids)
    fair = len(sequence_ids) / LANES
    assert all(0.7 * fair < n < 1.3 * fair for n in counts.values()), counts


# -- ordering ---------------------------------------------------------------------------
def _store_taskmanagers(space: DataSpace, count: int, prefix: str) -> list[int]:
    return [space.store_taskmanager(f"{prefix}-{i}", str(uuid.uuid4())) for i in range(count)]


def _assert_in_order(applied: Applied, off: dict) -> None:
    assert not off, f"{len(off)} products not at their last update, e.g. {list(off.items())[:5]}"
    assert not applied.out_of_order, f"applied out of order: {applied.out_of_order[:10]}"
    assert not applied.tm_out_of_order, (
        f"task managers out of order: {applied.tm_out_of_order[:10]}"
    )
    assert not applied.missing, f"numbers never applied: {list(applied.missing.items())[:5]}"


def _wait_for_every_lane(pool, within: float = 15) -> bool:
    """Poll (bounded) until each of the pool's lanes has delivered."""
    deadline = time.monotonic() + within
    while not all(c.last_delivery for c in pool.lanes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(c.last_delivery for c in pool.lanes)


def test_chains_through_two_pools_are_applied_in_order(lanes_vhost, lane_pool, applied_dsn):
    """Inserts, then updates 1..N, interleaved across task managers, fire-and-forget;
    the two pools share the lanes (the first gives half of them to the second once
    the inserts are in)."""
    first = lane_pool("A")
    lane_pool("B")
    tms_count, updates, keys = 40, 16, ("a", "b")
    with lanes_space(lanes_vhost) as space:
        tms = _store_taskmanagers(space, tms_count, "lane-order")
        producer = space.producer()
        publish_round(producer, tms, 0, keys)
        producer.flush(30)
        inserted = {(tm, key): 0 for tm in tms for key in keys}
        assert not wait_until_applied(applied_dsn, inserted, within=20)
        # lanes move while idle (see test_a_lane_moved_while_busy_keeps_its_order)
        assert _wait_for_every_lane(first), "the inserts did not reach every lane"
        assert len(first.rebalance()) == LANES // 2
        for number in range(1, updates + 1):  # interleaved across task managers
            publish_round(producer, tms, number, keys)
        producer.flush(30)
    chains = {(tm, key): updates for tm in tms for key in keys}

    off = wait_until_applied(applied_dsn, chains, within=30)
    applied = check_applied(applied_dsn, chains)
    print("two pools:", applied.figures())
    _assert_in_order(applied, off)
    assert applied.rows == len(chains) * (updates + 1) + len(applied.repeats)
    assert set(applied.by_worker) == {"A", "B"}

    # a read published after writes for the same task manager, by the same client,
    # passes the same lane behind them: no flush needed to read one's own writes
    stale = []
    with lanes_space(lanes_vhost) as space:
        producer = space.producer()
        for number in range(updates + 1, updates + 4):
            publish_round(producer, tms, number, keys[:1])
            for tm in tms:
                held = space.get_dataproduct(tm, 1, keys[0])
                if held != str(number).encode():
                    stale.append((tm, number, held))
        producer.flush(30)
    assert not stale, stale[:10]


def _wait_until_reopened(consumers, old_channels: dict, within: float = 10) -> None:
    """Poll (bounded) until each lane consumer consumes again on a new channel."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not all(
        c.channel is not None
        and c.channel is not old_channels[c.lane]
        and c.channel.is_open
        and c.consumer_tag
        for c in consumers
    ):
        time.sleep(0.05)


def test_rebalance_hands_lanes_over_and_keeps_the_order(lanes_vhost, lane_pool, applied_dsn):
    """Chains published before and after lanes move: the first pool, active on every
    lane, gives half of them to the second; both then deliver, and every chain is
    applied in order across the move. (The move happens with nothing in flight: a
    move under load is test_a_lane_moved_while_busy_keeps_its_order.)"""
    first = lane_pool("A")
    second = lane_pool("B")
    tms_count, keys, before, after_move = 40, ("k",), 6, 6
    with lanes_space(lanes_vhost) as space:
        tms = _store_taskmanagers(space, tms_count, "lane-move")
        producer = space.producer()
        for number in range(before):
            publish_round(producer, tms, number, keys)
        producer.flush(30)
        assert not wait_until_applied(
            applied_dsn, {(tm, k): before - 1 for tm in tms for k in keys}, within=20
        )
        # the first pool subscribed first: it is the active consumer of every lane
        assert _wait_for_every_lane(first), "traffic did not reach every lane"
        assert not any(c.last_delivery for c in second.lanes)
        assert second.rebalance() == []  # active nowhere: nothing to give

        old_channels = {c.lane: c.channel for c in first.lanes}
        given = first.rebalance()
        assert len(given) == LANES // 2, given  # two pools, four lanes: two each
        # the given lanes' channels closed, and opened again (back in the lane's line)
        _wait_until_reopened([c for c in first.lanes if c.lane in given], old_channels)
        reopened = time.monotonic()
        last = before + after_move - 1
        for number in range(before, last + 1):
            publish_round(producer, tms, number, keys)
        producer.flush(30)
    chains = {(tm, key): last for tm in tms for key in keys}

    off = wait_until_applied(applied_dsn, chains, within=30)
    applied = check_applied(applied_dsn, chains)
    delivering = {
        "A": sorted(c.lane for c in first.lanes if c.last_delivery > reopened),
        "B": sorted(c.lane for c in second.lanes if c.last_delivery > reopened),
    }
    print("rebalance:", {"given": given, "delivering_after": delivering, **applied.figures()})
    _assert_in_order(applied, off)
    # both pools deliver: the second on the lanes given, the first on the rest
    assert delivering["B"] == sorted(given)
    assert delivering["A"] == sorted(set(range(LANES)) - set(given))
    assert applied.handovers > 0 and set(applied.by_worker) == {"A", "B"}
    # the next look finds nothing more to give
    assert first.rebalance() == []


# -- hand-overs and retries under load -------------------------------------------
def _hold_store(pool) -> threading.Event:
    """Make the pool's database work wait (bounded) until the returned event is set:
    its consumers keep what they hold unacked, as a busy worker does."""
    datasource = pool.dispatcher.datasource
    real = datasource.execute_many
    release = threading.Event()

    def held(requests):
        release.wait(15)
        return real(requests)

    datasource.execute_many = held  # execute() goes through it too
    return release


def _publish_chains(space: DataSpace, tms: list[int], updates: int) -> None:
    """Chain after chain (not interleaved): a lane's queue holds runs of one product."""
    producer = space.producer()
    for tm in tms:
        for number in range(updates + 1):
            publish_round(producer, [tm], number, ("k",))
    producer.flush(30)


@contextlib.contextmanager
def _busy_lanes(lanes_vhost, lane_pool, prefix: str, updates: int):
    """Pools "A" and "B"; A holds requests of every lane unacked (its store waits)
    while chains of ``updates`` for 12 task managers wait in the lanes. Yields
    ``(A, B, tms)``; A's store is released on leaving."""
    first = lane_pool("A")
    second = lane_pool("B")
    with lanes_space(lanes_vhost) as space:
        # which lane a task manager hashes to is the broker's choice: 12 leave one of
        # 4 lanes empty one time in eight; chains of 4 more until every lane has some
        # (stored before the hold: a store that reached A would wait with it)
        spare = _store_taskmanagers(space, 48, prefix)
        tms, spare = spare[:12], spare[12:]
        release = _hold_store(first)
        try:
            _publish_chains(space, tms, updates)
            while not _wait_for_every_lane(first, within=2) and spare:
                more, spare = spare[:4], spare[4:]
                _publish_chains(space, more, updates)
                tms += more
            assert _wait_for_every_lane(first), (
                f"lanes of A that delivered: {[c.lane for c in first.lanes if c.last_delivery]}"
                f", of B: {[c.lane for c in second.lanes if c.last_delivery]}, {len(tms)} tms"
            )
            yield first, second, tms
        finally:
            release.set()


def _assert_chains_in_order(applied_dsn, tms: list[int], updates: int, label: str) -> None:
    chains = {(tm, "k"): updates for tm in tms}
    off = wait_until_settled(applied_dsn, chains)
    applied = check_applied(applied_dsn, chains)
    print(f"{label}:", applied.figures(), applied.out_of_order[:5])
    _assert_in_order(applied, off)


def test_a_lane_moved_while_busy_keeps_its_order(lanes_vhost, lane_pool, applied_dsn):
    """The first pool holds requests of every lane unacked (its store is slow) while
    more wait in the lanes; it gives two lanes away. The second pool must get the held
    requests first (returned to the lane), then the waiting ones."""
    updates = 20
    with _busy_lanes(lanes_vhost, lane_pool, "lane-busy", updates) as (first, second, tms):
        given = first.rebalance()
        assert len(given) == LANES // 2
        deadline = time.monotonic() + 5  # the second pool takes the given lanes
        while time.monotonic() < deadline and not all(
            c.last_delivery for c in second.lanes if c.lane in given
        ):
            time.sleep(0.05)
        time.sleep(0.3)
    _assert_chains_in_order(applied_dsn, tms, updates, f"busy move (given {given})")


def test_a_stopping_worker_hands_its_lanes_over_in_order(lanes_vhost, lane_pool, applied_dsn):
    """What SIGTERM does (``WorkerPool.stop``) while the pool holds requests of every
    lane: the requests it finishes must be applied before those the next pool gets."""
    updates = 20
    with _busy_lanes(lanes_vhost, lane_pool, "lane-stop", updates) as (first, second, tms):
        stopping = threading.Thread(target=first.stop, args=(10,), daemon=True)
        stopping.start()
        # a second for the second pool to take lanes over while the first one still
        # holds its requests (what the order must survive; a correct hand-over waits)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not all(c.last_delivery for c in second.lanes):
            time.sleep(0.05)
        time.sleep(0.3)
    stopping.join(15)
    _assert_chains_in_order(applied_dsn, tms, updates, "stopping")


def test_a_request_put_back_after_a_store_outage_keeps_its_place(
    lanes_vhost, lane_pool, applied_dsn
):
    """The store is unavailable (past the datasource's retry_timeout) while update 2
    runs; updates 3 and 4 arrive meanwhile. Update 2 is answered "retry" and goes back
    to its lane: it must still be applied before 3 and 4."""
    from dataspace_core.errors import DataSpaceConnectionError

    pool = lane_pool("R", prefetch=4)
    datasource = pool.dispatcher.datasource
    real = datasource.execute_many
    outage = threading.Event()

    def unavailable_once(requests):
        if not outage.is_set() and any(r[1].get("value") == b"2" for r in requests):
            outage.set()
            time.sleep(0.5)  # what a retry_timeout spends; later requests arrive
            raise DataSpaceConnectionError("database unavailable: (injected outage)")
        return real(requests)

    datasource.execute_many = unavailable_once  # execute() goes through it too
    with lanes_space(lanes_vhost) as space:
        (tm,) = _store_taskmanagers(space, 1, "lane-retry")
        producer = space.producer()
        publish_round(producer, [tm], 0, ("k",))
        publish_round(producer, [tm], 1, ("k",))
        producer.flush(10)
        assert not wait_until_applied(applied_dsn, {(tm, "k"): 1}, within=10)
        publish_round(producer, [tm], 2, ("k",))
        assert outage.wait(10)
        publish_round(producer, [tm], 3, ("k",))
        publish_round(producer, [tm], 4, ("k",))
        producer.flush(10)
    chains = {(tm, "k"): 4}
    # until the product holds 4 (after any update applied late), or nothing moves
    off = wait_until_settled(applied_dsn, chains, quiet=1.0)
    applied = check_applied(applied_dsn, chains)
    print("retry:", {"holds": off, **applied.figures(), "log": applied.out_of_order})
    _assert_in_order(applied, off)
