"""The benchmark of issue 5: the remote path and the in-process store side by side,
against the floor measured in the same run, with the ratios the issue targets.

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

from dataspace_client import DataSpace  # noqa: E402
from tests import services  # noqa: E402
from tests.conftest import inprocess_config, remote_config  # noqa: E402

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
    """A pika RPC echo server on a classic durable queue: the broker's round-trip floor."""

    def __init__(self, url: str):
        self.url = url
        self.queue = f"bench.echo.{uuid.uuid4().hex[:6]}"
        conn = pika.BlockingConnection(pika.URLParameters(url))
        conn.channel().queue_declare(self.queue, durable=True)
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


def floor(url: str, dsn: str, count: int, bar) -> dict[str, Result]:
    rows = {}
    echo = Echo(url)
    conn, call = echo.client()
    rows["echo_1"] = run("floor: RPC echo, 1 client", call, count, bar=bar)
    conn.close()
    clients = threading.local()

    def threaded(i: int) -> None:
        if not hasattr(clients, "call"):
            clients.conn, clients.call = echo.client()
        clients.call(i)

    rows["echo_8"] = run("floor: RPC echo, 8 client threads", threaded, count, 8, bar=bar)
    echo.stop.set()
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
    huge = os.urandom(16 * MIB)
    space.insert(tm, 4, "huge", huge, HEADER, METADATA)
    assert space.get_dataproduct(tm, 4, "huge") == huge
    return rows


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


ORIGINAL = {"insert_1": 320, "insert_8": 460, "get_1": 1500, "duplicate": 133}
ORIGINAL_MIBS = {"insert_1mib": 30, "get_1mib": 145}


def targets(floor_rows: dict, remote: dict) -> list[tuple[str, float, float, bool]]:
    """(target, measured, bound, met) per row of issue 5's table."""
    out = []
    sync_insert = (floor_rows["echo_1"]["p50"] + floor_rows["sql_insert"]["p50"]) * 1.3
    out.append(
        (
            "sync insert p50 <= 1.3x (echo + SQL insert) ms",
            remote["insert_1"]["p50"],
            sync_insert,
            remote["insert_1"]["p50"] <= sync_insert,
        )
    )
    bound = 0.9 * floor_rows["echo_8"]["ops"]
    out.append(
        (
            "8-thread insert >= 0.9x 8-thread echo ops/s",
            remote["insert_8"]["ops"],
            bound,
            remote["insert_8"]["ops"] >= bound,
        )
    )
    sync_get = (floor_rows["echo_1"]["p50"] + floor_rows["sql_select"]["p50"]) * 1.3
    out.append(
        (
            "get p50 <= 1.3x (echo + SQL select) ms",
            remote["get_1"]["p50"],
            sync_get,
            remote["get_1"]["p50"] <= sync_get,
        )
    )
    out.append(
        (
            "8-thread get >= 0.9x 8-thread echo ops/s",
            remote["get_8"]["ops"],
            bound,
            remote["get_8"]["ops"] >= bound,
        )
    )
    dup = 5 * ORIGINAL["duplicate"]
    out.append(
        (
            "duplicate 20 keys >= 5x original ops/s",
            remote["duplicate"]["ops"],
            dup,
            remote["duplicate"]["ops"] >= dup,
        )
    )
    for key, factor in (("insert_1mib", 2), ("get_1mib", 1)):
        want = factor * ORIGINAL_MIBS[key]
        got = remote[key]["mibs"]
        out.append((f"{key} >= {factor}x original MiB/s", got, want, got >= want))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--count", type=int, default=None, help="calls per row (default 3000)")
    parser.add_argument("--consumers", type=int, default=4)
    args = parser.parse_args()
    count = args.count or (300 if args.quick else 3000)
    big = 10 if args.quick else 50
    per_store = 4 * count + max(20, count // 10) + 2 * big
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
        tqdm(total=4 * count + 2 * per_store, desc="bench", unit="call", file=sys.stderr) as bar,
    ):
        worker = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "dataspace-worker")],
            env={
                **os.environ,
                "DATASPACE_AMQP_URL": url,
                "DATASPACE_PG_DSN": dsn,
                "DATASPACE_CONSUMERS": str(args.consumers),
                "DATASPACE_LOG_LEVEL": "WARNING",
                "DATASPACE_METRICS_PORT": "0",
            },
        )
        try:
            time.sleep(2)
            floor_rows = floor(url, dsn, count, bar)
            with DataSpace(inprocess_config(dsn)) as space:
                local = store_rows(space, "in process", count, big, bar)
            with DataSpace(remote_config(url, timeout=120)) as space:
                remote = store_rows(space, "remote", count, big, bar)
            worker_rss = rss_mib(worker.pid)
        finally:
            worker.terminate()
            worker.wait(60)
    lines = ["| work | ops/s | p50 ms | p99 ms | MiB/s |", "|---|---|---|---|---|"]
    for row in [*floor_rows.values(), *local.values(), *remote.values()]:

        def fmt(v, spec):
            return "" if v is None else format(v, spec)

        lines.append(
            f"| {row['name']} | {row['ops']:,.0f} | {fmt(row['p50'], '.2f')} | "
            f"{fmt(row['p99'], '.2f')} | {fmt(row['mibs'], '.1f')} |"
        )
    lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
    checks = targets(floor_rows, remote)
    for name, got, want, met in checks:
        lines.append(f"| {name} | {got:,.2f} | {want:,.2f} | {'yes' if met else 'NO'} |")
    rss = worker_rss or 0.0
    lines.append(f"| worker RSS <= 150 MiB | {rss:.0f} | 150 | {'yes' if rss <= 150 else 'NO'} |")
    lines.append(
        "| decoupled producers >= 0.5x raw publish rate | n/a: no fire-and-forget API yet | | NO |"
    )
    print("\n".join(lines))
    print(
        json.dumps(
            {
                "count": count,
                "consumers": args.consumers,
                "floor": floor_rows,
                "in_process": local,
                "remote": remote,
                "worker_rss_mib": worker_rss,
                "targets": [
                    {"target": n, "measured": g, "bound": w, "met": m} for n, g, w, m in checks
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
