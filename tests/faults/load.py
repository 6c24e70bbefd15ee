"""A write load from several threads sharing one DataSpace, and the checks made after a fault.

Every call is recorded: operation, key, how long it took, and what came of it.
Each product key and each task manager UUID is written by exactly one call, so
after the fault PostgreSQL must hold:

- every insert the client saw succeed, exactly once, with the value sent;
- every store_taskmanager the client saw succeed, exactly once, under the
  sequence_id the client got back; no task manager UUID twice, acknowledged or not;

and the client must have seen, for every call, a return or a ``DataSpaceError``
within the call's timeout plus a small margin: no hang, no raw pika/psycopg2 (or
any other) exception, and no ``DataSpaceExistsError`` (a key inserted once can only
"exist" if the service ran the same request twice).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import psycopg2

from dataspace_client import DataSpaceError, DataSpaceExistsError

#: seconds a call may overrun its timeout before it counts as a hang
MARGIN = 2.0
#: one store_taskmanager call every this many calls of a thread
TASKMANAGER_EVERY = 25


def header(creator: str = "fault-test") -> dict:
    now = int(time.time())
    return {
        "create_time": now,
        "expiration_time": now + 3600,
        "scheduled_create_time": now + 60,
        "creator": creator,
        "schema_id": None,
    }


def metadata() -> dict:
    return {"state": "NEW", "generation_time": int(time.time()), "missed_update_count": 0}


def value_for(key: str) -> bytes:
    return (key.encode() + b"|") * 8


@dataclass
class Call:
    thread: int
    op: str  # "insert" or "store_taskmanager"
    key: str  # product key, or task manager UUID
    started: float  # time.monotonic()
    elapsed: float
    error: BaseException | None
    result: object = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Load:
    """``threads`` threads writing products into (``sequence_id``, ``generation``)."""

    space: object
    sequence_id: int
    name: str
    timeout: float
    threads: int = 5
    max_calls: int = 4000  # per thread: a bound, the test normally stops the load first
    generation: int = 1
    calls: list[list[Call]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.calls = [[] for _ in range(self.threads)]
        self._current: list[tuple[str, str, float] | None] = [None] * self.threads
        self._workers = [
            threading.Thread(target=self._run, args=(t,), name=f"fault-load-{t}", daemon=True)
            for t in range(self.threads)
        ]
        self.started_at: float | None = None

    # -- running ------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        for worker in self._workers:
            worker.start()

    def _run(self, thread: int) -> None:
        calls = self.calls[thread]
        for i in range(self.max_calls):
            if self.stop.is_set():
                return
            if i % TASKMANAGER_EVERY == TASKMANAGER_EVERY - 1:
                op, key = "store_taskmanager", str(uuid.uuid4())
            else:
                op, key = "insert", f"t{thread}-{i}"
            started = time.monotonic()
            self._current[thread] = (op, key, started)
            error, result = None, None
            try:
                if op == "insert":
                    self.space.insert(
                        self.sequence_id, self.generation, key, value_for(key), header(), metadata()
                    )
                else:
                    result = self.space.store_taskmanager(self.name, key)
            except BaseException as exc:  # everything is recorded and judged later
                error = exc
            calls.append(Call(thread, op, key, started, time.monotonic() - started, error, result))
            self._current[thread] = None
            if error is not None:
                # Do not spin while the service is down; bounded by max_calls anyway.
                self.stop.wait(0.05)

    def acknowledged(self) -> int:
        return sum(1 for calls in self.calls for c in list(calls) if c.ok)

    def attempted(self) -> int:
        return sum(len(calls) for calls in self.calls)

    def wait_for_acks(self, more: int, timeout: float) -> tuple[bool, float]:
        """Wait until ``more`` further calls succeeded; (reached, seconds waited)."""
        target = self.acknowledged() + more
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.acknowledged() >= target:
                return True, time.monotonic() - started
            if not any(w.is_alive() for w in self._workers):
                break
            time.sleep(0.05)
        return self.acknowledged() >= target, time.monotonic() - started

    def finish(self) -> list[str]:
        """Stop the load and wait for the calls in flight; returns the calls that hung."""
        self.stop.set()
        deadline = time.monotonic() + self.timeout + MARGIN + 3
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        hung = []
        for thread, worker in enumerate(self._workers):
            current = self._current[thread]
            if worker.is_alive() and current is not None:
                op, key, started = current
                hung.append(f"thread {thread}: {op} {key} running for {now - started:.1f} s")
            elif worker.is_alive():
                hung.append(f"thread {thread}: alive, between calls")
        return hung

    @property
    def all_calls(self) -> list[Call]:
        return [c for calls in self.calls for c in calls]


def _error_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}"


def _samples(calls: list[Call], per_type: int = 2) -> dict[str, list[str]]:
    """A few messages of each error type, with the call and when it ended."""
    samples: dict[str, list[str]] = {}
    for c in sorted(calls, key=lambda c: c.started):
        if c.error is not None:
            seen = samples.setdefault(_error_name(c.error), [])
            if len(seen) < per_type:
                seen.append(f"{c.op} after {c.elapsed:.2f} s: {str(c.error)[:300]}")
    return samples


def verify(load: Load, pg_dsn: str, hung: list[str], **extra) -> tuple[dict, list[str]]:
    """Compare what the client saw with what PostgreSQL holds.

    Returns (figures, problems): figures for the report, one line per problem.
    """
    calls = load.all_calls
    inserts = [c for c in calls if c.op == "insert"]
    stores = [c for c in calls if c.op == "store_taskmanager"]
    acked_inserts = {c.key: c for c in inserts if c.ok}
    acked_stores = {c.key: c for c in stores if c.ok}

    with psycopg2.connect(pg_dsn, connect_timeout=10) as conn, conn.cursor() as cur:
        counts: dict[str, dict[str, int]] = {}
        for table in ("dataproduct", "header", "metadata"):
            cur.execute(
                f"SELECT key, count(*) FROM {table} "
                "WHERE taskmanager_id = %s AND generation_id = %s GROUP BY key",
                (load.sequence_id, load.generation),
            )
            counts[table] = dict(cur.fetchall())
        cur.execute(
            "SELECT key, value FROM dataproduct WHERE taskmanager_id = %s AND generation_id = %s",
            (load.sequence_id, load.generation),
        )
        values = {key: bytes(value) for key, value in cur.fetchall()}
        cur.execute(
            "SELECT taskmanager_id, array_agg(sequence_id ORDER BY sequence_id) "
            "FROM taskmanager WHERE name = %s GROUP BY taskmanager_id",
            (load.name,),
        )
        taskmanagers = dict(cur.fetchall())
    conn.close()

    problems: list[str] = []

    missing = sorted(k for k in acked_inserts if k not in values)
    wrong_value = sorted(k for k in acked_inserts if k in values and values[k] != value_for(k))
    doubled = {
        table: sorted(k for k, n in per_key.items() if n > 1) for table, per_key in counts.items()
    }
    incomplete = sorted(
        k
        for k in acked_inserts
        if any(counts[t].get(k, 0) != 1 for t in ("dataproduct", "header", "metadata"))
    )
    unknown_keys = sorted(set(values) - {c.key for c in inserts})
    unacked_applied = sorted(c.key for c in inserts if not c.ok and c.key in values)

    tm_missing = sorted(k for k in acked_stores if k not in taskmanagers)
    tm_doubled = {k: ids for k, ids in taskmanagers.items() if len(ids) > 1}
    tm_mismatch = sorted(
        f"{k}: client got {c.result}, database has {taskmanagers[k]}"
        for k, c in acked_stores.items()
        if k in taskmanagers and c.result not in taskmanagers[k]
    )
    tm_unacked_applied = sorted(c.key for c in stores if not c.ok and c.key in taskmanagers)

    limit = load.timeout + MARGIN
    slow = sorted(
        (f"{c.op} {c.key}: {c.elapsed:.2f} s ({_error_name(c.error) if c.error else 'ok'})")
        for c in calls
        if c.elapsed > limit
    )
    errors = Counter(_error_name(c.error) for c in calls if c.error is not None)
    foreign = [c for c in calls if c.error is not None and not isinstance(c.error, DataSpaceError)]
    exists = [c for c in calls if isinstance(c.error, DataSpaceExistsError)]
    # Every fault here is transient: a call may give up with a retryable error
    # (DataSpaceConnectionError, DataSpaceTimeoutError), but a plain DataSpaceError
    # tells the caller the request failed for good, while it may have been applied.
    final = [
        c
        for c in calls
        if isinstance(c.error, DataSpaceError)
        and not isinstance(c.error, DataSpaceExistsError)
        and not getattr(c.error, "retryable", False)
    ]
    written = set(values) | set(taskmanagers)

    figures = {
        "attempted": len(calls),
        "attempted_inserts": len(inserts),
        "attempted_store_taskmanager": len(stores),
        "acknowledged": len(acked_inserts) + len(acked_stores),
        "acknowledged_inserts": len(acked_inserts),
        "acknowledged_store_taskmanager": len(acked_stores),
        "found_acknowledged_inserts": len(acked_inserts) - len(missing),
        "products_in_db": len(values),
        "taskmanagers_in_db": sum(len(v) for v in taskmanagers.values()),
        "missing": len(missing),
        "wrong_value": len(wrong_value),
        "doubled_rows": {t: len(v) for t, v in doubled.items()},
        "doubled_taskmanagers": len(tm_doubled),
        "taskmanager_id_mismatch": len(tm_mismatch),
        "unacked_but_applied": len(unacked_applied) + len(tm_unacked_applied),
        "errors": dict(sorted(errors.items())),
        "error_samples": _samples(calls),
        "exists_errors": len(exists),
        "non_dataspace_errors": len(foreign),
        "non_retryable_errors": len(final),
        "non_retryable_errors_applied": sum(c.key in written for c in final),
        "slow_calls": len(slow),
        "hung_calls": len(hung),
        "max_call_seconds": round(max((c.elapsed for c in calls), default=0.0), 2),
        "timeout": load.timeout,
        **extra,
    }

    def report(label: str, items) -> None:
        items = list(items)
        if items:
            problems.append(f"{label} ({len(items)}): {items[:8]}")

    report("acknowledged inserts missing from PostgreSQL", missing)
    report("acknowledged inserts stored with another value", wrong_value)
    for table, keys in doubled.items():
        report(f"keys with more than one row in {table}", keys)
    report("acknowledged inserts without exactly one row in each table", incomplete)
    report("products in PostgreSQL that no call wrote", unknown_keys)
    report("acknowledged store_taskmanager calls missing from PostgreSQL", tm_missing)
    report(
        "task manager UUIDs stored more than once (a request applied twice)",
        [f"{k}: {v}" for k, v in tm_doubled.items()],
    )
    report("store_taskmanager returned a sequence_id PostgreSQL does not hold", tm_mismatch)
    report(
        "DataSpaceExistsError for a key inserted once (the request ran twice)",
        [f"{c.key} after {c.elapsed:.2f} s: {c.error}" for c in exists],
    )
    report(
        "calls that raised something other than a DataSpaceError",
        [f"{c.op} {c.key}: {_error_name(c.error)}: {c.error}" for c in foreign],
    )
    report(
        "calls failed with a non-retryable DataSpaceError by a transient fault (the client "
        "should re-send them within their timeout, or raise a retryable error)",
        [
            f"{c.op} {c.key} after {c.elapsed:.2f} s of {load.timeout:g} s, "
            f"{'applied' if c.key in written else 'not applied'}: {str(c.error)[:200]}"
            for c in final
        ],
    )
    report(f"calls longer than timeout + margin ({limit:g} s)", slow)
    report("calls that never returned", hung)
    return figures, problems


def probe(space, sequence_id: int, within: float, generation: int = 2) -> dict:
    """Insert a new product and read it back, retrying DataSpaceErrors for ``within`` s.

    Shows that the pool (and the client) serve new requests after a fault.
    Returns {"ok": bool, "attempts": n, "seconds": s, "errors": [...]}.
    """
    key = f"probe-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    errors: list[str] = []
    attempts = 0
    inserted = False
    while attempts < 30:
        attempts += 1
        try:
            if not inserted:
                try:
                    space.insert(sequence_id, generation, key, value_for(key), header(), metadata())
                except DataSpaceExistsError as exc:
                    if attempts == 1:  # a fresh key: nothing can have stored it yet
                        errors.append(f"DataSpaceExistsError on a fresh key: {exc}")
                        break
                    # an earlier attempt that raised was applied after all
                inserted = True
            stored = space.get_dataproduct(sequence_id, generation, key)
            if stored != value_for(key):
                errors.append(f"read back {stored[:40]!r}")
                break
            return {
                "ok": True,
                "attempts": attempts,
                "seconds": round(time.monotonic() - started, 2),
                "errors": errors,
            }
        except DataSpaceError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        if time.monotonic() - started > within:
            break
        time.sleep(0.5)
    return {
        "ok": False,
        "attempts": attempts,
        "seconds": round(time.monotonic() - started, 2),
        "errors": errors[-5:],
    }
