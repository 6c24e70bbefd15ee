"""The reap: retention in many short transactions, a part of ``PostgresDataSource``.

``delete_data_older_than`` deletes in one transaction, which holds its locks
(and blocks the task managers it touches) until everything old is gone. A reap
deletes the same rows in batches of ``reap_batch``, each its own transaction,
so other task managers' reads and writes carry on while it works. The worker's
reaper queue (``reaper.py``) runs it; the schedule that sends it is there too.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import psycopg2

from dataspace_core import validate
from dataspace_core.errors import DataSpaceConnectionError

from . import metrics, sql
from .queries import one_row

#: the reap logs as a part of PostgresDataSource, under its logger's name (which
#: operators' log filters and the tests select)
log = logging.getLogger("dataspace_worker.postgres")


class ReapInterrupted(DataSpaceConnectionError):
    """The worker is stopping: a reap stops between two batches (and is redelivered)."""


def _count(cur, query: str, params: dict) -> int:
    """Rows a statement removed: its SELECT count(*) result, or its rowcount."""
    cur.execute(query, params)
    return cur.fetchone()[0] if cur.description else cur.rowcount


class Reaping:
    """``reap`` and ``seconds_since_last_reap`` for PostgresDataSource, which gives
    them ``dsn``, ``connect_timeout``, ``reap_batch``, ``_stop_event``,
    ``_transaction`` (run on a cursor, committed) and ``_retrying`` (the retry policy)."""

    #: seconds between two "reap in progress" log lines of a long reap (at most one
    #: per batch, so a batch longer than this gets one line)
    reap_progress_interval = 5.0

    def reap(self, days):
        """Delete task managers older than ``days`` days, and their products, in batches.

        Unlike ``delete_data_older_than`` (one transaction), this runs many short
        transactions of at most ``reap_batch`` rows each, so other task managers'
        reads and writes carry on while it works; the cut-off is fixed when it
        starts. Interrupted, it leaves a consistent store and the next reap
        continues. One reap runs at a time per database (an advisory lock); a
        second one returns at once with ``skipped`` true. Recorded in
        ``dataspace_reap``. Returns ``{"taskmanagers": n, "dataproducts": m,
        "batches": b, "seconds": s, "skipped": bool}``.

        Logs a progress line at most every ``reap_progress_interval`` seconds while
        it runs and one summary line at the end; counts deleted rows in
        ``dataspace_reap_deleted_rows_total`` as each batch commits, and a complete
        reap in ``dataspace_reap_last_success_timestamp_seconds`` and
        ``dataspace_reap_last_duration_seconds``.
        """
        args = validate.check("reap", {"days": days})
        clock = time.monotonic()
        totals = {"taskmanagers": 0, "dataproducts": 0, "batches": 0}
        with self._reap_lock() as acquired:
            if not acquired:
                log.info("another reap is running on this database; skipping this one")
                return {**totals, "seconds": 0.0, "skipped": True}
            self._reap_batches(args, totals, clock)
        seconds = time.monotonic() - clock
        metrics.REAP_LAST_DURATION.set(seconds)
        metrics.REAP_LAST_SUCCESS.set_to_current_time()
        log.info(
            "reaped task managers older than %s days: %d task managers, %d products "
            "in %d batches, %.1f s",
            args["days"],
            totals["taskmanagers"],
            totals["dataproducts"],
            totals["batches"],
            seconds,
        )
        return {**totals, "seconds": round(seconds, 3), "skipped": False}

    def _reap_batches(self, args: dict, totals: dict, clock: float) -> None:
        cutoff, started_at = self._transaction(lambda cur: one_row(cur, sql.REAP_CUTOFF, args))
        params = {"cutoff": cutoff, "batch": self.reap_batch}
        last_line = clock
        for statement, counted, table in (
            (sql.REAP_PRODUCTS, "dataproducts", "dataproduct"),
            (sql.REAP_TASKMANAGERS, "taskmanagers", "taskmanager"),
        ):
            # Until a batch finds nothing: a short batch may only mean that rows it
            # picked were deleted meanwhile by someone else.
            while True:
                if self._stop_event is not None and self._stop_event.is_set():
                    raise ReapInterrupted(f"reap interrupted after {totals}; the next continues")
                deleted = self._transaction(lambda cur, q=statement: _count(cur, q, params))
                totals[counted] += deleted
                totals["batches"] += 1
                metrics.REAP_DELETED_ROWS.labels(table).inc(deleted)
                now = time.monotonic()
                if now - last_line >= self.reap_progress_interval:
                    last_line = now
                    self._log_progress(totals, now - clock)
                if deleted == 0:
                    break
        record = {**args, **totals, "started_at": started_at}
        self._transaction(lambda cur: cur.execute(sql.RECORD_REAP, record))

    @staticmethod
    def _log_progress(totals: dict, seconds: float) -> None:
        log.info(
            "reap in progress: %d batches, %d products and %d task managers deleted so far, %.1f s",
            totals["batches"],
            totals["dataproducts"],
            totals["taskmanagers"],
            seconds,
        )

    @contextmanager
    def _reap_lock(self):
        """Hold the database-wide reap lock on a connection of its own, if free."""
        conn = self._retrying(
            lambda: psycopg2.connect(
                self.dsn, connect_timeout=self.connect_timeout, application_name="dataspace-reap"
            )
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.TRY_REAP_LOCK, (sql.REAP_LOCK_KEY,))
                acquired = cur.fetchone()[0]
            yield acquired
        finally:
            conn.close()  # ends the session, and with it the lock

    def seconds_since_last_reap(self) -> float | None:
        """Seconds since the last recorded reap finished, or None if there was none."""
        age = self._transaction(lambda cur: one_row(cur, sql.LAST_REAP_AGE, {}))[0]
        return None if age is None else float(age)
