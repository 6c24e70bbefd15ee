"""Benchmark the remote path and the in-process store against the performance targets.

Both side by side, against the floor measured in the same run (pika RPC echo,
raw publishes, raw SQL), with each of the service's performance targets
(``targets()``: docs/performance.md lists them) and whether it is met.

    .venv/bin/python bench/run.py            # full counts
    .venv/bin/python bench/run.py --quick    # under a minute

It makes a scratch database and vhost on the local services, starts
``dataspace-worker`` as a subprocess (``--consumers``), and prints a table of
ops/s, p50, p99, MiB/s and the ratio to each target, then one JSON line. Worker
RSS is read from /proc at the end of the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika  # noqa: E402
import psycopg2  # noqa: E402
from psycopg2.extras import execute_values  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.original import original_space, ratio_lines  # noqa: E402
from dataspace_client import DataSpace  # noqa: E402
from tests import services  # noqa: E402
from tests.support.configs import inprocess_config, remote_config  # noqa: E402

HEADER = {
    "create_time": 1,
    "expiration_time": 2,
    "scheduled_create_time": 1,
    "creator": "bench",
    "schema_id": None,
}
METADATA = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}
MIB = 1024 * 1024


class Result(dict):
    """One row: name, ops/s, p50 and p99 in ms, MiB/s."""


def summarize(name: str, latencies: list[float], wall: float, nbytes: int = 0) -> Result:
    lat = sorted(latencies)
    return Result(
        name=name,
        ops=len(lat) / wall,
        p50=lat[len(lat) // 2] * 1000,
        p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        mibs=(nbytes * len(lat) / MIB / wall) if nbytes else None,
    )


def run(name: str, fn, count: int, threads: int = 1, nbytes: int = 0, bar=None) -> Result:
    """Call ``fn(i)`` ``count`` times over ``threads`` threads; time each call."""

    def part(t: int) -> list[float]:
        out = []
        for i in range(t, count, threads):
            started = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - started)
            if bar is not None:
                bar.update(1)
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        latencies = [x for chunk in pool.map(part, range(threads)) for x in chunk]
    return summarize(name, latencies, time.perf_counter() - started, nbytes)


# -- the floor ------------------------------------------------------------------------
class Echo:
    """A pika RPC echo server on a durable queue: the broker's round-trip floor.

    ``queue_type`` "classic" is the floor the latency and throughput targets are
    set against; "quorum" is the same echo through the kind of queue the service
    uses (replicated, and written to its log before delivery), to show what that
    choice costs by itself.
    """

    def __init__(self, url: str, queue_type: str = "classic"):
        self.url = url
        self.queue = f"bench.echo.{queue_type}.{uuid.uuid4().hex[:6]}"
        conn = pika.BlockingConnection(pika.URLParameters(url))
        conn.channel().queue_declare(
            self.queue, durable=True, arguments={"x-queue-type": queue_type}
        )
        conn.close()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = conn.channel()
        channel.basic_qos(prefetch_count=50)

        def on_message(ch, method, props, body):
            ch.basic_publish(
                "", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id)
            )
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(self.queue, on_message)
        while not self.stop.is_set():
            conn.process_data_events(time_limit=0.2)
        conn.close()

    def client(self):
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = conn.channel()
        got = {}
        channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _c, _m, p, b: got.__setitem__(p.correlation_id, b),
            auto_ack=True,
        )

        def call(i: int) -> None:
            cid = str(i)
            channel.basic_publish(
                "",
                self.queue,
                b"x" * 100,
                pika.BasicProperties(
                    reply_to="amq.rabbitmq.reply-to", correlation_id=cid, delivery_mode=2
                ),
            )
            while cid not in got:
                conn.process_data_events(time_limit=None)
            del got[cid]

        return conn, call


def echo_rows(url: str, queue_type: str, count: int, bar) -> dict[str, Result]:
    rows = {}
    echo = Echo(url, queue_type)
    suffix = "" if queue_type == "classic" else f"_{queue_type}"
    label = "" if queue_type == "classic" else f" ({queue_type} queue)"
    conn, call = echo.client()
    rows[f"echo_1{suffix}"] = run(f"floor: RPC echo, 1 client{label}", call, count, bar=bar)
    conn.close()
    clients = threading.local()

    def threaded(i: int) -> None:
        if not hasattr(clients, "call"):
            clients.conn, clients.call = echo.client()
        clients.call(i)

    rows[f"echo_8{suffix}"] = run(
        f"floor: RPC echo, 8 client threads{label}", threaded, count, 8, bar=bar
    )
    echo.stop.set()
    return rows


def publish_rate(url: str, queue_type: str, count: int, bar) -> Result:
    """Persistent publishes with confirms tracked asynchronously (no wait per message)."""
    queue = f"bench.publish.{queue_type}.{uuid.uuid4().hex[:6]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": queue_type})
    conn.close()
    confirmed = [0]

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(ch):
        ch.confirm_delivery(ack_nack_callback=on_confirm)
        body, props = b"x" * 300, pika.BasicProperties(delivery_mode=2)
        for _ in range(count):
            ch.basic_publish("", queue, body, props)

    def on_confirm(frame):
        done = max(confirmed[0], frame.method.delivery_tag)
        if bar is not None:
            bar.update(done - confirmed[0])
        confirmed[0] = done
        if done >= count:
            select.close()

    started = time.perf_counter()
    select = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=on_open,
        on_close_callback=lambda connection, _reason: connection.ioloop.stop(),
    )
    select.ioloop.start()
    wall = time.perf_counter() - started
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_delete(queue)
    conn.close()
    return Result(
        name=f"floor: persistent publish, async confirms ({queue_type} queue), msgs/s",
        ops=count / wall,
        p50=None,
        p99=None,
        mibs=None,
    )


def floor(url: str, dsn: str, count: int, publishes: int, bar) -> dict[str, Result]:
    rows = echo_rows(url, "classic", count, bar)
    rows.update(echo_rows(url, "quorum", count, bar))
    rows["publish"] = publish_rate(url, "classic", publishes, bar)
    rows["publish_quorum"] = publish_rate(url, "quorum", publishes, bar)
    db = psycopg2.connect(dsn)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench_raw (k text primary key, v bytea)")
    db.commit()
    value = os.urandom(100)

    def insert(i: int) -> None:
        with db.cursor() as cur:
            cur.execute("INSERT INTO bench_raw VALUES (%s, %s)", (f"r{i}", value))
        db.commit()

    rows["sql_insert"] = run("floor: SQL INSERT + commit", insert, count, bar=bar)

    def select(i: int) -> None:
        with db.cursor() as cur:
            cur.execute("SELECT v FROM bench_raw WHERE k = %s", (f"r{i}",))
            cur.fetchone()
        db.commit()

    rows["sql_select"] = run("floor: SQL point SELECT", select, count, bar=bar)
    started = time.perf_counter()
    with db.cursor() as cur:
        execute_values(
            cur, "INSERT INTO bench_raw VALUES %s", [(f"b{i}", value) for i in range(count * 5)]
        )
    db.commit()
    rows["sql_batch"] = Result(
        name="floor: execute_values, rows/s",
        ops=count * 5 / (time.perf_counter() - started),
        p50=None,
        p99=None,
        mibs=None,
    )
    db.close()
    return rows


# -- the store, both ways ----------------------------------------------------------------
def decoupled(space: DataSpace, dsn: str, label: str, count: int, bar) -> dict[str, Result]:
    """Fire-and-forget inserts from one producer: the rate at which they are confirmed
    by the broker, and the rate at which they are all durable in PostgreSQL."""
    tm = space.store_taskmanager(f"bench-ff-{label}-{uuid.uuid4().hex[:6]}", "BENCH")
    value = os.urandom(100)
    db = psycopg2.connect(dsn)
    db.autocommit = True
    started = time.perf_counter()
    with space.producer() as producer:
        for i in range(count):
            producer.insert(tm, 1, f"f{i}", value, HEADER, METADATA)
            if bar is not None and i % 1000 == 999:
                bar.update(1000)
    confirmed = time.perf_counter() - started
    stored = 0
    deadline = time.monotonic() + 600
    while stored < count and time.monotonic() < deadline:
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM dataproduct WHERE taskmanager_id = %s", (tm,))
            stored = cur.fetchone()[0]
        if stored < count:
            time.sleep(0.02)
    durable = time.perf_counter() - started
    db.close()
    if stored < count:
        raise RuntimeError(f"only {stored} of {count} fire-and-forget inserts arrived")
    none = {"p50": None, "p99": None, "mibs": None}
    return {
        "ff_confirmed": Result(
            name=f"{label}: fire-and-forget insert, confirmed, ops/s", ops=count / confirmed, **none
        ),
        "ff_durable": Result(
            name=f"{label}: fire-and-forget insert, all in PostgreSQL, ops/s",
            ops=count / durable,
            **none,
        ),
    }


def store_rows(space: DataSpace, label: str, count: int, big: int, bar) -> dict[str, Result]:
    rows = {}
    tm = space.store_taskmanager(f"bench-{label}-{uuid.uuid4().hex[:6]}", "BENCH")
    value = os.urandom(100)
    rows["insert_1"] = run(
        f"{label}: insert 100 B, 1 thread",
        lambda i: space.insert(tm, 1, f"k{i}", value, HEADER, METADATA),
        count,
        bar=bar,
    )
    rows["insert_8"] = run(
        f"{label}: insert 100 B, 8 threads",
        lambda i: space.insert(tm, 2, f"k{i}", value, HEADER, METADATA),
        count,
        8,
        bar=bar,
    )
    rows["get_1"] = run(
        f"{label}: get_dataproduct, 1 thread",
        lambda i: space.get_dataproduct(tm, 1, f"k{i}"),
        count,
        bar=bar,
    )
    rows["get_8"] = run(
        f"{label}: get_dataproduct, 8 threads",
        lambda i: space.get_dataproduct(tm, 1, f"k{i % count}"),
        count,
        8,
        bar=bar,
    )
    for k in range(20):
        space.insert(tm, 10, f"d{k}", value, HEADER, METADATA)
    generations = max(20, count // 10)
    rows["duplicate"] = run(
        f"{label}: duplicate_datablock, 20 keys",
        lambda i: space.duplicate_datablock(tm, 10, 1000 + i),
        generations,
        bar=bar,
    )
    rows["get_datablock"] = run(
        f"{label}: get_datablock, 20 keys",
        lambda i: space.get_datablock(tm, 10),
        count,
        bar=bar,
    )
    return rows


def big_rows(space: DataSpace, label: str, big: int, huge: int, bar) -> dict[str, Result]:
    rows = {}
    tm = space.store_taskmanager(f"bench-big-{label}-{uuid.uuid4().hex[:6]}", "BENCH")
    mib = os.urandom(MIB)
    rows["insert_1mib"] = run(
        f"{label}: insert 1 MiB",
        lambda i: space.insert(tm, 3, f"m{i}", mib, HEADER, METADATA),
        big,
        nbytes=MIB,
        bar=bar,
    )
    rows["get_1mib"] = run(
        f"{label}: get 1 MiB",
        lambda i: space.get_dataproduct(tm, 3, f"m{i}"),
        big,
        nbytes=MIB,
        bar=bar,
    )
    value = os.urandom(16 * MIB)

    def insert_and_get(i: int) -> None:
        space.insert(tm, 4, f"h{i}", value, HEADER, METADATA)
        if space.get_dataproduct(tm, 4, f"h{i}") != value:
            raise AssertionError("a 16 MiB product came back different")

    rows["huge"] = run(
        f"{label}: insert + get 16 MiB, {HUGE_THREADS} threads",
        insert_and_get,
        huge,
        HUGE_THREADS,
        nbytes=2 * 16 * MIB,
        bar=bar,
    )
    return rows


HUGE_THREADS = 4


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


#: the original in-process implementation's figures that some targets are set from
#: (ops/s, and MiB/s for 1 MiB values): docs/performance.md
ORIGINAL = {"insert_1": 320, "insert_8": 460, "get_1": 1500, "duplicate": 133}
ORIGINAL_MIBS = {"insert_1mib": 30, "get_1mib": 145}
#: issue 15's starting point for fire-and-forget (docs/performance.md before it):
#: 4,795/s all in PostgreSQL on a run whose classic raw publish floor was 22,884/s
FIRE_AND_FORGET_BEFORE = 4_795 / 22_884


def _target(name: str, measured: float, bound: float, higher_is_better: bool) -> dict:
    met = measured >= bound if higher_is_better else measured <= bound
    return {"target": name, "measured": measured, "bound": bound, "met": met}


def read_targets(floor_rows: dict, remote: dict, original: dict | None) -> list[dict]:
    """Issue 15's read targets: a remote get's p50 against the classic echo plus a
    point select, and remote reads against the original in process (when it was
    measured in this run: no recorded figure stands in for it)."""
    bound = 1.5 * (floor_rows["echo_1"]["p50"] + floor_rows["sql_select"]["p50"])
    out = [
        _target(
            "get p50 <= 1.5x (classic echo + SQL point select) ms",
            remote["get_1"]["p50"],
            bound,
            False,
        )
    ]
    for row in ("get_1", "get_8", "get_datablock"):
        if original and row in original:
            out.append(
                _target(
                    f"{remote[row]['name'].split(': ', 1)[1]} >= 0.8x original in process ops/s",
                    remote[row]["ops"],
                    0.8 * original[row]["ops"],
                    True,
                )
            )
    return out


def targets(
    floor_rows: dict, remote: dict, memory: dict, original: dict | None = None
) -> list[dict]:
    """The performance targets, each with its bound from this run's floor, from
    the original in-process implementation's figures (ORIGINAL, ORIGINAL_MIBS)
    or a fixed memory size.

    Latency and throughput targets are computed twice: against the classic-queue
    echo they are set against, and against the same echo through a quorum queue
    (what the service's replicated request queue costs before any work is done).
    """
    out = []
    for suffix, label in (("", "classic echo"), ("_quorum", "quorum echo")):
        echo = floor_rows[f"echo_1{suffix}"]["p50"]
        for row, sql_row, what in (
            ("insert_1", "sql_insert", "sync insert"),
            ("get_1", "sql_select", "get"),
        ):
            bound = 1.3 * (echo + floor_rows[sql_row]["p50"])
            out.append(
                _target(f"{what} p50 <= 1.3x ({label} + SQL) ms", remote[row]["p50"], bound, False)
            )
        rate = 0.9 * floor_rows[f"echo_8{suffix}"]["ops"]
        for row, what in (("insert_8", "insert"), ("get_8", "get")):
            out.append(
                _target(
                    f"8-thread {what} >= 0.9x 8-thread {label} ops/s",
                    remote[row]["ops"],
                    rate,
                    True,
                )
            )
    for key in ("publish", "publish_quorum"):
        out.append(
            _target(
                f"fire-and-forget, in PostgreSQL >= 0.5x raw publish ({key}) ops/s",
                remote["ff_durable"]["ops"],
                0.5 * floor_rows[key]["ops"],
                True,
            )
        )
    out.append(
        _target(
            "duplicate 20 keys >= 5x original ops/s",
            remote["duplicate"]["ops"],
            5 * ORIGINAL["duplicate"],
            True,
        )
    )
    for key, factor in (("insert_1mib", 2), ("get_1mib", 1)):
        out.append(
            _target(
                f"{key} >= {factor}x original MiB/s",
                remote[key]["mibs"],
                factor * ORIGINAL_MIBS[key],
                True,
            )
        )
    out += read_targets(floor_rows, remote, original)
    out.append(
        _target(
            "fire-and-forget, in PostgreSQL >= 2x issue 15's start (on this run's publish floor)",
            remote["ff_durable"]["ops"],
            2 * FIRE_AND_FORGET_BEFORE * floor_rows["publish"]["ops"],
            True,
        )
    )
    out.append(_target("worker RSS at steady load <= 150 MiB", memory["steady"], 150, False))
    out.append(
        _target(
            f"worker peak with 16 MiB products <= steady + {HUGE_THREADS} in flight x 16 MiB x 4",
            memory["peak"],
            memory["steady"] + HUGE_THREADS * 16 * 4,
            False,
        )
    )
    return out


def _original_rows(count: int, big: int, huge: int, bar) -> tuple[dict | None, str]:
    """The original engine's rows on a scratch database of their own, or why not."""
    with services.scratch_database(services.DEFAULT_PG_DSN) as dsn:
        space, why_not = original_space(dsn)
        if space is None:
            return None, why_not
        try:
            rows = store_rows(space, "original in process", count, big, bar)
            rows.update(big_rows(space, "original in process", big, huge, bar))
            return rows, ""
        except Exception as exc:  # its API or its driver: the run goes on without it
            return None, f"failed while measured ({type(exc).__name__}: {exc})"
        finally:
            close = getattr(space, "close", None)
            if close is not None:
                close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--count", type=int, default=None, help="calls per row (default 3000)")
    parser.add_argument(
        "--publishes", type=int, default=None, help="fire-and-forget inserts (default 100000)"
    )
    parser.add_argument(
        "--consumers", type=int, default=None, help="worker consumers (default: the worker's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for CI logs)")
    args = parser.parse_args()
    count = args.count or (300 if args.quick else 3000)
    publishes = args.publishes or (10_000 if args.quick else 100_000)
    big = 10 if args.quick else 50
    huge = 4 if args.quick else 16
    per_store = 4 * count + max(20, count // 10) + 2 * big + huge + publishes
    env = {
        **os.environ,
        "DATASPACE_LOG_LEVEL": "WARNING",
        "DATASPACE_METRICS_PORT": "0",
    }
    if args.consumers:
        env["DATASPACE_CONSUMERS"] = str(args.consumers)
    total = 6 * count + 2 * publishes + 3 * per_store
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
        tqdm(
            total=total, desc="bench", unit="call", file=sys.stderr, disable=args.no_progress
        ) as bar,
    ):
        worker = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "dataspace-worker")],
            env={**env, "DATASPACE_AMQP_URL": url, "DATASPACE_PG_DSN": dsn},
        )
        try:
            time.sleep(2)
            floor_rows = floor(url, dsn, count, publishes, bar)
            with DataSpace(inprocess_config(dsn)) as space:
                local = store_rows(space, "in process", count, big, bar)
                local.update(decoupled(space, dsn, "in process", publishes, bar))
                local.update(big_rows(space, "in process", big, huge, bar))
            original, why_not = _original_rows(count, big, huge, bar)
            with DataSpace(remote_config(url, timeout=120)) as space:
                remote = store_rows(space, "remote", count, big, bar)
                remote.update(decoupled(space, dsn, "remote", publishes, bar))
                memory = {"steady": rss_mib(worker.pid)}
                remote.update(big_rows(space, "remote", big, huge, bar))
                memory["peak"] = rss_mib(worker.pid, "VmHWM")
                memory["after"] = rss_mib(worker.pid)
        finally:
            worker.terminate()
            worker.wait(60)
    lines = ["| work | ops/s | p50 ms | p99 ms | MiB/s |", "|---|---|---|---|---|"]
    shown = [*floor_rows.values(), *local.values(), *(original or {}).values(), *remote.values()]
    for row in shown:

        def fmt(v, spec):
            return "" if v is None else format(v, spec)

        lines.append(
            f"| {row['name']} | {row['ops']:,.0f} | {fmt(row['p50'], '.2f')} | "
            f"{fmt(row['p99'], '.2f')} | {fmt(row['mibs'], '.1f')} |"
        )
    lines.append(
        f"| worker RSS MiB: steady {memory['steady']:.0f}, peak {memory['peak']:.0f}, "
        f"after the 16 MiB load {memory['after']:.0f} | | | | |"
    )
    lines.append("")
    if original:
        lines += ratio_lines(remote, original, "original in process") + [""]
    else:
        lines.append(f"original decision engine DataSpace: {why_not}; ratios against it skipped")
        lines.append("")
    lines += ratio_lines(remote, local, "this package in process") + [""]
    lines += ["| target | measured | bound | met |", "|---|---|---|---|"]
    checks = targets(floor_rows, remote, memory, original)
    for check in checks:
        lines.append(
            f"| {check['target']} | {check['measured']:,.2f} | {check['bound']:,.2f} | "
            f"{'yes' if check['met'] else 'NO'} |"
        )
    print("\n".join(lines))
    print(
        json.dumps(
            {
                "count": count,
                "publishes": publishes,
                "consumers": args.consumers,
                "floor": floor_rows,
                "in_process": local,
                "original": original,
                "original_skipped": why_not or None,
                "remote": remote,
                "worker_memory_mib": memory,
                "targets": checks,
            }
        )
    )


if __name__ == "__main__":
    main()
