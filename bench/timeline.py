"""Where one request's time goes: the median time between its stages.

Runs a worker pool in this process (``tests.services.running_pool``, the
worker's default consumers and prefetch) and one client, sends requests one at
a time from one thread, and stamps each stage as the request passes it:

    call          the caller enters DataSpace.get_dataproduct / insert
    client I/O    the request is published (Calls._publish: on the caller's thread
                  while the client's I/O thread waits, io_lock.py, else on it)
    worker I/O    the worker's I/O thread takes the delivery (ConsumerChannels._on_message)
    database      a database thread starts the batch (Dispatcher.handle_batch)
    database done PostgreSQL answered (PostgresDataSource.execute_many returns)
                  (neither for a read answered on the I/O thread: inline_reads.py)
    settle        the worker's I/O thread publishes the reply (Settler.settle)
    reply         the client's I/O thread takes the reply (RpcChannel._on_reply)
    returned      the caller has its result

Client and worker share one process and its GIL here, so each stage is a little
slower than with a worker of its own (compare the total with bench/run.py's p50);
what it shows is the split: the broker legs, the thread hand-offs, the database.

    .venv/bin/python bench/timeline.py            # 2,000 gets
    .venv/bin/python bench/timeline.py --insert   # 2,000 inserts
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import HEADER, METADATA  # noqa: E402
from dataspace_client import DataSpace  # noqa: E402
from dataspace_client.rpc import calls, channel  # noqa: E402
from dataspace_worker import channels, dispatch, postgres, settle  # noqa: E402
from dataspace_worker.config import WorkerSettings  # noqa: E402
from tests import services  # noqa: E402
from tests.support.configs import remote_config  # noqa: E402

#: the worker's own defaults (consumers, prefetch)
DEFAULTS = WorkerSettings.with_defaults(amqp_url="", pg_dsn="")

STAGES = [
    "call",
    "client I/O",
    "worker I/O",
    "database",
    "database done",
    "settle",
    "reply",
    "returned",
]
#: stage -> (class, method, stamped after the method returns)
PROBES = {
    "client I/O": (calls.Calls, "_publish", False),
    "worker I/O": (channels.ConsumerChannels, "_on_message", False),
    "database": (dispatch.Dispatcher, "handle_batch", False),
    "database done": (postgres.PostgresDataSource, "execute_many", True),
    "settle": (settle.Settler, "settle", False),
    "reply": (channel.RpcChannel, "_on_reply", False),
}


def _stamping(stamps: dict[str, list[float]]) -> None:
    for stage, (cls, name, after) in PROBES.items():
        real = getattr(cls, name)

        def probe(*args, _real=real, _stage=stage, _after=after, **kwargs):
            if not _after:
                stamps[_stage].append(time.perf_counter())
            result = _real(*args, **kwargs)
            if _after:
                stamps[_stage].append(time.perf_counter())
            return result

        setattr(cls, name, functools.wraps(real)(probe))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--insert", action="store_true", help="inserts instead of gets")
    args = parser.parse_args()
    stamps: dict[str, list[float]] = {stage: [] for stage in STAGES}
    _stamping(stamps)  # before the consumers subscribe: they hold the bound methods
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
        services.running_pool(url, dsn, consumers=DEFAULTS.consumers, prefetch=DEFAULTS.prefetch),
        DataSpace(remote_config(url, timeout=30)) as space,
    ):
        tm = space.store_taskmanager("timeline", "T")
        space.insert(tm, 1, "k", b"v" * 100, HEADER, METADATA)

        def request(i: int) -> None:
            if args.insert:
                space.insert(tm, 2, f"k{i}", b"v" * 100, HEADER, METADATA)
            else:
                space.get_dataproduct(tm, 1, "k")

        for i in range(200):  # warm up: connections, prepared statements
            request(-1 - i)
        for stage in STAGES:
            stamps[stage].clear()
        for i in range(args.count):
            stamps["call"].append(time.perf_counter())
            request(i)
            stamps["returned"].append(time.perf_counter())
    # a read answered on the I/O thread (inline_reads.py) passes no database thread
    seen = [s for s in STAGES if len(stamps[s]) == args.count]
    if len(seen) < len(STAGES) and any(stamps[s] for s in STAGES if s not in seen):
        sys.exit(
            "some requests passed a database thread, some not (sessions still opening?): "
            f"{ {s: len(v) for s, v in stamps.items()} }; run it again"
        )
    print(f"| {'inserts' if args.insert else 'gets'}: from | to | median µs |")
    print("|---|---|---|")
    for start, end in zip(seen, seen[1:]):
        gaps = [(b - a) * 1e6 for a, b in zip(stamps[start], stamps[end])]
        print(f"| {start} | {end} | {statistics.median(gaps):.0f} |")
    totals = [(b - a) * 1e6 for a, b in zip(stamps["call"], stamps["returned"])]
    print(f"| call | returned | {statistics.median(totals):.0f} |")


if __name__ == "__main__":
    main()
