"""Load through the ordering lanes, for the fault tests with lanes (test_hosts.py,
test_cluster.py): which lane each sequence_id hashes to, a task manager on every lane,
and one ``Load`` per task manager run and verified as one."""

from __future__ import annotations

import time
import uuid

import pika

from dataspace_core.protocol import EXCHANGE, LANE_HEADER, LANE_QUEUE_PREFIX

from .load import Load, verify


def probe_lanes(url: str, lanes: int, keys: range = range(1, 501)) -> dict[int, int]:
    """The lane of each routing key (a sequence_id) in ``keys``: declares the workers'
    topology with ``lanes`` lanes (as the workers will: they find it declared), publishes
    one message per key through the lanes' hash exchange and reads them back from the lanes.
    Call it before any worker consumes the lanes."""
    from dataspace_worker.topology import declare_blocking, topology

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        declare_blocking(channel, topology(lanes=lanes))
        channel.confirm_delivery()
        for key in keys:  # as a client with lanes does: its task manager in a header
            channel.basic_publish(
                EXCHANGE,
                "lane.insert",
                str(key).encode(),
                pika.BasicProperties(headers={LANE_HEADER: str(key)}),
            )
        lane_of: dict[int, int] = {}
        for lane in range(lanes):  # no basic.get on a single-active-consumer quorum queue
            queue = f"{LANE_QUEUE_PREFIX}{lane}"
            left = channel.queue_declare(queue, passive=True).method.message_count
            for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=5):
                if method is None:
                    break
                lane_of[int(body)] = lane
                left -= 1
                if not left:
                    break
            channel.cancel()
    finally:
        if connection.is_open:
            connection.close()
    assert sorted(lane_of) == list(keys), f"{len(keys) - len(lane_of)} probe messages lost"
    return lane_of


def taskmanager_per_lane(space, lane_of: dict[int, int], lanes: int, prefix: str) -> dict:
    """Store task managers until every lane has one: {lane: (sequence_id, name)}."""
    chosen: dict[int, tuple[int, str]] = {}
    for i in range(200):  # 8 lanes: every lane has one after ~22 on average
        name = f"{prefix}-{i}"
        sequence_id = space.store_taskmanager(name, str(uuid.uuid4()))
        assert sequence_id in lane_of, f"sequence_id {sequence_id} beyond the probed keys"
        chosen.setdefault(lane_of[sequence_id], (sequence_id, name))
        if len(chosen) == lanes:
            return chosen
    raise AssertionError(f"200 task managers cover only lanes {sorted(chosen)}")


class Loads:
    """Several ``Load`` s run as one (one per task manager), with ``Load``'s interface
    as the tests use it."""

    def __init__(self, loads: list[Load]):
        self.loads = loads
        self.timeout = loads[0].timeout
        self.started_at: float | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        for load in self.loads:
            load.start()

    def acknowledged(self) -> int:
        return sum(load.acknowledged() for load in self.loads)

    def wait_for_acks(self, more: int, timeout: float) -> tuple[bool, float]:
        target = self.acknowledged() + more
        started = time.monotonic()
        while time.monotonic() - started < timeout and self.acknowledged() < target:
            time.sleep(0.05)
        return self.acknowledged() >= target, time.monotonic() - started

    def finish(self) -> list[str]:
        for load in self.loads:
            load.stop.set()  # all at once: each finish() then waits for its own calls
        return [f"task manager {ld.sequence_id}: {h}" for ld in self.loads for h in ld.finish()]

    @property
    def all_calls(self):
        return [c for load in self.loads for c in load.all_calls]


def verify_loads(load: Load | Loads, pg_dsn: str, hung: list[str], **extra) -> tuple[dict, list]:
    """``load.verify`` for a ``Load``, or for each load of ``Loads`` with the figures
    added up (per-key and per-error counts too) and the problems prefixed."""
    if isinstance(load, Load):
        return verify(load, pg_dsn, hung, **extra)
    figures: dict = {}
    problems: list[str] = []
    for one in load.loads:
        got, found = verify(one, pg_dsn, [])
        problems += [f"task manager {one.sequence_id}: {p}" for p in found]
        for key, value in got.items():
            if key in ("timeout", "error_samples"):
                figures.setdefault(key, value)
            elif key == "max_call_seconds":
                figures[key] = max(figures.get(key, 0.0), value)
            elif isinstance(value, dict):
                merged = figures.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                figures[key] = figures.get(key, 0) + value
    figures["hung_calls"] = len(hung)
    if hung:
        problems.append(f"calls that never returned ({len(hung)}): {hung[:8]}")
    figures.update(extra)
    return figures, problems
