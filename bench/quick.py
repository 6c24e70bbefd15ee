"""A first, small measurement of the remote path against the in-process store.

Starts ``dataspace-worker`` as a subprocess on a scratch database and vhost
(local services), then times single-thread inserts and gets and 8-thread
inserts through both datasources. Prints a table. The full benchmark with
floors and targets is issue 5's; this one answers "how far off are we".

    .venv/bin/python bench/quick.py [--count 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def timed(fn, count: int) -> list[float]:
    out = []
    for i in range(count):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def row(name: str, latencies: list[float], wall: float | None = None) -> str:
    lat = sorted(latencies)
    rate = len(lat) / (wall if wall is not None else sum(lat))
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[int(len(lat) * 0.99)] * 1000
    return f"| {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |"


def measure(space: DataSpace, label: str, count: int) -> list[str]:
    tm = space.store_taskmanager(f"bench-{label}-{time.time()}", "BENCH")
    value = os.urandom(100)
    rows = []
    lat = timed(lambda i: space.insert(tm, 1, f"k{i}", value, HEADER, METADATA), count)
    rows.append(row(f"{label}: insert 100 B, 1 thread", lat))
    lat = timed(lambda i: space.get_dataproduct(tm, 1, f"k{i}"), count)
    rows.append(row(f"{label}: get_dataproduct, 1 thread", lat))

    def worker(t: int) -> list[float]:
        def insert(i: int) -> None:
            space.insert(tm, 2, f"t{t}-{i}", value, HEADER, METADATA)

        return timed(insert, count // 8)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        lat = [x for part in pool.map(worker, range(8)) for x in part]
    rows.append(row(f"{label}: insert 100 B, 8 threads", lat, time.perf_counter() - started))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--consumers", type=int, default=4)
    args = parser.parse_args()
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
    ):
        worker = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "dataspace-worker")],
            env={
                **os.environ,
                "DATASPACE_AMQP_URL": url,
                "DATASPACE_PG_DSN": dsn,
                "DATASPACE_CONSUMERS": str(args.consumers),
                "DATASPACE_LOG_LEVEL": "WARNING",
            },
        )
        try:
            time.sleep(2)
            lines = ["| work | ops/s | p50 ms | p99 ms |", "|---|---|---|---|"]
            with DataSpace(inprocess_config(dsn)) as space:
                lines += measure(space, "in process", args.count)
            with DataSpace(remote_config(url)) as space:
                lines += measure(space, "remote", args.count)
        finally:
            worker.terminate()
            worker.wait(30)
    print("\n".join(lines))
    print(f"count={args.count} consumers={args.consumers}")


if __name__ == "__main__":
    main()
