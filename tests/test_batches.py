"""The worker runs a batch of requests (what its prefetch window holds) in one
transaction: ``Dispatcher.handle_batch`` and ``PostgresDataSource.execute_many``.

Most tests drive the dispatcher directly, with no broker: a batch commits once
(all its rows share one ``xmin``), replays as a whole, records the replies that
are not known in advance, and when one request of it fails, runs each request
alone so that the failure is that request's only. The last test goes through a
real worker pool and checks that batching happens there.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

import pika
import pytest

from dataspace_client import DataSpace, DataSpaceExistsError
from dataspace_core import validate
from dataspace_core.batches import MAX_ITEMS
from dataspace_core.protocol import OPERATIONS, decode_reply, encode_request
from dataspace_worker import queries as operations
from dataspace_worker.dispatch import Dispatcher, Outcome, Request
from dataspace_worker.postgres import PostgresDataSource
from dataspace_worker.topology import declare_blocking, topology
from tests.support.configs import remote_config
from tests.support.contract import fresh, header, metadata, new_uuid, sql_rows

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def source(pg_dsn):
    datasource = PostgresDataSource({"dsn": pg_dsn, "pool_size": 2})
    yield datasource
    datasource.close()


@pytest.fixture
def dispatcher(source) -> Dispatcher:
    return Dispatcher(source)


@pytest.fixture
def batches(source, monkeypatch) -> list[list[str]]:
    """The operations of every ``execute_many`` call (each one transaction)."""
    calls: list[list[str]] = []
    real = source.execute_many

    def spy(requests):
        calls.append([r[0] for r in requests])
        return real(requests)

    monkeypatch.setattr(source, "execute_many", spy)
    return calls


def _mid() -> str:
    return uuid.uuid4().hex


def _request(operation: str, message_id: str | None = None, **args) -> Request:
    body = encode_request(OPERATIONS[operation], validate.check(operation, args))
    return Request(body, message_id)


def _write(operation, seq: int, generation: int, key: str, value: bytes, message_id) -> Request:
    return _request(
        operation,
        message_id,
        taskmanager_id=seq,
        generation_id=generation,
        key=key,
        value=value,
        header=header(),
        metadata=metadata(),
    )


def _insert(*args) -> Request:
    return _write("insert", *args)


def _update(*args) -> Request:
    return _write("update", *args)


def _store(name: str, taskmanager_id: str, message_id: str) -> Request:
    return _request(
        "store_taskmanager",
        message_id,
        taskmanager_name=name,
        taskmanager_id=taskmanager_id,
        datestamp=None,
    )


def _result(outcome: Outcome):
    """What the client gets from the outcome's reply (raises the error it carries)."""
    return decode_reply(OPERATIONS[outcome.operation], outcome.body)


def _request_log(pg_dsn: str, ids: list[str]) -> dict[str, tuple[str, bytes]]:
    rows = sql_rows(
        pg_dsn,
        "SELECT message_id, operation, reply FROM dataspace_request WHERE message_id = ANY(%s)",
        (ids,),
    )
    return {m: (op, bytes(reply)) for m, op, reply in rows}


def _xmins(pg_dsn: str, seq: int) -> dict[str, str]:
    """key -> id of the transaction that wrote the product (its row's xmin)."""
    rows = sql_rows(
        pg_dsn, "SELECT key, xmin::text FROM dataproduct WHERE taskmanager_id = %s", (seq,)
    )
    return dict(rows)


def _writers(pg_dsn: str, seq: int) -> set[str]:
    """Transactions that wrote any product, header or metadata row of ``seq``."""
    rows = sql_rows(
        pg_dsn,
        "SELECT xmin::text FROM dataproduct WHERE taskmanager_id = %(s)s "
        "UNION SELECT xmin::text FROM header WHERE taskmanager_id = %(s)s "
        "UNION SELECT xmin::text FROM metadata WHERE taskmanager_id = %(s)s",
        {"s": seq},
    )
    return {r[0] for r in rows}


def _new_taskmanager(source) -> int:
    return source.store_taskmanager(fresh("batch"), new_uuid())


# -- one transaction per batch -------------------------------------------------------
def test_a_batch_of_inserts_commits_once_and_replays_as_a_whole(
    dispatcher, source, batches, pg_dsn
):
    seq = _new_taskmanager(source)
    ids = [_mid() for _ in range(20)]
    batch = [_insert(seq, 1, f"k{i:02d}", f"v{i}".encode(), ids[i]) for i in range(20)]

    first = dispatcher.handle_batch(batch)

    assert [(o.operation, o.code, o.replayed) for o in first] == [("insert", "ok", False)] * 20
    assert all(_result(o) is None for o in first)
    assert batches == [["insert"] * 20]  # one execute_many: one transaction
    assert source.get_datablock(seq, 1) == {f"k{i:02d}": f"v{i}".encode() for i in range(20)}
    writers = _writers(pg_dsn, seq)
    assert len(writers) == 1, "products, headers and metadata of a batch commit together"
    log = _request_log(pg_dsn, ids)
    assert log == {m: ("insert", o.body) for m, o in zip(ids, first)}

    again = dispatcher.handle_batch(batch)

    assert [(o.code, o.replayed) for o in again] == [("ok", True)] * 20
    assert [o.body for o in again] == [o.body for o in first]
    assert len(source.get_datablock(seq, 1)) == 20
    assert _writers(pg_dsn, seq) == writers, "a replayed batch wrote rows again"
    assert _request_log(pg_dsn, ids) == log


def test_replies_not_known_in_advance_are_recorded_in_a_batch(dispatcher, source, pg_dsn, batches):
    """store_taskmanager returns the new id: a batch records it in the request log, and a
    replay returns that id without storing a second task manager."""
    seq = _new_taskmanager(source)
    names = [fresh("batch-tm"), fresh("batch-tm")]
    ids = [_mid() for _ in range(4)]
    batch = [
        _store(names[0], "A", ids[0]),
        _insert(seq, 1, "k", b"v", ids[1]),
        _store(names[1], "B", ids[2]),
        _request("delete", ids[3], taskmanager_id=seq, all_generations=False),
    ]

    first = dispatcher.handle_batch(batch)

    assert [o.code for o in first] == ["ok"] * 4
    assert len(batches) == 1
    new_ids = [_result(first[0]), _result(first[2])]
    assert all(type(i) is int for i in new_ids) and new_ids[0] < new_ids[1]
    assert [source.get_taskmanager(n)["sequence_id"] for n in names] == new_ids
    assert _result(first[3]) == 1  # the insert before it in the batch was visible
    assert source.get_datablock(seq, 1) == {}
    log = _request_log(pg_dsn, ids)
    assert {m: log[m] for m in ids} == {m: (o.operation, o.body) for m, o in zip(ids, first)}

    again = dispatcher.handle_batch(batch)

    assert [(o.code, o.replayed) for o in again] == [("ok", True)] * 4
    assert [_result(again[0]), _result(again[2])] == new_ids
    assert _result(again[3]) == 1  # the stored count, not a second delete
    for name in names:
        ((count,),) = sql_rows(pg_dsn, "SELECT count(*) FROM taskmanager WHERE name = %s", (name,))
        assert count == 1


# -- a failing request: each runs alone ------------------------------------------------
def test_a_failing_request_makes_each_run_alone_with_its_own_outcome(
    dispatcher, source, pg_dsn, batches
):
    seq = _new_taskmanager(source)
    name = fresh("batch-fallback")
    ids = {n: _mid() for n in ("k0", "k1", "missing", "tm", "k2")}
    batch = [
        _insert(seq, 1, "k0", b"v0", ids["k0"]),
        _insert(seq, 1, "k1", b"v1", ids["k1"]),
        _update(seq, 1, "missing", b"x", ids["missing"]),
        _store(name, "FB", ids["tm"]),
        _request("get_dataproduct", None, taskmanager_id=seq, generation_id=1, key="k0"),
        _insert(seq, 1, "k2", b"v2", ids["k2"]),
    ]

    outcomes = dispatcher.handle_batch(batch)

    assert [(o.operation, o.code) for o in outcomes] == [
        ("insert", "ok"),
        ("insert", "ok"),
        ("update", "not_found"),
        ("store_taskmanager", "ok"),
        ("get_dataproduct", "ok"),
        ("insert", "ok"),
    ]
    # the batch transaction was tried once, then each transactional request alone
    assert batches[0] == [
        "insert",
        "insert",
        "update",
        "store_taskmanager",
        "get_dataproduct",
        "insert",
    ]
    assert [len(b) for b in batches[1:]] == [1] * 6
    failed = outcomes[2]
    assert "no product 'missing'" in failed.reason and f"task manager {seq}" in failed.reason
    with pytest.raises(KeyError, match="no product 'missing'"):
        _result(failed)
    assert not failed.retry and not failed.poison
    assert failed.dead_letter(None) and not failed.dead_letter("amq.rabbitmq.reply-to")
    new_seq = _result(outcomes[3])
    assert source.get_taskmanager(name)["sequence_id"] == new_seq
    assert _result(outcomes[4]) == b"v0"  # sees the insert before it in the batch
    assert source.get_datablock(seq, 1) == {"k0": b"v0", "k1": b"v1", "k2": b"v2"}
    xmins = _xmins(pg_dsn, seq)
    assert len(set(xmins.values())) == 3, "each insert in a transaction of its own"
    log = _request_log(pg_dsn, list(ids.values()))
    assert ids["missing"] not in log, "a failed write must leave no idempotency record"
    assert log[ids["tm"]] == ("store_taskmanager", outcomes[3].body)
    assert set(log) == set(ids.values()) - {ids["missing"]}

    again = dispatcher.handle_batch(batch)

    assert [(o.code, o.replayed) for o in again] == [
        ("ok", True),
        ("ok", True),
        ("not_found", False),  # not recorded: it runs (and fails) again
        ("ok", True),
        ("ok", False),
        ("ok", True),
    ]
    assert _result(again[3]) == new_seq
    ((count,),) = sql_rows(pg_dsn, "SELECT count(*) FROM taskmanager WHERE name = %s", (name,))
    assert count == 1
    assert _xmins(pg_dsn, seq) == xmins


def test_a_duplicate_insert_in_a_batch_fails_alone(dispatcher, source):
    """Two different requests inserting the same product: the batch fails on the unique
    key, and run alone the first succeeds and the second reports 'exists'."""
    seq = _new_taskmanager(source)
    outcomes = dispatcher.handle_batch(
        [
            _insert(seq, 1, "a", b"first", _mid()),
            _insert(seq, 1, "a", b"second", _mid()),
            _insert(seq, 1, "b", b"b", _mid()),
        ]
    )
    assert [o.code for o in outcomes] == ["ok", "exists", "ok"]
    with pytest.raises(DataSpaceExistsError):
        _result(outcomes[1])
    assert source.get_datablock(seq, 1) == {"a": b"first", "b": b"b"}


# -- message ids within a batch ----------------------------------------------------------
def test_the_same_message_id_twice_in_one_batch_is_applied_once(dispatcher, source, pg_dsn):
    seq = _new_taskmanager(source)
    name = fresh("batch-twice")
    x, y, z = _mid(), _mid(), _mid()
    store = _store(name, "TW", y)
    batch = [
        _insert(seq, 1, "k0", b"v0", x),
        store,
        _insert(seq, 1, "k1", b"v1", z),
        _insert(seq, 1, "k0", b"v0", x),  # a redelivered copy
        store,
    ]

    outcomes = dispatcher.handle_batch(batch)

    assert [(o.code, o.replayed) for o in outcomes] == [
        ("ok", False),
        ("ok", False),
        ("ok", False),
        ("ok", True),
        ("ok", True),
    ]
    assert (
        _result(outcomes[4]) == _result(outcomes[1]) == source.get_taskmanager(name)["sequence_id"]
    )
    assert source.get_datablock(seq, 1) == {"k0": b"v0", "k1": b"v1"}
    ((count,),) = sql_rows(pg_dsn, "SELECT count(*) FROM taskmanager WHERE name = %s", (name,))
    assert count == 1


def test_a_message_id_reused_by_another_operation_is_refused_alone(dispatcher, source):
    seq = _new_taskmanager(source)
    x, y, z = _mid(), _mid(), _mid()

    # within one batch: the insert takes the id, the update reusing it is refused
    outcomes = dispatcher.handle_batch(
        [
            _insert(seq, 1, "k0", b"v0", x),
            _insert(seq, 1, "k1", b"v1", y),
            _update(seq, 1, "k0", b"changed", x),
            _insert(seq, 1, "k2", b"v2", z),
        ]
    )
    assert [o.code for o in outcomes] == ["ok", "ok", "bad_request", "ok"]
    refused = outcomes[2]
    assert refused.poison and refused.operation == "update"
    assert "already used by a insert request" in refused.reason
    assert source.get_datablock(seq, 1) == {"k0": b"v0", "k1": b"v1", "k2": b"v2"}

    # an id from an earlier batch, reused by another operation inside a later batch
    expiration = source.get_header(seq, 1, "k0")[5]
    outcomes = dispatcher.handle_batch(
        [
            _insert(seq, 1, "k3", b"v3", _mid()),
            _request(
                "mark_expired", x, taskmanager_id=seq, generation_id=1, key="k0", expiry_time=7
            ),
            _insert(seq, 1, "k4", b"v4", _mid()),
        ]
    )
    assert [(o.operation, o.code) for o in outcomes] == [
        ("insert", "ok"),
        ("mark_expired", "bad_request"),
        ("insert", "ok"),
    ]
    assert "already used by a insert request" in outcomes[1].reason
    assert source.get_header(seq, 1, "k0")[5] == expiration
    assert set(source.get_datablock(seq, 1)) == {"k0", "k1", "k2", "k3", "k4"}


def test_a_malformed_request_in_a_batch_is_refused_and_the_rest_applied(dispatcher, source):
    seq = _new_taskmanager(source)
    outcomes = dispatcher.handle_batch(
        [
            _insert(seq, 1, "a", b"a", _mid()),
            Request(b"\x00 not a request", _mid()),
            _insert(seq, 1, "b", b"b", None),  # a write without its idempotency key
            _insert(seq, 1, "c", b"c", _mid()),
        ]
    )
    assert [o.code for o in outcomes] == ["ok", "bad_request", "bad_request", "ok"]
    assert all(o.poison for o in outcomes[1:3])
    assert "needs a message_id" in outcomes[2].reason
    assert source.get_datablock(seq, 1) == {"a": b"a", "c": b"c"}


def test_a_write_refused_for_its_missing_message_id_is_named_by_its_operation(dispatcher):
    outcome = dispatcher.handle(_insert(1, 1, "k", b"v", None).body, None)
    assert outcome.code == "bad_request"
    assert outcome.operation == "insert"


# -- order -----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_failure", [False, True], ids=["one-transaction", "one-by-one"])
def test_inserts_keep_the_batch_order(dispatcher, source, batches, with_failure):
    seq = _new_taskmanager(source)
    rng = random.Random(20261201)
    keys = rng.sample([f"key-{i:02d}" for i in range(30)], 30)  # not in sorted order
    order = [(1 + i % 2, key) for i, key in enumerate(keys)]
    batch = [_insert(seq, g, k, k.encode(), _mid()) for g, k in order]
    if with_failure:
        batch.insert(15, _update(seq, 1, "missing", b"x", _mid()))

    outcomes = dispatcher.handle_batch(batch)

    assert [o.code for o in outcomes].count("ok") == 30
    assert len(batches) == (1 + len(batch) if with_failure else 1)
    products = source.get_dataproducts(seq)
    assert [(p["generation_id"], p["key"]) for p in products] == order
    assert [p["value"] for p in products] == [k.encode() for _, k in order]


# -- through a real worker pool ------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True], ids=["one-message-each", "batch-messages"])
def test_a_worker_runs_its_prefetch_window_in_few_transactions(
    own_vhost, pool_factory, source, pg_dsn, monkeypatch, batched
):
    """300 fire-and-forget inserts wait in the queue when a worker with one consumer
    and prefetch 50 starts: it applies them in a handful of transactions of at most
    50 requests (sent one message each) or of one batch message's requests (at most
    ``MAX_ITEMS``), in the order published."""
    sizes: list[int] = []
    lock = threading.Lock()
    real = PostgresDataSource.execute_many

    def spy(self, requests):
        with lock:
            sizes.append(len(requests))
        return real(self, requests)

    monkeypatch.setattr(PostgresDataSource, "execute_many", spy)
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    declare_blocking(connection.channel(), topology())
    connection.close()
    seq = _new_taskmanager(source)
    config = remote_config(own_vhost, timeout=20)
    config["dataspace"]["datasource"]["config"]["batches"] = batched
    space = DataSpace(config)
    try:
        total = 300
        producer = space.producer()
        ids = [
            producer.insert(seq, 1, f"k{i:03d}", f"v{i}".encode(), header(), metadata())
            for i in range(total)
        ]
        producer.flush(20)  # all 300 wait in the request queue
        sizes.clear()
        pool_factory(own_vhost, consumers=1, prefetch=50)
        deadline = time.monotonic() + 30
        while len(_xmins(pg_dsn, seq)) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        xmins = _xmins(pg_dsn, seq)
        assert len(xmins) == total
        transactions = len(set(xmins.values()))
        print(f"{total} inserts in {transactions} transactions; batches {sizes}")
        assert sum(sizes) == total and len(sizes) == transactions
        # never more than the prefetch window, or than one batch message
        assert max(sizes) <= (MAX_ITEMS if batched else 50)
        assert transactions <= total // 10, f"{transactions} transactions for {total} inserts"
        # one consumer, one producer: applied in the order published
        products = source.get_dataproducts(seq)
        assert [p["key"] for p in products] == [f"k{i:03d}" for i in range(total)]
        assert len(_request_log(pg_dsn, ids)) == total
    finally:
        space.close()


def test_large_and_small_inserts_in_one_batch_keep_their_order(dispatcher, source):
    """One batch, small ones in one statement, large ones by COPY between them."""
    seq = _new_taskmanager(source)
    values = [os.urandom(operations.COPY_FROM_BYTES if i % 3 == 0 else 10) for i in range(9)]
    outcomes = dispatcher.handle_batch(
        [_insert(seq, 1, f"k{i}", v, _mid()) for i, v in enumerate(values)]
    )
    assert [o.code for o in outcomes] == ["ok"] * 9
    products = source.get_dataproducts(seq)
    assert [p["key"] for p in products] == [f"k{i}" for i in range(9)]
    assert [p["value"] for p in products] == values


# -- small inserts: claims and rows in one statement (idempotency.apply_claimed_inserts) ------
def test_extreme_ids_and_times_go_in_with_their_batch(dispatcher, source, batches):
    """Numbers are cast in parentheses: -9223372036854775808::bigint overflows."""
    seq = _new_taskmanager(source)
    low, high = -(2**63), 2**63 - 1
    batch = [_insert(seq, g, f"k{g}", b"v", _mid()) for g in (low, high, 0)]

    outcomes = dispatcher.handle_batch(batch)

    assert [o.code for o in outcomes] == ["ok"] * 3
    assert batches == [["insert"] * 3]  # together, not one by one after a failure
    assert {g: source.get_dataproduct(seq, g, f"k{g}") for g in (low, high, 0)} == {
        low: b"v",
        high: b"v",
        0: b"v",
    }


def test_an_insert_batch_with_an_id_of_another_operation_refuses_that_one(dispatcher, source):
    """The id's first use is found after the statement committed the others: each
    then runs alone, and those replay the reply they committed."""
    seq = _new_taskmanager(source)
    taken = _mid()
    assert dispatcher.handle_batch([_store(fresh("taken"), "T", taken)])[0].code == "ok"
    batch = [
        _insert(seq, 1, "a", b"a", _mid()),
        _insert(seq, 1, "b", b"b", taken),
        _insert(seq, 1, "c", b"c", _mid()),
    ]

    outcomes = dispatcher.handle_batch(batch)

    assert [(o.code, o.replayed) for o in outcomes] == [
        ("ok", True),
        ("bad_request", False),
        ("ok", True),
    ]
    assert "already used by a store_taskmanager request" in outcomes[1].reason
    assert source.get_datablock(seq, 1) == {"a": b"a", "c": b"c"}


def test_deliveries_of_one_insert_at_once_write_it_once(source, pg_dsn):
    """Two workers holding the same request (a redelivery while the first still runs)
    serialize on the claim: one writes, the other gets the stored reply."""
    seq = _new_taskmanager(source)
    ids = [_mid() for _ in range(30)]
    results: dict[str, list[tuple[bytes, bool]]] = {m: [] for m in ids}
    start = threading.Barrier(2)

    def deliver() -> None:
        start.wait()
        for n, message_id in enumerate(ids):
            args = {
                "taskmanager_id": seq,
                "generation_id": 1,
                "key": f"k{n}",
                "value": b"v",
                "header": header(),
                "metadata": metadata(),
            }
            results[message_id].append(source.execute("insert", args, lambda _: b"ok", message_id))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert all(sorted(r[1] for r in pair) == [False, True] for pair in results.values())
    assert all(r[0] == b"ok" for pair in results.values() for r in pair)
    assert len(source.get_datablock(seq, 1)) == 30
    ((headers,),) = sql_rows(
        pg_dsn, "SELECT count(*) FROM header WHERE taskmanager_id = %s", (seq,)
    )
    assert headers == 30


def test_a_large_batch_with_a_replay_still_closes_its_connection(source, monkeypatch):
    """libpq keeps its buffers at their largest for the connection's life: after a
    statement over LARGE_TRANSACTION bytes the connection is closed, even when a
    short statement (the replay's stored reply) ran after it."""
    from dataspace_worker.postgres import LARGE_TRANSACTION

    seq = _new_taskmanager(source)
    released = []
    real = source._pool.release
    monkeypatch.setattr(
        source._pool, "release", lambda conn, **kw: (released.append(conn), real(conn, **kw))[1]
    )
    replayed = _mid()

    def insert(key: str, value: bytes, message_id: str):
        args = dict(
            taskmanager_id=seq,
            generation_id=1,
            key=key,
            value=value,
            header=header(),
            metadata=metadata(),
        )
        return ("insert", args, lambda _: b"ok", message_id)

    source.execute(*insert("first", b"v", replayed))
    value = os.urandom(operations.COPY_FROM_BYTES - 1)  # inline: in the statement, as hex
    count = LARGE_TRANSACTION // (2 * len(value)) + 2
    batch = [insert(f"k{i}", value, _mid()) for i in range(count)] + [
        insert("first", b"v", replayed)
    ]
    released.clear()

    results = source.execute_many(batch)

    assert [r[1] for r in results] == [False] * count + [True]
    assert len(released) == 1 and released[0].closed, "the large connection went back to the pool"


def test_delete_takes_the_smallest_generation(source):
    """The newest generation is -2**63: delete casts it in parentheses (no overflow)."""
    seq = _new_taskmanager(source)
    source.insert(seq, -(2**63), "k", b"v", header(), metadata())
    assert source.delete(seq, all_generations=False) == 1
    assert source.get_datablock(seq, -(2**63)) == {}
