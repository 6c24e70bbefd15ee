"""A small blocking pool of psycopg2 connections.

psycopg2's own ThreadedConnectionPool raises at once when it is exhausted; here
a caller waits for a free connection instead, so many threads can share a few
connections.  Broken connections are discarded, never handed out again.
"""

from __future__ import annotations

import queue
import threading

import psycopg2
import psycopg2.extensions

from dataspace_client.errors import DataSpaceConnectionError


class ConnectionPool:
    """Up to ``size`` connections to ``dsn``, opened on demand."""

    def __init__(self, dsn: str, size: int, acquire_timeout: float = 60.0, **connect_kwargs):
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.dsn = dsn
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._connect_kwargs = connect_kwargs
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue[psycopg2.extensions.connection] = queue.LifoQueue()
        self._closed = False
        self._in_use = 0
        self._count_lock = threading.Lock()

    def acquire(self) -> psycopg2.extensions.connection:
        """A connection for the caller's exclusive use; give it back with ``release``."""
        if self._closed:
            raise DataSpaceConnectionError("the connection pool is closed")
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise DataSpaceConnectionError(
                f"no database connection free within {self.acquire_timeout:g} s "
                f"(pool size {self.size})"
            )
        try:
            conn = self._idle_or_new()
        except BaseException:
            self._slots.release()
            raise
        with self._count_lock:
            self._in_use += 1
        return conn

    def _idle_or_new(self) -> psycopg2.extensions.connection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return psycopg2.connect(self.dsn, **self._connect_kwargs)
            if not conn.closed:
                return conn

    def release(self, conn: psycopg2.extensions.connection, discard: bool = False) -> None:
        """Give a connection back; ``discard`` closes it (after an error on it)."""
        try:
            if discard or self._closed or conn.closed:
                conn.close()
            else:
                self._idle.put(conn)
        finally:
            with self._count_lock:
                self._in_use -= 1
            self._slots.release()

    @property
    def in_use(self) -> int:
        """Connections handed out and not yet released."""
        return self._in_use

    def close(self) -> None:
        """Close idle connections; those in use are closed when released."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def reopen(self) -> None:
        """Drop idle connections and accept acquisitions again."""
        self.close()
        self._closed = False
