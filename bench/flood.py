"""One account floods the service with malformed requests; another keeps calling.

    .venv/bin/python bench/flood.py                 # 3,500 msg/s for 20 s
    .venv/bin/python bench/flood.py --rate 1000 --seconds 10
    .venv/bin/python bench/flood.py --separate-vhosts   # the victim on a vhost of its own

Measures whether one account's flood of bad messages starves another account's
calls (docs/security.md, "Attacks tried" and "Limits"). This starts
``dataspace-worker`` (its defaults) on a scratch database and vhost, measures a
victim client's synchronous insert + get for a few seconds alone, then again
while a second connection publishes malformed bodies at ``--rate`` messages a
second (to ``data.get_schema``, no reply_to: each one is refused and
dead-lettered), and prints the victim's p50/p99/max before and during the flood,
the flood's achieved rate, the request queue's peak depth and how long the
worker took to drain it. With ``--separate-vhosts`` the victim's account has a
vhost of its own, served by a second worker process on the same database (the
deployment docs/security.md suggests for tenants that must not starve each
other). Bounded: ``--seconds`` of flood, then at most 120 s of draining. Prints
figures only; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import pika  # noqa: E402

from dataspace_client import DataSpace  # noqa: E402
from tests import services  # noqa: E402
from tests.support.configs import remote_config  # noqa: E402

WORKER = os.path.join(os.path.dirname(sys.executable), "dataspace-worker")
HEADER = {
    "create_time": 1,
    "expiration_time": 2,
    "scheduled_create_time": 1,
    "creator": "flood",
    "schema_id": None,
}
METADATA = {"state": "NEW", "generation_time": 1, "missed_update_count": 0}
BAD_BODIES = [
    b"not json at all",
    orjson.dumps({"v": 1, "op": ["x"], "args": {}}),
    orjson.dumps({}),
    orjson.dumps({"v": 1, "op": "delete_data_older_than", "args": {"days": 1e-9}}),
    orjson.dumps({"v": 1, "op": "get_schema", "args": {"nope": 1}}),
]


def victim(space: DataSpace, tm: int, stop: threading.Event, latencies: list[float]) -> None:
    """Synchronous insert + get, one after the other, until ``stop``."""
    n = 0
    while not stop.is_set():
        key = f"k{n}-{uuid.uuid4().hex[:6]}"
        started = time.perf_counter()
        space.insert(tm, 1, key, b"v" * 100, HEADER, METADATA)
        space.get_dataproduct(tm, 1, key)
        latencies.append(time.perf_counter() - started)
        n += 1


def flood(url: str, rate: float, seconds: float) -> int:
    """Publish malformed requests at ``rate`` a second for ``seconds``; the count sent."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    sent = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) - sent
        for _ in range(max(0, min(due, 500))):
            channel.basic_publish(
                "dataspace",
                "data.get_schema",
                BAD_BODIES[sent % len(BAD_BODIES)],
                pika.BasicProperties(message_id=f"flood-{sent}"),
            )
            sent += 1
        connection.process_data_events(time_limit=0.001)
    connection.close()
    return sent


def depth(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def percentiles(latencies: list[float]) -> dict:
    lat = sorted(latencies) or [float("nan")]
    return {
        "calls": len(latencies),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2),
    }


def measure(url: str, victim_url: str, rate: float, seconds: float, baseline: float) -> dict:
    config = remote_config(victim_url, timeout=60)
    with DataSpace(config) as space:
        tm = space.store_taskmanager(f"victim-{uuid.uuid4().hex[:6]}", str(uuid.uuid4()))
        before: list[float] = []
        stop = threading.Event()
        thread = threading.Thread(target=victim, args=(space, tm, stop, before))
        thread.start()
        time.sleep(baseline)
        stop.set()
        thread.join()

        during: list[float] = []
        stop = threading.Event()
        thread = threading.Thread(target=victim, args=(space, tm, stop, during))
        peak = [0]

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], depth(url, "dataspace.requests"))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        thread.start()
        watcher.start()
        started = time.monotonic()
        sent = flood(url, rate, seconds)
        flood_seconds = time.monotonic() - started
        stop.set()
        thread.join()
        drained_at = time.monotonic()
        while depth(url, "dataspace.requests") and time.monotonic() - drained_at < 120:
            time.sleep(0.2)
        drain = time.monotonic() - drained_at
    return {
        "flood_rate_target": rate,
        "flood_sent": sent,
        "flood_rate": round(sent / flood_seconds),
        "victim_alone": percentiles(before),
        "victim_during_flood": percentiles(during),
        "request_queue_peak": peak[0],
        "drain_after_flood_s": round(drain, 2),
        "dead_letters": depth(url, "dataspace.dead"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3500.0, help="bad messages a second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds without flood")
    parser.add_argument(
        "--separate-vhosts",
        action="store_true",
        help="the victim on a vhost of its own, with a worker of its own",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        dsn = stack.enter_context(services.scratch_database(services.DEFAULT_PG_DSN))
        url = stack.enter_context(services.scratch_vhost(services.DEFAULT_AMQP_URL))
        victim_url = url
        if args.separate_vhosts:
            victim_url = stack.enter_context(services.scratch_vhost(services.DEFAULT_AMQP_URL))
        log = stack.enter_context(open(os.devnull, "w"))  # the workers' logs, unread
        workers = []
        for vhost in sorted({url, victim_url}):
            env = {
                **os.environ,
                "DATASPACE_AMQP_URL": vhost,
                "DATASPACE_PG_DSN": dsn,
                "DATASPACE_METRICS_PORT": "0",
            }
            workers.append(subprocess.Popen([WORKER], env=env, stdout=log, stderr=log))
        try:
            time.sleep(3)
            result = measure(url, victim_url, args.rate, min(args.seconds, 120), args.baseline)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(60)
    result["separate_vhosts"] = args.separate_vhosts
    alone, during = result["victim_alone"], result["victim_during_flood"]
    print(
        f"flood: {result['flood_sent']} bad messages at {result['flood_rate']}/s "
        f"(target {args.rate:g}/s); request queue peak {result['request_queue_peak']}, "
        f"drained {result['drain_after_flood_s']} s after; dead letters {result['dead_letters']}"
    )
    print("| victim (insert + get) | calls | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, row in (("alone", alone), ("during the flood", during)):
        print(f"| {name} | {row['calls']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
