"""The worker pool's AMQP connection, and what starting over means for it.

Before each connection the topology is declared again on a short connection of
its own (a restarted broker, or a deleted queue, gets it back); the connection
then runs on the I/O thread (``ConnectionLoop``: the next cluster node after a
failure, a growing pause after a whole round). A refusal that retrying cannot
cure (credentials, vhost, permissions, a queue declared with other arguments)
stops the pool, with the reason in ``fatal`` for the command to say as it exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker

from dataspace_core.amqp.addresses import BrokerAddresses
from dataspace_core.amqp.failures import describe
from dataspace_core.amqp.patches import close_select_connection
from dataspace_core.amqp.reconnect import ConnectionCallbacks, ConnectionLoop

from .topology import Topology, declare, missing_queue

#: the pool's logger: these lines read as they did before this module split off
log = logging.getLogger("dataspace_worker.consumer")


class PoolConnection:
    """Declares, connects, reconnects; tells the pool when a connection opens and
    when one is gone (``opened``, ``lost``)."""

    def __init__(
        self,
        addresses: BrokerAddresses,
        topology: Topology,
        *,
        stopping: threading.Event,
        lock: threading.Lock,
        opened: Callable[[pika.SelectConnection], None],
        lost: Callable[[], bool],
        before_close: Callable[[], None],
        masked_url: str,
    ):
        """``opened(connection)``: open the channels on a new connection (I/O thread).
        ``lost()``: a connection ended; returns whether it got as far as consuming.
        ``before_close()``: runs before the pool closes its connection (reads must
        go on: the close-ok is to be read)."""
        self.addresses = addresses
        self.masked_url = masked_url
        self.topology = topology
        self.stopping = stopping
        self.connections_opened = 0
        #: why the pool gave up for good (the broker refused it), or None
        self.fatal: str | None = None
        self._opened = opened
        self._lost = lost
        self._before_close = before_close
        self.loop = ConnectionLoop(
            addresses,
            ConnectionCallbacks(self._on_open, self._on_open_error, self._on_closed),
            stopped=stopping.is_set,
            wait=stopping.wait,
            lock=lock,
            logger=log,
        )

    @property
    def connection(self) -> pika.SelectConnection | None:
        return self.loop.connection

    def connected(self) -> bool:
        connection = self.connection
        return connection is not None and connection.is_open

    def call_soon(self, callback) -> bool:
        """Run ``callback`` on the I/O thread; False if the connection is gone."""
        return self.loop.call_soon(callback)

    def run(self) -> None:
        """The I/O thread: connections one after another until the pool stops."""
        self.loop.run(self._lost, prepare=self._prepare)

    def check_topology(self, queues: list[str]) -> bool:
        """Whether every one of ``queues`` still exists; if one is gone, start over
        (RabbitMQ 3.10 sends no consumer cancel when a quorum queue is deleted)."""
        gone = missing_queue(self.addresses.current, queues)
        if gone is not None:
            self.call_soon(lambda: self.reconnect(f"queue '{gone}' is gone"))
        return gone is None

    def reconnect(self, reason: str) -> None:
        """Start over: reconnect with backoff and declare the topology again (I/O thread)."""
        log.warning("%s; reconnecting", reason)
        connection = self.connection
        if connection is not None and connection.is_open:
            self._before_close()
            connection.close()

    def close(self) -> None:
        """Close the connection for good (I/O thread; the pool is stopping)."""
        self._before_close()
        close_select_connection(self.connection)

    def _prepare(self) -> str | None:
        """Declare the topology before each connection; None when done, else why
        not (the loop tries the next address after a pause). A refusal retrying
        cannot cure stops the pool."""
        try:
            declare(self.addresses.current, self.topology)
        except ChannelClosedByBroker as exc:
            if exc.reply_code in (403, 406):  # no permission, or inequivalent arguments
                self._give_up(f"the broker refused the topology: {exc.reply_text}")
            return describe(exc).text
        except (AMQPError, OSError) as exc:
            problem = describe(exc)
            if problem.configuration:  # credentials, vhost, certificate, plugin
                self._give_up(f"broker {self.addresses.current_url} refused this worker: {problem}")
            return problem.text
        return None

    def _give_up(self, reason: str) -> None:
        """A refusal that retrying cannot cure: stop the pool and say why."""
        self.fatal = reason
        log.debug("%s; stopping", reason)  # the command says it, once, as it exits
        self.stopping.set()

    def _on_open(self, connection) -> None:
        if self.stopping.is_set():
            connection.close()
            return
        self.connections_opened += 1
        self._opened(connection)

    def _on_open_error(self, connection, error) -> None:
        log.warning("cannot connect to %s: %s", self.addresses.current_url, describe(error))
        connection.ioloop.stop()

    def _on_closed(self, connection, reason) -> None:
        if not self.stopping.is_set():
            log.warning("connection to %s lost: %s; reconnecting", self.masked_url, reason)
        connection.ioloop.stop()
