"""``dataspace-worker`` subprocesses as the fault tests run them: their environment
(DEBUG logging, so that replayed requests can be counted), a starter that keeps them
for teardown, and the tail of a worker's log worth showing when a test fails."""

from __future__ import annotations

import contextlib
import os

from tests.support.worker_process import WorkerProcess

#: what a worker prints once it consumes requests
CONSUMING = "consuming 'dataspace.requests'"


def worker_env(amqp_url: str, pg_dsn: str, consumers: int = 4) -> dict:
    return {
        "DATASPACE_AMQP_URL": amqp_url,
        "DATASPACE_PG_DSN": pg_dsn,
        "DATASPACE_CONSUMERS": str(consumers),
        "DATASPACE_PREFETCH": "4",
        "DATASPACE_DRAIN_TIMEOUT": "5",
        # DEBUG: one line per request, marked "(replayed)" when the idempotency
        # record answered it; the tests count those.
        "DATASPACE_LOG_LEVEL": "DEBUG",
    }


def replays(workers) -> int:
    """Requests the given workers answered from the request log instead of running them."""
    return sum(" (replayed) in " in line for w in workers for line in list(w.lines))


class WorkerStarter:
    """Starts ``dataspace-worker`` subprocesses and remembers them for teardown."""

    def __init__(self):
        self.workers: list[WorkerProcess] = []

    def __call__(self, env: dict, timeout: float = 30) -> WorkerProcess:
        worker = WorkerProcess(env)
        self.workers.append(worker)
        worker.wait_for(CONSUMING, timeout)
        return worker

    def replays(self) -> int:
        return replays(self.workers)

    def stop_all(self, keep_in: str | None = None) -> None:
        """Stop every worker; with ``keep_in`` (a directory), write each one's whole
        log there for a post-mortem (``DATASPACE_TEST_LOG_DIR`` sets it)."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                with contextlib.suppress(Exception):
                    worker.terminate(10)
            worker.kill()
        if keep_in:
            os.makedirs(keep_in, exist_ok=True)
            for worker in self.workers:
                path = os.path.join(keep_in, f"worker-{worker.proc.pid}.log")
                with open(path, "w") as out:
                    out.write(worker.output + "\n")


def tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` log lines of the worker's own loggers, without the DEBUG lines
    and the line of each request that went well (pika's reconnection errors and
    tracebacks left out too)."""
    kept = [
        line
        for line in text.splitlines()
        if " dataspace_worker" in line and " DEBUG " not in line and not _request_ok(line)
    ]
    return "\n".join(kept[-lines:])


def _request_ok(line: str) -> bool:
    """A worker's per-request log line for a request answered "ok"."""
    return "(correlation " in line and (" ok in " in line or " ok (replayed) in " in line)
