"""``dataspace-worker``: run the consumer pool against RabbitMQ and PostgreSQL.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT, also while still waiting for
the database), 2 for a configuration error or a refusal by the broker
(credentials, permissions, queue arguments), 1 when a second signal cut the
drain short.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
)
from dataspace_core.urls import mask_password

from . import __version__, config, logs, memory, metrics
from .assembly import build_worker, database_config, database_connections, start_worker
from .config import mask_dsn
from .dead_letters import log_dead_letter_summary
from .identity import Identity
from .postgres import PostgresDataSource
from .worker_pool import WorkerPool

log = logging.getLogger("dataspace_worker")

EXAMPLES = """\
examples:
  dataspace-worker                                   # local RabbitMQ and PostgreSQL
  dataspace-worker --consumers 8 --pg-dsn 'host=db user=dataspace dbname=dataspace'
  DATASPACE_AMQP_URL=amqp://svc:secret@mq:5672/prod dataspace-worker
  dataspace-worker --config /etc/dataspace/worker.toml
  dataspace-worker --demo                            # serve, and run a short client demo
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataspace-worker",
        description="Execute DataSpace requests from RabbitMQ against PostgreSQL.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_arguments(parser)
    parser.add_argument("--demo", action="store_true", help="once consuming, run a client demo")
    parser.add_argument(
        "--print-settings",
        action="store_true",
        help="print each setting's effective value and where it came from, then exit",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run_demo(amqp_url: str) -> None:
    """Put a DataBlock through the broker and read it back, printing each step."""
    from dataspace_client import DataBlock, DataSpace, Header

    space = DataSpace(
        {
            "dataspace": {
                "datasource": {
                    "module": "dataspace_client.remote",
                    "name": "RemoteDataSource",
                    "config": {"url": amqp_url, "app_id": "dataspace-demo"},
                }
            }
        }
    )
    try:
        block = DataBlock(space, "demo_taskmanager")
        print(
            f"demo: stored task manager {block.taskmanager_id} as sequence_id {block.sequence_id}"
        )
        block.put("resources", {"cpus": 4, "sites": ["FNAL", "CERN"]}, Header(block.taskmanager_id))
        print(f"demo: put 'resources' in generation {block.generation_id}")
        print(f"demo: read back {block['resources']!r}")
        print(f"demo: header {dict(block.get_header('resources'))}")
    finally:
        space.close()


def main(argv: list[str] | None = None) -> int:
    memory.tune()  # first, before any thread starts: see memory.py
    args = _parser().parse_args(argv)
    try:
        settings, sources = config.resolve(args)
    except DataSpaceConfigurationError as exc:
        print(f"dataspace-worker: {exc}", file=sys.stderr)
        return 2
    if args.print_settings:
        print(config.effective(settings, sources))
        return 0
    logs.configure(settings.log_level, settings.log_format)
    identity = Identity.of_this_process(settings.name)

    stop = threading.Event()
    signals_seen = []

    def on_signal(signum, _frame):
        signals_seen.append(signum)
        if len(signals_seen) > 1:  # a second signal: stop waiting for requests in hand
            log.warning(
                "second %s: exiting now; unacked requests are redelivered",
                signal.Signals(signum).name,
            )
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Health first: a probe must see a live process while the database or the
    # broker is still being waited for (the parts are filled in as they come).
    parts: dict = {}
    server = _serve_metrics(settings, parts)
    datasource = _open_database(settings, sources, identity, stop)
    if isinstance(datasource, int):  # an exit code: it said why
        if server is not None:
            server.shutdown()
        return datasource
    parts["datasource"] = datasource
    metrics.POOL_SIZE.set(datasource.pool_size)  # what was built (the same number)
    worker = build_worker(settings, datasource, stop=stop, identity=identity)
    pool = worker.pool
    log.info(
        "dataspace-worker %s (%s) starting: %d consumers, broker %s, database %s",
        __version__,
        identity.label,
        settings.consumers,
        mask_password(settings.amqp_url),
        mask_dsn(settings.pg_dsn),
    )
    parts["pool"] = pool
    start_worker(worker, settings, stop)
    if args.demo:
        threading.Thread(
            target=_demo_when_ready, args=(pool, settings.amqp_url), daemon=True
        ).start()
    while not stop.wait(0.5):
        pass
    if pool.fatal:
        pool.stop(settings.drain_timeout)
        datasource.close()
        log.error(
            "dataspace-worker stopped: %s (setting amqp_url, from %s)",
            pool.fatal,
            sources["amqp_url"],
        )
        return 2
    name = signal.Signals(signals_seen[0]).name if signals_seen else "stop"
    log.info("%s received: finishing requests in hand", name)
    drained = pool.stop(settings.drain_timeout)
    log_dead_letter_summary(force=True)
    datasource.close()
    if server is not None:
        server.shutdown()
    log.info(
        "dataspace-worker stopped: %d requests handled%s",
        pool.handled,
        "" if drained else f"; some still running after {settings.drain_timeout:g}s were requeued",
    )
    return 0


def _open_database(settings, sources: dict, identity: Identity, stop: threading.Event):
    """The worker's ``PostgresDataSource``, or the exit code when it cannot be had
    (after saying why): 2 for what retrying cannot cure, 1 when the wait for the
    database ended otherwise, 0 when a signal stopped that wait."""
    try:
        return PostgresDataSource(database_config(settings, identity), stop_event=stop)
    except DataSpaceConfigurationError as exc:
        # a database this worker must not touch (tables it cannot adopt), or one
        # that refuses it (role, password, TLS, no such database): retrying cannot
        # help, so say what and stop, as for a bad setting
        log.error(
            "dataspace-worker stopped, nothing was changed: %s (setting pg_dsn, from %s)",
            exc,
            sources["pg_dsn"],
        )
        return 2
    except DataSpaceConnectionError as exc:
        if stop.is_set():  # asked to stop while waiting: a clean stop
            log.info("stopped before the database was reached")
            return 0
        log.error("stopped before the database was reached: %s", exc)
        return 1
    except DataSpaceError as exc:
        # the database answered but refused the schema step (e.g. not the tables'
        # owner, no right to create the database): a setting or a grant to fix
        log.error("dataspace-worker stopped, the database refused its schema step: %s", exc)
        return 2


def _serve_metrics(settings, parts: dict):
    """The /metrics, /healthz, /readyz, /livez server, unless metrics_port is 0.

    ``parts`` gets "datasource" and "pool" once they exist; until then the
    worker is alive but neither healthy nor ready.
    """
    if not settings.metrics_port:
        return None

    def database() -> bool:
        source = parts.get("datasource")
        return source is not None and source.ping()

    def broker() -> bool:
        pool = parts.get("pool")
        return pool is not None and pool.connected()

    def ready() -> bool:
        pool = parts.get("pool")
        return pool is not None and pool.consuming.is_set()

    def alive() -> bool:
        pool = parts.get("pool")
        return pool is None or pool.alive()

    def in_use() -> int:
        source = parts.get("datasource")
        return source.pool_in_use if source is not None else 0

    metrics.POOL_SIZE.set(database_connections(settings))  # the datasource's pool_size
    metrics.POOL_IN_USE.set_function(in_use)
    health = metrics.Health(broker=broker, database=database, ready=ready, alive=alive)
    try:
        return metrics.serve(settings.metrics_host, settings.metrics_port, health)
    except OSError as exc:
        log.error(
            "cannot serve metrics on %s:%d: %s (set metrics_port, or 0 to turn it off)",
            settings.metrics_host,
            settings.metrics_port,
            exc,
        )
        return None


def _demo_when_ready(pool: WorkerPool, amqp_url: str) -> None:
    if not pool.consuming.wait(60):
        log.error("demo skipped: the pool did not start consuming within 60 s")
        return
    try:
        run_demo(amqp_url)
        print("demo: done; the worker keeps serving until Ctrl-C", flush=True)
    except Exception as exc:  # the demo must never take the worker down
        log.error("demo failed: %s", exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
