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
without being handed an object: ``metrics.REQUESTS.labels(...).inc()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "dataspace_requests",
    "Requests handled, by operation and outcome (ok or the protocol's error code)",
    ["operation", "outcome"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "dataspace_request_seconds",
    "Time to handle one request in the database thread, by operation",
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
REPLAYED = Counter(
    "dataspace_replays",
    "Writes answered from the idempotency record instead of being applied again",
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
REPLIES_TOO_LARGE = Counter(
    "dataspace_replies_too_large",
    "Replies over the broker's max_message_size, answered with a too_large error instead",
    registry=REGISTRY,
)
REAPS = Counter(
    "dataspace_reaps", "Reaps run by this worker, by outcome", ["outcome"], registry=REGISTRY
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
