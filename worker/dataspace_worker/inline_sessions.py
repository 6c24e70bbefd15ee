"""Opening the asynchronous PostgreSQL sessions the I/O thread reads on
(inline_reads.py), without the I/O thread ever waiting for one.

Each session is opened on a short thread of its own: connect in asynchronous
mode, prepare the statements of ``queries.INLINE_READS``, then hand the
connection to the I/O thread (``ready``, run there). Sessions belong to one
AMQP connection's event loop (``attach``): a session opened for a loop since
gone is closed, whether it arrives before or after ``detach``. An attempt that
failed is made again after a pause: 1 s, doubling to 30 s, back to 1 s once one
opens.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable

import psycopg2
import psycopg2.extensions

from . import queries
from .db_pool import KEEPALIVES

log = logging.getLogger("dataspace_worker.consumer")

#: seconds between attempts to open a session, after a failure: at first and at most
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


class SessionOpener:
    """Opens sessions for one event loop at a time (I/O thread, but ``_connect``)."""

    def __init__(self, datasource, ready: Callable[[psycopg2.extensions.connection], None]):
        """``datasource``: where its DSN and connection settings come from;
        ``ready(conn)``: a session opened, on the I/O thread."""
        self._datasource = datasource
        self._ready = ready
        self._ioloop = None
        self._retry = RETRY_FIRST
        self._lock = threading.Lock()  # guards _generation and _unclaimed
        self._generation = 0
        #: opened, on their way to the I/O thread: closed by ``detach``
        self._unclaimed: set = set()

    def attach(self, ioloop) -> None:
        """Open sessions for ``ioloop`` from now on."""
        self.detach()
        self._ioloop = ioloop
        self._retry = RETRY_FIRST

    def detach(self) -> None:
        """The loop is gone: what is still being opened for it is closed."""
        with self._lock:
            self._generation += 1
            unclaimed, self._unclaimed = self._unclaimed, set()
        for conn in unclaimed:
            close(conn)
        self._ioloop = None

    def open(self, after_failure: bool = False) -> None:
        """Open one session; ``after_failure``: after the pause (doubling)."""
        if self._ioloop is None:
            return
        generation = self._generation
        if not after_failure:
            self._start(generation)
            return
        delay, self._retry = self._retry, min(RETRY_MAX, self._retry * 2)
        self._ioloop.call_later(delay, lambda: self._start(generation))

    def _start(self, generation: int) -> None:
        if generation != self._generation:
            return
        threading.Thread(
            target=self._connect,
            args=(self._ioloop, generation),
            name="dataspace-inline-reads-connect",
            daemon=True,
        ).start()

    def _connect(self, ioloop, generation: int) -> None:
        """(its own thread) Connect in asynchronous mode and prepare the statements;
        hand the session to the I/O thread."""
        ds = self._datasource
        conn = None
        try:
            conn = psycopg2.connect(
                ds.dsn,
                async_=1,
                connect_timeout=ds.connect_timeout,
                application_name=ds.application_name,
                **KEEPALIVES,
            )
            deadline = time.monotonic() + ds.connect_timeout
            wait(conn, deadline)
            cursor = conn.cursor()
            for read in queries.INLINE_READS.values():
                cursor.execute(read.statement.prepare)
                wait(conn, deadline)
        except Exception as exc:
            if conn is not None:
                close(conn)
            ioloop.add_callback_threadsafe(lambda e=exc: self._failed(generation, e))
            return
        with self._lock:  # detach closes what it finds here; a later one is stale
            current = generation == self._generation
            if current:
                self._unclaimed.add(conn)
        if not current:
            close(conn)
            return
        ioloop.add_callback_threadsafe(lambda: self._opened(generation, conn))

    def _opened(self, generation: int, conn) -> None:
        with self._lock:
            self._unclaimed.discard(conn)
            current = generation == self._generation
        if not current:
            close(conn)
            return
        self._retry = RETRY_FIRST
        self._ready(conn)

    def _failed(self, generation: int, exc: BaseException) -> None:
        if generation != self._generation:
            return
        log.debug("opening a session for reads on the I/O thread failed: %s", exc)
        self.open(after_failure=True)


def wait(conn, deadline: float) -> None:
    """Poll an asynchronous connection until its current step is done (a thread
    of its own: this waits)."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise psycopg2.OperationalError("timed out")
        waiting = select.poll()
        reading = state == psycopg2.extensions.POLL_READ
        waiting.register(conn.fileno(), select.POLLIN if reading else select.POLLOUT)
        waiting.poll(left * 1000)


def close(conn) -> None:
    try:
        conn.close()
    except Exception:  # closing what failed: nothing more to do
        pass
