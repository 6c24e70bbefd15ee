"""Ordering lanes in the tests: a client that routes through them, and the
applied-sequence log, a trigger-fed table that records the order in which PostgreSQL
applied product writes, with the checks read from it (used by tests/test_lanes.py and
tests/faults/test_lane_order.py)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg2

from dataspace_client import DataSpace
from tests import services
from tests.support.configs import remote_config
from tests.support.contract import header, metadata, sql_rows


# -- clients --------------------------------------------------------------------------
def lanes_space(url: str, lanes: bool = True, timeout: float = 20) -> DataSpace:
    config = remote_config(url, timeout=timeout)
    config["dataspace"]["datasource"]["config"]["lanes"] = lanes
    return DataSpace(config)


def publish_round(producer, tms: list[int], number: int, keys: tuple[str, ...]) -> None:
    """One step of every chain: the insert (number 0) or update ``number``."""
    write = producer.insert if number == 0 else producer.update
    for tm in tms:
        for key in keys:
            write(tm, 1, key, str(number).encode(), header(), metadata())


# -- the applied-sequence log ---------------------------------------------------------
#: a row per product row written (insert or update), in the order PostgreSQL applied
#: them: two writes of one product serialize on its row lock, and the trigger runs
#: after the row is written, so ``serial`` follows the order of their commits; two
#: writes of one task manager follow each other in its lane (a lane's transactions
#: run one after the other), so ``serial`` orders them too unless the lane broke
#: its order. Who wrote it: the session's application_name (``label_sessions``) and
#: client port.
APPLIED_LOG_SQL = """
CREATE TABLE applied_log (
    taskmanager_id BIGINT NOT NULL,
    key            TEXT NOT NULL,
    value          TEXT NOT NULL,
    applied_at     TIMESTAMPTZ NOT NULL,
    serial         BIGSERIAL PRIMARY KEY,
    app            TEXT,
    client_port    INTEGER,
    changed        BOOLEAN NOT NULL
);
CREATE FUNCTION applied_log_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO applied_log (taskmanager_id, key, value, applied_at, app, client_port, changed)
    VALUES (NEW.taskmanager_id, NEW.key, convert_from(NEW.value, 'UTF8'), clock_timestamp(),
            current_setting('application_name'), inet_client_port(),
            TG_OP = 'INSERT' OR OLD.value IS DISTINCT FROM NEW.value);
    RETURN NULL;
END
$$;
CREATE TRIGGER applied_log AFTER INSERT OR UPDATE ON dataproduct
    FOR EACH ROW EXECUTE FUNCTION applied_log_row();
"""


def add_applied_log(dsn: str) -> None:
    """Create the log table and its trigger (the schema must exist already)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(APPLIED_LOG_SQL)
    finally:
        conn.close()


def label_sessions(pool, label: str) -> None:
    """Name the database sessions an in-process pool opens from now on ``label``
    (application_name), for the applied log. The worker fixes its application_name
    and its ``options``, so this reaches into its connection pool: it drops the idle
    connections and changes what new ones are opened with."""
    connections = pool.dispatcher.datasource._pool
    connections._connect_kwargs["application_name"] = label
    connections.reopen()


#: a chain: (taskmanager sequence_id, key) -> the number of its last update
Chains = dict[tuple[int, str], int]


@dataclass
class Applied:
    """What the applied log says about a set of chains."""

    rows: int = 0
    #: rows of a product whose number is not above every one applied before it (a
    #: harmless repeat aside): (tm, key, highest before, number)
    out_of_order: list = field(default_factory=list)
    #: rows of a task manager out of publish order across its products, which a
    #: producer publishes as (number, key) in ascending order: (tm, before, row)
    tm_out_of_order: list = field(default_factory=list)
    #: rows that apply the number a product holds again, changing nothing (allowed:
    #: a redelivered write the idempotency record did not catch): (tm, key, number)
    repeats: list = field(default_factory=list)
    #: chains with numbers never applied: (tm, key) -> [numbers]
    missing: dict = field(default_factory=dict)
    #: consecutive rows of one product written by different sessions' application_name
    handovers: int = 0
    #: rows per application_name
    by_worker: dict = field(default_factory=dict)

    def figures(self) -> dict:
        return {
            "applied_log_rows": self.rows,
            "out_of_order": len(self.out_of_order),
            "tm_out_of_order": len(self.tm_out_of_order),
            "repeats": len(self.repeats),
            "chains_with_gaps": len(self.missing),
            "handovers": self.handovers,
            "rows_by_worker": self.by_worker,
        }


def check_applied(dsn: str, chains: Chains) -> Applied:
    """Read the applied log of ``chains`` (values "0" for the insert, then "1".."N")
    and check, in serial order, that per product the numbers rise strictly, and per
    task manager the (number, key) pairs."""
    tms = sorted({tm for tm, _ in chains})
    rows = sql_rows(
        dsn,
        "SELECT taskmanager_id, key, value, app, changed FROM applied_log"
        " WHERE taskmanager_id = ANY(%s) ORDER BY serial",
        (tms,),
    )
    result = Applied(rows=len(rows))
    highest: dict[tuple[int, str], int] = {}
    tm_highest: dict[int, tuple[int, str]] = {}
    seen: dict[tuple[int, str], set[int]] = defaultdict(set)
    last_worker: dict[tuple[int, str], str] = {}
    workers: Counter = Counter()
    for tm, key, value, worker, changed in rows:
        chain, number = (tm, key), int(value)
        workers[worker] += 1
        if chain in last_worker and last_worker[chain] != worker:
            result.handovers += 1
        last_worker[chain] = worker
        seen[chain].add(number)
        if chain in highest and number <= highest[chain]:
            if number == highest[chain] and not changed:
                result.repeats.append((tm, key, number))
            else:
                result.out_of_order.append((tm, key, highest[chain], number))
            continue
        highest[chain] = number
        if tm in tm_highest and (number, key) < tm_highest[tm]:
            result.tm_out_of_order.append((tm, tm_highest[tm], (number, key)))
        tm_highest[tm] = max((number, key), tm_highest.get(tm, (number, key)))
    for chain, last in chains.items():
        gaps = sorted(set(range(last + 1)) - seen[chain])
        if gaps:
            result.missing[chain] = gaps
    result.by_worker = dict(sorted(workers.items(), key=lambda kv: str(kv[0])))
    return result


def not_at_last(dsn: str, chains: Chains) -> dict[tuple[int, str], str | None]:
    """Chains whose product does not hold its last number: chain -> what it holds."""
    tms = sorted({tm for tm, _ in chains})
    held = {
        (tm, key): value
        for tm, key, value in sql_rows(
            dsn,
            "SELECT taskmanager_id, key, convert_from(value, 'UTF8') FROM dataproduct"
            " WHERE taskmanager_id = ANY(%s)",
            (tms,),
        )
    }
    return {c: held.get(c) for c, last in chains.items() if held.get(c) != str(last)}


def wait_until_applied(dsn: str, chains: Chains, within: float) -> dict:
    """Poll (bounded) until every product holds its last number; what is still off."""
    deadline = time.monotonic() + within
    while True:
        off = not_at_last(dsn, chains)
        if not off or time.monotonic() > deadline:
            return off
        time.sleep(0.2)


def wait_until_settled(dsn: str, chains: Chains, quiet: float = 1.0, within: float = 20) -> dict:
    """Like ``wait_until_applied``, but give up as soon as the applied log has not grown
    for ``quiet`` seconds (for runs expected to go wrong: they need not wait it out)."""
    tms = sorted({tm for tm, _ in chains})
    deadline = time.monotonic() + within
    rows, since = -1, time.monotonic()
    while True:
        off = not_at_last(dsn, chains)
        if not off or time.monotonic() > deadline:
            return off
        now_rows = sql_rows(
            dsn, "SELECT count(*) FROM applied_log WHERE taskmanager_id = ANY(%s)", (tms,)
        )
        if now_rows[0][0] != rows:
            rows, since = now_rows[0][0], time.monotonic()
        elif time.monotonic() - since > quiet:
            return off
        time.sleep(0.2)


@contextlib.contextmanager
def applied_database(admin_dsn: str):
    """A new database with the schema and the applied log; dropped afterwards."""
    from dataspace_worker.postgres import PostgresDataSource

    with services.scratch_database(admin_dsn) as dsn:
        PostgresDataSource({"dsn": dsn, "pool_size": 1}).close()  # creates the schema
        add_applied_log(dsn)
        yield dsn
