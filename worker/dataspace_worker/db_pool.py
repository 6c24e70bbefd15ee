"""A small blocking pool of psycopg2 connections.

psycopg2's own ThreadedConnectionPool raises at once when it is exhausted; here
a caller waits for a free connection instead, so many threads can share a few
connections.  Broken connections are discarded, never handed out again.

A pool belongs to the process that made it. In a child forked from that process
the pool's connections are the parent's sessions: the child's copy drops them
without a word to the server (``drop_inherited``), takes fresh locks, and opens
connections of its own on demand; the parent's sessions carry on untouched.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref

import psycopg2
import psycopg2.extensions

from dataspace_core.errors import DataSpaceConnectionError

log = logging.getLogger(__name__)

#: TCP keepalives on both ends of every pooled connection. A worker whose link is cut
#: in the middle of a transaction leaves its session open on the server, holding
#: the idempotency claims of the requests the broker then gives to other workers,
#: whose claims wait on them: with the server's default (2 h before the first probe)
#: a healthy worker stalled until the link came back (tests/faults/test_hosts.py).
#: With these the server ends such a session (and rolls it back) in about 20 s, and
#: the worker notices a dead server as soon.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=3 -c tcp_keepalives_count=3",
}

#: Inherited connections that may have been in use by a parent thread at the fork:
#: psycopg2 holds a connection's mutex while a statement runs, and closing it takes
#: that mutex, which in the child stays locked forever. They are pointed at
#: /dev/null and kept here, never closed.
_KEPT: list = []


def drop_inherited(conn, busy: bool = False) -> None:
    """Drop a libpq connection inherited through a fork without ending the parent's
    session.

    ``conn.close()`` sends a Terminate message on the socket, which the child
    shares with the parent: the server ends the parent's session (measured).
    Collecting the connection does not (psycopg2 2.9 skips closing one made by
    another process), but leaves the child holding the parent's socket. Here the
    child's descriptor is pointed at /dev/null first, so the Terminate goes
    nowhere and closing releases the descriptor only.
    ``busy``: the connection may be in use by a thread of the parent at the fork;
    it is not closed but kept (see ``_KEPT``).
    """
    if conn.closed:
        return
    try:
        fd = conn.fileno()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    except (OSError, psycopg2.Error):
        _KEPT.append(conn)  # not pointed away: closing it would end the parent's session
        return
    if busy:
        _KEPT.append(conn)
    else:
        conn.close()


class ConnectionPool:
    """Up to ``size`` connections to ``dsn``, opened on demand."""

    def __init__(self, dsn: str, size: int, acquire_timeout: float = 60.0, **connect_kwargs):
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.dsn = dsn
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._connect_kwargs = connect_kwargs
        self._closed = False
        self._fresh_state()
        _POOLS.add(self)

    def _fresh_state(self) -> None:
        """New locks and no connections, owned by the calling process."""
        self._pid = os.getpid()
        self._slots = threading.BoundedSemaphore(self.size)
        self._idle: queue.LifoQueue[psycopg2.extensions.connection] = queue.LifoQueue()
        self._lock = threading.Lock()  # guards _opened and _in_use
        #: every connection this pool opened and did not close: idle or in use
        self._opened: set[psycopg2.extensions.connection] = set()
        self._in_use = 0

    def _check_process(self) -> None:
        """In a child forked since the pool's connections were opened: drop them
        (``drop_inherited``), and start afresh with new locks: one held by a parent
        thread at the fork would stay held here."""
        if self._pid == os.getpid():
            return
        idle = {id(conn) for conn in list(self._idle.queue)}  # no lock: we are alone
        inherited = list(self._opened)
        self._fresh_state()
        for conn in inherited:
            drop_inherited(conn, busy=id(conn) not in idle)

    def acquire(self) -> psycopg2.extensions.connection:
        """A connection for the caller's exclusive use; give it back with ``release``."""
        self._check_process()
        if self._closed:
            raise DataSpaceConnectionError("the connection pool is closed")
        slots = self._slots
        if not slots.acquire(timeout=self.acquire_timeout):
            raise DataSpaceConnectionError(
                f"no database connection free within {self.acquire_timeout:g} s "
                f"(pool size {self.size})"
            )
        try:
            conn = self._idle_or_new()
        except BaseException:
            slots.release()
            raise
        with self._lock:
            self._in_use += 1
        return conn

    def _idle_or_new(self) -> psycopg2.extensions.connection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = psycopg2.connect(self.dsn, **self._connect_kwargs)
                with self._lock:
                    self._opened.add(conn)
                return conn
            if not conn.closed:
                return conn
            self._forget(conn)

    def _forget(self, conn) -> None:
        with self._lock:
            self._opened.discard(conn)

    def release(self, conn: psycopg2.extensions.connection, discard: bool = False) -> None:
        """Give a connection back; ``discard`` closes it (after an error on it)."""
        self._check_process()
        with self._lock:
            ours = conn in self._opened
        if not ours:
            # acquired before a fork, in the parent: dropped at the fork (and not
            # counted in this process's slots)
            return
        try:
            if discard or self._closed or conn.closed:
                self._forget(conn)
                conn.close()
            else:
                self._idle.put(conn)
        finally:
            with self._lock:
                self._in_use -= 1
            self._slots.release()

    @property
    def in_use(self) -> int:
        """Connections handed out and not yet released."""
        return self._in_use

    @property
    def opened(self) -> int:
        """Connections open now (idle or in use)."""
        return len(self._opened)

    def close(self) -> None:
        """Close idle connections; those in use are closed when released. In a
        forked child, only the child's own: the parent's are dropped, not closed."""
        self._check_process()
        self._closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            self._forget(conn)
            conn.close()

    def reopen(self) -> None:
        """Drop idle connections and accept acquisitions again."""
        self.close()
        self._closed = False


#: every live pool of this process, for the after-fork hook
_POOLS: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        try:
            pool._check_process()
        except Exception:  # pragma: no cover - never let one pool break the others
            log.exception("connection pool: dropping the parent's connections failed")


os.register_at_fork(after_in_child=_after_fork_in_child)
