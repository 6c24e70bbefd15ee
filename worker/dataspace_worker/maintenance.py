"""Periodic upkeep that no request triggers.

``every`` runs a task on a thread at a fixed interval until the worker stops;
``RequestLogSweeper`` forgets old idempotency records. Records must outlive any
redelivery or client re-send of their request (those happen within minutes);
the default keeps them a day. Each sweep deletes in bounded batches so it never
holds long locks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pika.exceptions import AMQPError

from dataspace_core.errors import DataSpaceError

log = logging.getLogger(__name__)

SWEEP_BATCH = 10_000


def every(interval: float, task: Callable[[], object], stop: threading.Event, name: str):
    """Run ``task`` every ``interval`` seconds on a daemon thread until ``stop`` is set."""

    def run():
        while not stop.wait(interval):
            try:
                task()
            except (DataSpaceError, AMQPError, OSError) as exc:
                log.warning("%s failed: %s", name, str(exc) or type(exc).__name__)
            except Exception:
                log.exception("%s failed", name)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class RequestLogSweeper:
    """Deletes request-log records older than ``ttl`` seconds."""

    def __init__(self, datasource, ttl: float):
        self.datasource = datasource
        self.ttl = ttl

    def sweep(self) -> int:
        """Delete every expired record, batch by batch; return how many."""
        total = 0
        while True:
            deleted = self.datasource.sweep_request_log(self.ttl, SWEEP_BATCH)
            total += deleted
            if deleted < SWEEP_BATCH:
                break
        if total:
            log.info("forgot %d idempotency records older than %gs", total, self.ttl)
        return total
