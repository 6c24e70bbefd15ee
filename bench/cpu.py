"""CPU time per request, by process: the worker, RabbitMQ, PostgreSQL, the client.

Throughput on two cores is bound by CPU, not by waiting (docs/performance.md):
this says where each request's CPU goes. It starts ``dataspace-worker`` (its
defaults) on a scratch database and vhost, then for each load reads the CPU
time (user + system, from /proc/<pid>/stat) of the worker, of RabbitMQ's
``beam.smp``, of every PostgreSQL process, and of this process, before and
after, and prints microseconds per request.

    .venv/bin/python bench/cpu.py               # 4,000 requests a load
    .venv/bin/python bench/cpu.py --count 1000
    .venv/bin/python bench/cpu.py --load insert --load get
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import HEADER, METADATA  # noqa: E402
from dataspace_client import DataSpace  # noqa: E402
from tests import services  # noqa: E402
from tests.support.configs import remote_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
LOADS = ("insert", "get", "fire-and-forget")


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _sample(worker: int) -> dict[str, float]:
    """CPU seconds so far: the worker, RabbitMQ, PostgreSQL (every process), this one."""
    return {
        "worker": _cpu_seconds(worker),
        "RabbitMQ": sum(_cpu_seconds(p) for p in _pids_named("beam.smp")),
        "PostgreSQL": sum(_cpu_seconds(p) for p in _pids_named("postgres")),
        "client": _cpu_seconds(os.getpid()),
    }


def _threads(call, count: int, threads: int = 8) -> None:
    def part(t: int) -> None:
        for i in range(t, count, threads):
            call(i)

    workers = [threading.Thread(target=part, args=(t,)) for t in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()


def _measure(name: str, load, count: int, worker: int) -> str:
    before, started = _sample(worker), time.perf_counter()
    load()
    wall = time.perf_counter() - started
    after = _sample(worker)
    per = {k: (after[k] - before[k]) / count * 1e6 for k in before}
    parts = " | ".join(f"{per[k]:.0f} µs" for k in ("worker", "RabbitMQ", "PostgreSQL", "client"))
    return f"| {name} | {parts} | {sum(per.values()) / 1000:.2f} ms | {count / wall:,.0f}/s |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000, help="requests a load")
    parser.add_argument(
        "--load",
        action="append",
        choices=LOADS,
        help="run only this load (repeatable; default: all three)",
    )
    options = parser.parse_args()
    count, loads = options.count, options.load or list(LOADS)
    env = {**os.environ, "DATASPACE_LOG_LEVEL": "WARNING", "DATASPACE_METRICS_PORT": "0"}
    lines = [
        "| load | worker | RabbitMQ | PostgreSQL | client | CPU per request | rate |",
        "|---|---|---|---|---|---|---|",
    ]
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
    ):
        worker = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "dataspace-worker")],
            env={**env, "DATASPACE_AMQP_URL": url, "DATASPACE_PG_DSN": dsn},
        )
        try:
            time.sleep(2)
            with DataSpace(remote_config(url, timeout=120)) as space:
                tm = space.store_taskmanager(f"cpu-{uuid.uuid4().hex[:6]}", "CPU")
                value = os.urandom(100)
                space.insert(tm, 1, "warm", value, HEADER, METADATA)

                def insert(i: int) -> None:
                    space.insert(tm, 1, f"k{i}", value, HEADER, METADATA)

                def get(i: int) -> None:
                    space.get_dataproduct(tm, 1, f"k{i}")

                def fire_and_forget() -> None:
                    with space.producer() as producer:
                        for i in range(count):
                            producer.insert(tm, 2, f"f{i}", value, HEADER, METADATA)
                        producer.flush(120)
                    # until every one is in PostgreSQL
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:
                        try:
                            space.get_dataproduct(tm, 2, f"f{count - 1}")
                            break
                        except KeyError:
                            time.sleep(0.05)

                if "get" in loads and "insert" not in loads:
                    _threads(insert, count)  # the products the gets read
                runs = {
                    "insert": ("sync insert, 8 threads", lambda: _threads(insert, count)),
                    "get": ("sync get, 8 threads", lambda: _threads(get, count)),
                    "fire-and-forget": ("fire-and-forget insert", fire_and_forget),
                }
                for load in LOADS:
                    if load in loads:
                        name, run = runs[load]
                        lines.append(_measure(name, run, count, worker.pid))
        finally:
            worker.terminate()
            worker.wait(60)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
