"""Fast reads answered on the worker's I/O thread, over PostgreSQL connections in
asynchronous mode that the same event loop watches.

A read that goes to a database thread is handed over twice, to that thread and
back to the I/O thread for its reply: two thread switches of ~100 µs each on a
get's path (docs/performance.md, "Where one request's time goes"). Here the I/O
thread sends the read's one prepared statement itself, goes on with its loop,
and replies when the answer comes in.

Only the plain case runs here: a first delivery from ``dataspace.reads`` of a
read that is one statement (``queries.INLINE_READS``) with a small body, with
headers and a ``reply_to`` that pass the checks, while a connection is free.
Everything else, and anything that goes wrong here (a connection lost, an error
from the server, a result over ``COPY_FROM_BYTES`` of values: slow to decode
on the thread every channel shares), goes to the consumer's database thread,
which answers it as before. A read may then run twice; it changes nothing.
While the pool stops, its database threads may be gone: such a read is given
back to the broker instead (a nack), and asked again by its client.

Sessions are opened by ``inline_sessions.SessionOpener``, off the I/O thread;
they belong to one AMQP connection's event loop and are closed with it. The
consumers' deliveries are acked one by one (``Consumer.inline``): one
``multiple`` ack from the database thread could otherwise settle a delivery
still running here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from pika.adapters.select_connection import PollEvents

from dataspace_core import protocol
from dataspace_core.protocol import READS_QUEUE, operation_named_by

from . import metrics, queries
from .database_thread import Consumer, Handled, request_of
from .delivery import Delivery, refused_reply_to
from .dispatch import Dispatcher, Outcome
from .inline_sessions import SessionOpener, close

log = logging.getLogger("dataspace_worker.consumer")

#: the largest request body run here: a read's body is far smaller, and a larger
#: one is decoded on a database thread, not on the thread every channel shares
MAX_BODY = 64 * 1024
#: errors after which a session is closed (its connection, or its prepared
#: statements, are gone); after another error it serves the next read
_SESSION_LOST = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.errors.InvalidSqlStatementName,
    psycopg2.errors.FeatureNotSupported,
)
_POLL_OK = psycopg2.extensions.POLL_OK
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
        stopping: threading.Event,
    ):
        """``settle``: the Settler's ``settle`` (I/O thread); ``sessions``: how many
        connections to keep open; ``stopping``: the pool's."""
        self._dispatcher = dispatcher
        self._bounds = bounds
        self._settle = settle
        self._wanted = sessions
        self._stopping = stopping
        self._ioloop = None
        self._idle: list[_Session] = []
        self._busy: dict[int, _Session] = {}
        self._opener = SessionOpener(datasource, self._add)
        #: reads answered here (the consumers count those their threads answer)
        self.handled = 0

    @classmethod
    def serving(cls, pool, sessions: int) -> InlineReads | None:
        """Inline reads for a ``WorkerPool``'s consumers of the fast read queue,
        with ``sessions`` connections; None without that queue."""
        reads_queue = pool.topology.reads_queue
        if reads_queue is None:
            return None
        dispatcher = pool.dispatcher
        inline = cls(
            dispatcher.datasource,
            dispatcher,
            pool.bounds,
            pool.settler.settle,
            sessions,
            pool.stopping,
        )
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
        self._opener.attach(ioloop)
        for _ in range(self._wanted):
            self._opener.open()

    def detach(self) -> None:
        """The AMQP connection is gone: close every session. What ran on them is
        dropped: its channel closed with the connection, and the broker gives it
        back."""
        self._opener.detach()
        metrics.IN_FLIGHT.dec(len(self._busy))
        for session in [*self._idle, *self._busy.values()]:
            self._unwatch(session)
            close(session.conn)
        self._idle.clear()
        self._busy.clear()
        self._ioloop = None

    def try_run(self, consumer: Consumer, delivery: Delivery) -> bool:
        """Start ``delivery`` here if it is a plain fast read and a session is free;
        False leaves it to the consumer's database thread."""
        if not self._idle or delivery.redelivered or consumer.queue_name != READS_QUEUE:
            return False
        if len(delivery.body) > MAX_BODY:
            return False
        if operation_named_by(delivery.routing_key) not in queries.INLINE_READS:
            return False
        try:
            if self._bounds.oversized_headers(delivery) or refused_reply_to(delivery):
                return False
        except Exception:  # a bug: never on the I/O thread (its loop would end)
            return False  # the database thread answers it ('internal') and logs why
        parsed = self._dispatcher.parsed(request_of(delivery))
        if parsed is None:  # the body names the routing key's operation (admission)
            return False
        op, checked, frames = parsed
        read = queries.INLINE_READS[op.name]
        try:
            params = read.params(checked)
            values = [params[p] for p in read.statement.parameters]
        except Exception:  # not one this statement can take: the usual path says why
            return False
        session = self._idle.pop()
        try:
            cursor = session.conn.cursor()
            cursor.execute(read.statement.execute, values)
        except Exception as exc:
            self._failed_under(session, exc)
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
                    self._failed_under(session, exc)
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
            result = queries.INLINE_READS[operation].result(read.checked, rows)
            if result is queries.LARGE:
                return None
            op = protocol.OPERATIONS[operation]
            return Outcome(protocol.encode_result(op, result, read.frames), "ok", operation)

        answer = Dispatcher._outcome_of(operation, outcome)
        if answer is None:  # a large value: read on the database thread
            self._elsewhere(read)
            return
        answer = self._bounds.sendable(answer)
        delivery = self._bounds.keepable(read.delivery, answer)
        read.consumer.report(delivery, answer, time.monotonic() - read.started)
        self.handled += 1
        self._settle(Handled(read.consumer, [delivery], [answer]))

    def _elsewhere(self, read: _Read) -> None:
        """A read this thread does not answer: to the consumer's database thread;
        while stopping (that thread may be gone), back to the broker."""
        delivery = read.delivery
        if not self._stopping.is_set():
            read.consumer.inbox.put(delivery)
        elif delivery.channel.is_open:
            delivery.channel.basic_nack(delivery.tag, requeue=True)

    def _done(self, session: _Session) -> None:
        """The session's read is over: the session is free again."""
        del self._busy[session.fd]
        metrics.IN_FLIGHT.dec()
        session.read = None
        self._ioloop.update_handler(session.fd, PollEvents.READ)
        self._idle.append(session)

    def _give_up(self, session: _Session, exc: BaseException) -> None:
        """The statement failed under its read: the read goes to the database thread."""
        read = session.read
        del self._busy[session.fd]
        metrics.IN_FLIGHT.dec()
        session.read = None
        self._failed_under(session, exc)
        self._elsewhere(read)

    def _failed_under(self, session: _Session, exc: BaseException) -> None:
        """An error on a session (not busy any more): kept if only its statement
        failed, else closed and another opened after a pause."""
        if session.conn.closed == 0 and not isinstance(exc, _SESSION_LOST):
            log.debug("a read on the I/O thread failed (%s); its session goes on", exc)
            self._ioloop.update_handler(session.fd, PollEvents.READ)
            self._idle.append(session)
            return
        log.debug("a session for reads on the I/O thread failed (%s); opening another", exc)
        self._unwatch(session)
        close(session.conn)
        self._opener.open(after_failure=True)

    def _unwatch(self, session: _Session) -> None:
        try:
            self._ioloop.remove_handler(session.fd)
        except Exception:  # not watched, or gone with its loop
            pass

    def _add(self, conn) -> None:
        """A session opened (``SessionOpener``): watched, and free."""
        session = _Session(conn, conn.fileno())
        self._ioloop.add_handler(session.fd, self._on_events, PollEvents.READ)
        self._idle.append(session)
