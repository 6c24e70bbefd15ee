"""Fast reads answered on the worker's I/O thread, over PostgreSQL connections in
asynchronous mode that the same event loop watches.

A read that goes to a database thread is handed over twice, to that thread and
back to the I/O thread for its reply: two thread switches of ~100 µs each on a
get's path (docs/performance.md, "Where one request's time goes"). Here the I/O
thread sends the read's one prepared statement itself, goes on with its loop,
and replies when the answer comes in.

Only the plain case runs here: a first delivery from ``dataspace.reads`` of a
read that is one statement (``queries.SINGLE_STATEMENT_READS``), with headers
and a ``reply_to`` that pass the checks, while a connection is free. Everything
else, and anything that goes wrong here (a connection lost, an error from the
server, a value large enough to be read by COPY), goes to the consumer's
database thread, which answers it as before. A read may then run twice; it
changes nothing.

Connections are opened (and their statements prepared) on a short thread of
their own, so that the I/O thread never waits for one; they belong to one AMQP
connection's event loop and are closed with it. Their deliveries are acked one
by one (``Consumer.inline``): one ``multiple`` ack from the database thread
could otherwise settle a delivery still running here.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from pika.adapters.select_connection import PollEvents

from dataspace_core import protocol
from dataspace_core.protocol import READS_QUEUE, operation_named_by

from . import metrics, queries
from .database_thread import Consumer, Handled, request_of
from .db_pool import KEEPALIVES
from .delivery import Delivery, refused_reply_to
from .dispatch import Dispatcher, Outcome

log = logging.getLogger("dataspace_worker.consumer")

#: seconds between attempts to open a connection that failed, at first and at most
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
_POLL_OK = psycopg2.extensions.POLL_OK
_POLL_READ = psycopg2.extensions.POLL_READ
_POLL_WRITE = psycopg2.extensions.POLL_WRITE


@dataclass
class _Read:
    """A read running on a session."""

    consumer: Consumer
    delivery: Delivery
    operation: str
    checked: dict
    frames: bool
    cursor: object
    started: float


@dataclass
class _Session:
    """One asynchronous PostgreSQL connection on the event loop."""

    conn: psycopg2.extensions.connection
    fd: int
    read: _Read | None = None


class InlineReads:
    """Runs fast reads on the I/O thread while it has a free session (see module)."""

    def __init__(
        self,
        datasource,
        dispatcher: Dispatcher,
        bounds,
        settle: Callable[[Handled], None],
        sessions: int,
    ):
        """``settle``: the Settler's ``settle`` (I/O thread); ``sessions``: how many
        connections to keep open."""
        self._datasource = datasource
        self._dispatcher = dispatcher
        self._bounds = bounds
        self._settle = settle
        self._wanted = sessions
        self._ioloop = None
        self._generation = 0
        self._idle: list[_Session] = []
        self._busy: dict[int, _Session] = {}
        self._opening = 0
        self._retry = RETRY_FIRST
        #: reads answered here (the consumers count those their threads answer)
        self.handled = 0
        self._lock = threading.Lock()  # guards _unclaimed (opened, not yet on the loop)
        self._unclaimed: set = set()

    @classmethod
    def serving(cls, pool, sessions: int) -> InlineReads | None:
        """Inline reads for a ``WorkerPool``'s consumers of the fast read queue,
        with ``sessions`` connections; None without that queue."""
        reads_queue = pool.topology.reads_queue
        if reads_queue is None:
            return None
        dispatcher = pool.dispatcher
        inline = cls(dispatcher.datasource, dispatcher, pool.bounds, pool.settler.settle, sessions)
        pool.channels.inline = inline
        for consumer in pool.consumers:
            consumer.inline = consumer.queue_name == reads_queue.name
        return inline

    # -- any thread ---------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Reads running here now."""
        return len(self._busy)

    # -- I/O thread ----------------------------------------------------------------------
    def attach(self, ioloop) -> None:
        """A new AMQP connection's event loop: open the sessions on it."""
        self.detach()
        self._ioloop = ioloop
        self._retry = RETRY_FIRST
        for _ in range(self._wanted):
            self._open()

    def detach(self) -> None:
        """The AMQP connection is gone: close every session. What ran on them is
        dropped: its channel closed with the connection, and the broker gives it
        back."""
        self._generation += 1
        self._ioloop = None
        for session in [*self._idle, *self._busy.values()]:
            _close(session.conn)
        self._idle.clear()
        self._busy.clear()
        self._opening = 0
        with self._lock:
            unclaimed, self._unclaimed = self._unclaimed, set()
        for conn in unclaimed:
            _close(conn)

    def try_run(self, consumer: Consumer, delivery: Delivery) -> bool:
        """Start ``delivery`` here if it is a plain fast read and a session is free;
        False leaves it to the consumer's database thread."""
        if not self._idle or delivery.redelivered or consumer.queue_name != READS_QUEUE:
            return False
        if operation_named_by(delivery.routing_key) not in queries.SINGLE_STATEMENT_READS:
            return False
        if self._bounds.oversized_headers(delivery) or refused_reply_to(delivery):
            return False
        parsed = self._dispatcher.parsed(request_of(delivery))
        if parsed is None or parsed[0].name not in queries.SINGLE_STATEMENT_READS:
            return False
        op, checked, frames = parsed
        read = queries.SINGLE_STATEMENT_READS[op.name]
        session = self._idle.pop()
        params = read.params(checked)
        try:
            cursor = session.conn.cursor()
            cursor.execute(read.statement.execute, [params[p] for p in read.statement.parameters])
        except Exception as exc:
            self._broken(session, exc)
            return False
        session.read = _Read(consumer, delivery, op.name, checked, frames, cursor, time.monotonic())
        self._busy[session.fd] = session
        metrics.IN_FLIGHT.inc()
        self._advance(session)
        return True

    def _on_events(self, fd: int, _events: int) -> None:
        session = self._busy.get(fd)
        if session is None:  # an idle session readable: a notice, or the server left
            session = next((s for s in self._idle if s.fd == fd), None)
            if session is not None:
                try:
                    session.conn.poll()
                except Exception as exc:
                    self._idle.remove(session)
                    self._broken(session, exc)
            return
        self._advance(session)

    def _advance(self, session: _Session) -> None:
        """Let libpq go on with the session's statement; finish it once answered."""
        try:
            state = session.conn.poll()
        except Exception as exc:
            self._give_up(session, exc)
            return
        if state == _POLL_OK:
            self._finish(session)
        elif state == _POLL_WRITE:
            self._ioloop.update_handler(session.fd, PollEvents.WRITE)
        else:
            self._ioloop.update_handler(session.fd, PollEvents.READ)

    def _finish(self, session: _Session) -> None:
        read = session.read
        try:
            rows = read.cursor.fetchall()
        except Exception as exc:
            self._give_up(session, exc)
            return
        self._done(session)
        operation = read.operation

        def outcome() -> Outcome | None:
            result = queries.SINGLE_STATEMENT_READS[operation].result(read.checked, rows)
            if result is queries.LARGE:
                return None
            op = protocol.OPERATIONS[operation]
            return Outcome(protocol.encode_result(op, result, read.frames), "ok", operation)

        answer = Dispatcher._outcome_of(operation, outcome)
        if answer is None:  # a large value: read by COPY on the database thread
            read.consumer.inbox.put(read.delivery)
            return
        answer = self._bounds.sendable(answer)
        read.consumer.report(read.delivery, answer, time.monotonic() - read.started)
        self.handled += 1
        self._settle(Handled(read.consumer, [read.delivery], [answer]))

    def _done(self, session: _Session) -> None:
        """The session's read is over: the session is free again."""
        del self._busy[session.fd]
        metrics.IN_FLIGHT.dec()
        session.read = None
        self._ioloop.update_handler(session.fd, PollEvents.READ)
        self._idle.append(session)

    def _give_up(self, session: _Session, exc: BaseException) -> None:
        """The session failed under its read: the read goes to the database thread."""
        read = session.read
        del self._busy[session.fd]
        metrics.IN_FLIGHT.dec()
        self._broken(session, exc)
        read.consumer.inbox.put(read.delivery)

    def _broken(self, session: _Session, exc: BaseException) -> None:
        log.debug("a session for reads on the I/O thread failed (%s); opening another", exc)
        try:
            self._ioloop.remove_handler(session.fd)
        except Exception:  # already gone with its loop
            pass
        _close(session.conn)
        self._open()

    # -- opening sessions ------------------------------------------------------------------
    def _open(self, delay: float = 0.0) -> None:
        """Open one session, on a thread of its own (after ``delay`` seconds)."""
        if self._ioloop is None:
            return
        self._opening += 1
        generation = self._generation
        if delay:
            self._ioloop.call_later(delay, lambda: self._start_opening(generation))
        else:
            self._start_opening(generation)

    def _start_opening(self, generation: int) -> None:
        if generation != self._generation:
            return
        ioloop = self._ioloop
        threading.Thread(
            target=self._connect,
            args=(ioloop, generation),
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
            _wait(conn, deadline)
            cursor = conn.cursor()
            for read in queries.SINGLE_STATEMENT_READS.values():
                cursor.execute(read.statement.prepare)
                _wait(conn, deadline)
        except Exception as exc:
            if conn is not None:
                _close(conn)
            ioloop.add_callback_threadsafe(lambda e=exc: self._failed(generation, e))
            return
        with self._lock:
            self._unclaimed.add(conn)
        ioloop.add_callback_threadsafe(lambda: self._opened(generation, conn))

    def _opened(self, generation: int, conn) -> None:
        with self._lock:
            self._unclaimed.discard(conn)
        if generation != self._generation:
            _close(conn)
            return
        self._opening -= 1
        self._retry = RETRY_FIRST
        session = _Session(conn, conn.fileno())
        self._ioloop.add_handler(session.fd, self._on_events, PollEvents.READ)
        self._idle.append(session)

    def _failed(self, generation: int, exc: BaseException) -> None:
        if generation != self._generation:
            return
        self._opening -= 1
        log.debug("opening a session for reads on the I/O thread failed: %s", exc)
        delay, self._retry = self._retry, min(RETRY_MAX, self._retry * 2)
        self._open(delay)


def _wait(conn, deadline: float) -> None:
    """Poll an asynchronous connection until its current step is done."""
    while True:
        state = conn.poll()
        if state == _POLL_OK:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise psycopg2.OperationalError("timed out")
        if state == _POLL_READ:
            select.select([conn.fileno()], [], [], left)
        elif state == _POLL_WRITE:
            select.select([], [conn.fileno()], [], left)


def _close(conn) -> None:
    try:
        conn.close()
    except Exception:  # closing what failed: nothing more to do
        pass
