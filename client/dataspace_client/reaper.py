"""Reaper: deletes data older than the retention interval, once or periodically.

The seed's API and states: ``start()`` runs a thread that reaps every
``seconds_between_runs``. What one reap does follows the configured datasource:
with ``RemoteDataSource`` it sends one retention message to the workers' reaper
(one active across all workers) and waits for its result; in process it deletes
directly, in bounded batches. Either way it returns
``{"taskmanagers": n, "dataproducts": m, "batches": b, "seconds": s}``.

Services should rather let the workers reap on the broker-held schedule
(``dataspace-worker --retention-days``, docs/retention.md); this class is for
programs written against the original API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from dataspace_core.errors import DataSpaceConfigurationError

from .dataspace import DataSpace
from .processing_state import STOPPING_CONDITIONS, ProcessingState, State

log = logging.getLogger(__name__)


def _whole_number(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


class Reaper:
    """Periodic deletion of data older than ``retention_interval`` days.

    The class attributes are floors that user configuration cannot go below.
    """

    MIN_RETENTION_INTERVAL_DAYS = 7
    MIN_SECONDS_BETWEEN_RUNS = 2 * 60 * 59

    def __init__(self, config: dict):
        if not isinstance(config, Mapping) or not isinstance(config.get("dataspace"), Mapping):
            raise DataSpaceConfigurationError(
                "Reaper configuration is missing dataspace information"
            )
        settings = config["dataspace"]
        if "retention_interval_in_days" not in settings:
            raise DataSpaceConfigurationError(
                "Reaper configuration lacks dataspace.retention_interval_in_days"
            )
        self.retention_interval = settings["retention_interval_in_days"]
        self.seconds_between_runs = settings.get("reaper_run_interval", 24 * 60 * 60)
        self.datasource = DataSpace(config)
        self.state = ProcessingState(State.BOOT)
        self._reap_lock = threading.Lock()
        self._control = threading.Lock()  # start() and stop() one at a time
        self.thread: threading.Thread | None = None

    @property
    def retention_interval(self) -> int:
        """Days of data kept; at least MIN_RETENTION_INTERVAL_DAYS."""
        return self._retention_interval

    @retention_interval.setter
    def retention_interval(self, value) -> None:
        value = _whole_number(value, "retention_interval_in_days")
        if value < self.MIN_RETENTION_INTERVAL_DAYS:
            raise ValueError(
                f"retention_interval_in_days {value} is below the minimum of "
                f"{self.MIN_RETENTION_INTERVAL_DAYS} days"
            )
        self._retention_interval = value

    @property
    def seconds_between_runs(self) -> int:
        """Seconds from one reap to the next; at least MIN_SECONDS_BETWEEN_RUNS."""
        return self._seconds_between_runs

    @seconds_between_runs.setter
    def seconds_between_runs(self, value) -> None:
        value = _whole_number(value, "reaper_run_interval")
        if value < self.MIN_SECONDS_BETWEEN_RUNS:
            raise ValueError(
                f"reaper_run_interval {value} is below the minimum of "
                f"{self.MIN_SECONDS_BETWEEN_RUNS} seconds"
            )
        self._seconds_between_runs = value

    def reap(self):
        """Delete data older than the retention interval once.

        A reap cannot be cancelled, so concurrent calls wait for each other.
        """
        with self._reap_lock:
            log.info("reaping data older than %s days", self.retention_interval)
            source = self.datasource.datasource
            reap = getattr(source, "reap", None)
            if reap is None:  # a third-party datasource: the seed's one-shot delete
                return source.delete_data_older_than(self.retention_interval)
            return reap(self.retention_interval)

    def _reaper_loop(self, delay: float) -> None:
        """The thread runs this: wait ``delay``, then reap every ``seconds_between_runs``.

        It ends when the state becomes a stopping one, whoever sets it: ``stop()``,
        or a caller's ``state.set(State.OFFLINE)`` as the engine's tests do.
        """
        between_runs, waiting = delay, State.IDLE  # IDLE before the first reap, then STEADY
        while self.state.set_unless_stopping(waiting):
            self.state.wait_until(STOPPING_CONDITIONS, timeout=between_runs)
            if not self.state.set_unless_stopping(State.ACTIVE):
                break
            try:
                self.reap()
            except Exception:
                log.exception("reap failed; the reaper stops in ERROR (start() tries again)")
                self.state.set(State.ERROR)
                return
            between_runs, waiting = self.seconds_between_runs, State.STEADY
        with self.state.lock:
            if not self.state.has_value(State.ERROR):
                self.state.set(State.SHUTDOWN)

    def start(self, delay: float = 0) -> None:
        """Start the loop, first reap after ``delay`` seconds; RuntimeError if running.

        Returns once the loop has left BOOT.
        """
        with self._control:
            if self.thread is not None and self.thread.is_alive():
                raise RuntimeError("Reaper asked to start, but it is running already")
            self.state.set(State.BOOT)
            self.thread = threading.Thread(
                target=self._reaper_loop, args=(delay,), name="dataspace-reaper", daemon=True
            )
            self.thread.start()
            self.state.wait_while(State.BOOT)

    def stop(self) -> None:
        """Stop the loop; waits for a reap in progress.  Harmless if not running.

        The state is SHUTTINGDOWN at once (a reap cannot be cancelled), then
        SHUTDOWN once the loop ended; a reaper in ERROR stays in ERROR.
        """
        with self._control:
            if self.thread is None or not self.thread.is_alive():
                return
            self.state.set_unless_stopping(State.SHUTTINGDOWN)
            self.thread.join()

    def __repr__(self) -> str:
        return (
            f"Reaper(state={self.state.get().name}, retention_interval={self.retention_interval}, "
            f"seconds_between_runs={self.seconds_between_runs})"
        )
