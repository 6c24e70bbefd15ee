"""Periodic upkeep that no request triggers: forgetting old idempotency records.

Records must outlive any redelivery or client re-send of their request (those
happen within minutes); the default keeps them a day. Each sweep deletes in
bounded batches so it never holds long locks.
"""

from __future__ import annotations

import logging
import threading

from dataspace_client.errors import DataSpaceError

log = logging.getLogger(__name__)

SWEEP_BATCH = 10_000


class RequestLogSweeper:
    """A thread that deletes request-log records older than ``ttl`` every ``interval``."""

    def __init__(self, datasource, ttl: float, interval: float, stop: threading.Event):
        self.datasource = datasource
        self.ttl = ttl
        self.interval = interval
        self.stop = stop
        self.thread = threading.Thread(target=self._run, name="dataspace-sweeper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def sweep(self) -> int:
        """Delete every expired record, batch by batch; return how many."""
        total = 0
        while not self.stop.is_set():
            deleted = self.datasource.sweep_request_log(self.ttl, SWEEP_BATCH)
            total += deleted
            if deleted < SWEEP_BATCH:
                break
        return total

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                deleted = self.sweep()
            except DataSpaceError as exc:
                log.warning("request log sweep failed: %s", exc)
                continue
            if deleted:
                log.info("forgot %d idempotency records older than %gs", deleted, self.ttl)
