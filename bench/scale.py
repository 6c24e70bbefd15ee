"""Throughput with 1, 2 and 4 workers (docs/scaling.md), with and without ordering lanes.

    .venv/bin/python bench/scale.py            # 2,000 sync calls and 10,000 fire-and-forget a row
    .venv/bin/python bench/scale.py --count 500 --publishes 2000

Each row starts that many ``dataspace-worker`` processes (worker defaults,
``DATASPACE_LANES`` for the lanes rows) on a scratch vhost and database, then
measures sync inserts from 8 client threads and fire-and-forget inserts from
one producer until all are in PostgreSQL. On one machine the workers share its
cores with RabbitMQ and PostgreSQL: more workers add consumers, not CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402

from bench.run import HEADER, METADATA  # noqa: E402
from dataspace_client import DataSpace  # noqa: E402
from tests import services  # noqa: E402
from tests.support.configs import remote_config  # noqa: E402

WORKER = os.path.join(os.path.dirname(sys.executable), "dataspace-worker")


def measure(workers: int, lanes: int, count: int, publishes: int) -> dict:
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
    ):
        env = {
            **os.environ,
            "DATASPACE_AMQP_URL": url,
            "DATASPACE_PG_DSN": dsn,
            "DATASPACE_LANES": str(lanes),
            "DATASPACE_LOG_LEVEL": "WARNING",
            "DATASPACE_METRICS_PORT": "0",
        }
        procs = [subprocess.Popen([WORKER], env=env) for _ in range(workers)]
        try:
            time.sleep(2 + workers * 0.5)
            config = remote_config(url, timeout=120)
            config["dataspace"]["datasource"]["config"]["lanes"] = bool(lanes)
            with DataSpace(config) as space:
                tms = [
                    space.store_taskmanager(f"s{i}-{uuid.uuid4().hex[:6]}", "S") for i in range(8)
                ]
                value = os.urandom(100)
                started = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    list(
                        pool.map(
                            lambda i: space.insert(tms[i % 8], 1, f"k{i}", value, HEADER, METADATA),
                            range(count),
                        )
                    )
                sync_rate = count / (time.perf_counter() - started)
                started = time.perf_counter()
                with space.producer() as producer:
                    for i in range(publishes):
                        producer.insert(tms[i % 8], 2, f"f{i}", value, HEADER, METADATA)
                db = psycopg2.connect(dsn)
                db.autocommit = True
                stored, deadline = 0, time.monotonic() + 300
                while stored < publishes and time.monotonic() < deadline:
                    with db.cursor() as cur:
                        cur.execute("SELECT count(*) FROM dataproduct WHERE generation_id = 2")
                        stored = cur.fetchone()[0]
                    time.sleep(0.02)
                db.close()
                ff_rate = stored / (time.perf_counter() - started)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
    return {
        "workers": workers,
        "lanes": lanes,
        "sync_insert_8_threads": sync_rate,
        "fire_and_forget_in_postgres": ff_rate,
        "complete": stored == publishes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--publishes", type=int, default=10_000)
    parser.add_argument("--lanes", type=int, default=8, help="lanes for the lanes rows")
    args = parser.parse_args()
    rows = [
        measure(workers, lanes, args.count, args.publishes)
        for lanes in (0, args.lanes)
        for workers in (1, 2, 4)
    ]
    print(
        "| workers | lanes | sync insert, 8 threads, ops/s | fire-and-forget in PostgreSQL, ops/s |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['lanes']} | {r['sync_insert_8_threads']:,.0f} | "
            f"{r['fire_and_forget_in_postgres']:,.0f}{'' if r['complete'] else ' (incomplete)'} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
