"""Prometheus metrics and the health endpoints of a worker.

One HTTP server per worker (setting ``metrics_port``; 0 turns it off) serves:

- ``/metrics``  Prometheus text format;
- ``/healthz``  200 when the worker is connected to the broker and PostgreSQL
  answers, else 503; the body says which (JSON);
- ``/readyz``   the same, and also requires every consumer to be consuming;
- ``/livez``    200 while the worker's own threads run (its I/O loop and its
  database threads). For a liveness probe: an outage of the broker or of
  PostgreSQL is not cured by a restart (the worker reconnects by itself), a
  dead thread is.

The metrics are module-level, in one registry, so that any module can count
without being handed an object: ``metrics.REQUESTS.labels(...).inc()``. The
registry also holds the standard ``process_*`` (Linux) and ``python_*`` series
and ``dataspace_build_info``. Counters are declared without ``_total``:
prometheus_client appends it, so ``Counter("dataspace_requests")`` is scraped as
``dataspace_requests_total``. No ``*_created`` series are exposed (see below).
"""

from __future__ import annotations

import functools
import logging
import platform
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pika
import psycopg2
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from . import __version__

log = logging.getLogger(__name__)

# No ``<name>_created`` series: one more per counter and histogram child, holding
# the Unix time it was first used, which says nothing here (a restart shows in
# process_start_time_seconds) and clutters ``grep dataspace_``. The switch is
# prometheus_client's and process-wide; it exists since 0.17, the version
# pyproject.toml requires.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, memory, open files, start time: Linux only, from /proc),
# python_info, python_gc_*
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

BUILD_INFO = Info(
    "dataspace_build",
    "Versions of the worker and of what it runs on (the value is always 1)",
    registry=REGISTRY,
)
BUILD_INFO.info(
    {
        "version": __version__,
        "python": platform.python_version(),
        "pika": pika.__version__,
        # "2.9.13 (dt dec pq3 ext lo64)": the version alone
        "psycopg2": psycopg2.__version__.split()[0],
    }
)

REQUESTS = Counter(
    "dataspace_requests",
    "Requests handled, by operation and outcome (ok or the protocol's error code)",
    ["operation", "outcome"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "dataspace_request_seconds",
    "Time to handle one request (database thread, or I/O thread for a fast read), by operation",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "dataspace_requests_in_flight", "Requests being handled right now", registry=REGISTRY
)
REDELIVERED = Counter(
    "dataspace_redeliveries", "Deliveries the broker marked as redelivered", registry=REGISTRY
)
GUARDED_REPLIES = Counter(
    "dataspace_guarded_replies",
    "Replies to redelivered requests published on the guard's own connection, by "
    "result (sent, dropped: address of a node that is down, failed, abandoned)",
    ["result"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "dataspace_dead_lettered",
    "Requests sent to dataspace.dead, by error code",
    ["code"],
    registry=REGISTRY,
)
#: was ``dataspace_replays``, which operators read as ``dataspace dead replay``
IDEMPOTENT_DUPLICATES = Counter(
    "dataspace_idempotent_duplicates",
    "Writes delivered again (redelivered or sent twice) and answered from their "
    "idempotency record instead of being applied again",
    registry=REGISTRY,
)
DB_RETRIES = Counter(
    "dataspace_database_retries",
    "Database operations retried after a connection failure",
    registry=REGISTRY,
)
BROKER_CONNECTED = Gauge(
    "dataspace_broker_connected", "1 while the worker consumes from the broker", registry=REGISTRY
)
DATABASE_UP = Gauge(
    "dataspace_database_up", "1 if PostgreSQL answered the last health check", registry=REGISTRY
)
POOL_SIZE = Gauge(
    "dataspace_database_pool_size", "Connections the pool may open", registry=REGISTRY
)
POOL_IN_USE = Gauge("dataspace_database_pool_in_use", "Pool connections in use", registry=REGISTRY)
BYTES_IN_HAND = Gauge(
    "dataspace_request_bytes_in_hand",
    "Bytes of request bodies delivered to this worker and not yet settled",
    registry=REGISTRY,
)
CONSUMPTION_PAUSES = Counter(
    "dataspace_consumption_pauses",
    "Times the worker stopped taking requests, holding over max_bytes_in_hand",
    registry=REGISTRY,
)
READ_HOLDS = Counter(
    "dataspace_read_holds",
    "Times the worker stopped reading its broker socket before a large body that would "
    "take it over max_bytes_in_hand",
    registry=REGISTRY,
)
REPLIES_TOO_LARGE = Counter(
    "dataspace_replies_too_large",
    "Replies over the broker's max_message_size, answered with a too_large error instead",
    registry=REGISTRY,
)
REAPS = Counter(
    "dataspace_reaps",
    "Retention messages handled by this worker's reaper, by outcome (ok, skipped ones "
    "included, or the protocol's error code)",
    ["outcome"],
    registry=REGISTRY,
)
REAP_DELETED_ROWS = Counter(
    "dataspace_reap_deleted_rows",
    "Rows deleted by reaps, by table: dataproduct (each with its header and metadata "
    "rows, not counted) or taskmanager; counted as each batch commits",
    ["table"],
    registry=REGISTRY,
)
for _table in ("dataproduct", "taskmanager"):
    REAP_DELETED_ROWS.labels(_table)  # 0 before the first reap, not absent
REAP_LAST_SUCCESS = Gauge(
    "dataspace_reap_last_success_timestamp_seconds",
    "Unix time at which the last complete reap run by this process finished (0: none yet)",
    registry=REGISTRY,
)
REAP_LAST_DURATION = Gauge(
    "dataspace_reap_last_duration_seconds",
    "Duration of the last complete reap run by this process",
    registry=REGISTRY,
)


class Health:
    """What /healthz and /readyz report; the checks are callables so they stay cheap."""

    def __init__(
        self,
        broker: Callable[[], bool],
        database: Callable[[], bool],
        ready: Callable[[], bool],
        alive: Callable[[], bool] = lambda: True,
    ):
        self._broker = broker
        self._database = database
        self._ready = ready
        self._alive = alive

    def report(self, readiness: bool) -> tuple[bool, dict]:
        broker = bool(self._broker())
        database = bool(self._database())
        BROKER_CONNECTED.set(broker)
        DATABASE_UP.set(database)
        status = {"broker": broker, "database": database}
        if readiness:
            status["consuming"] = bool(self._ready())
        return all(status.values()), status


@functools.lru_cache(maxsize=1024)
def labelled(metric, *values: str):
    """``metric.labels(*values)``, kept: the labels are operation names and outcome
    codes, a few dozen in all, and each request counts under two of them (prometheus
    builds the key and takes a lock at every ``labels`` call)."""
    return metric.labels(*values)


def serve(host: str, port: int, health: Health) -> ThreadingHTTPServer:
    """Start the metrics and health server on a daemon thread; return it (``.shutdown()``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/livez":
                alive = bool(health._alive())
                self._send(
                    200 if alive else 503, orjson.dumps({"alive": alive}), "application/json"
                )
            elif path in ("/healthz", "/readyz"):
                healthy, status = health.report(readiness=path == "/readyz")
                self._send(200 if healthy else 503, orjson.dumps(status), "application/json")
            else:
                self._send(
                    404, b"not found: try /metrics, /healthz, /readyz or /livez\n", "text/plain"
                )

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds: keep them out of the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dataspace-metrics", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz, /livez", host, port)
    return server
