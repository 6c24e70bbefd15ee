"""The connection a PostgresDataSource answers health checks on, outside its pool.

``/readyz`` asks ``PostgresDataSource.ping`` whether the database answers now:
no retry, and no waiting for a pooled connection that a long transaction holds.
So the ping keeps one connection of its own, opened on demand and dropped when
it fails.

Like the pool (``db_pool.py``), it belongs to the process that made it: in a
forked child the parent's connection is dropped without ending the parent's
session, and the child opens its own on its first ping.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import psycopg2

from .db_pool import drop_inherited

#: under PostgresDataSource's logger's name, whose part this is
log = logging.getLogger("dataspace_worker.postgres")


class HealthConnection:
    """The connection ``ping`` keeps, outside the pool, and the process it belongs to."""

    def __init__(self):
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.conn = None
        _LIVE.add(self)

    def check_process(self) -> None:
        """In a forked child: drop the parent's connection without ending its session
        (in use if a parent thread held the lock at the fork), and take a fresh lock."""
        if self.pid == os.getpid():
            return
        conn, self.conn = self.conn, None
        busy = self.lock.locked()
        self.pid = os.getpid()
        self.lock = threading.Lock()
        if conn is not None:
            drop_inherited(conn, busy)

    def ping(self, dsn: str, timeout: int) -> bool:
        """Whether PostgreSQL at ``dsn`` answers ``SELECT 1`` now."""
        self.check_process()
        with self.lock:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg2.connect(
                        dsn, connect_timeout=timeout, application_name="dataspace-health"
                    )
                    self.conn.autocommit = True
                with self.conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return True
            except psycopg2.Error:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                return False

    def close(self) -> None:
        self.check_process()
        with self.lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


#: every live HealthConnection of this process, for the after-fork hook
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for health in list(_LIVE):
        try:
            health.check_process()
        except Exception:  # pragma: no cover - never let one break the others
            log.exception("dropping the parent's health connection failed")


os.register_at_fork(after_in_child=_after_fork_in_child)
