"""Reconnecting, written once for the client and the worker.

Both run one pika ``SelectConnection`` at a time on an I/O thread of their own:
open it to the current broker address, run its I/O loop until the connection
ends, then go on to the next address (a cluster's nodes, round robin) after a
pause. The pause is short while there are addresses of the round left to try or
after a connection that got to work; it doubles, up to a few seconds, after a
whole round of addresses failed: a lost node costs a client or a worker a tenth
of a second, a broker that is down for a while costs it no busy loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pika

from .addresses import BrokerAddresses

log = logging.getLogger(__name__)

#: seconds before the next attempt after a connection that got to work, or before
#: the next address of a round
BACKOFF_MIN = 0.1
#: the longest pause between two rounds of failed attempts
BACKOFF_MAX = 5.0


@dataclass
class Backoff:
    """Which address to try next, and the pause before trying it. ``pause`` is the
    pause between rounds: it doubles with each round of addresses that all failed
    and goes back to ``minimum`` once a connection got to work."""

    addresses: BrokerAddresses
    minimum: float = BACKOFF_MIN
    maximum: float = BACKOFF_MAX
    pause: float = BACKOFF_MIN

    def next(self, reached: bool) -> float:
        """Go on to the next address; the pause before connecting to it. ``reached``:
        whether the attempt that just ended got to work (which resets the pause)."""
        new_round = self.addresses.advance()
        if reached:
            self.pause = self.minimum
        if reached or not new_round:
            return self.minimum  # the round's pause is kept for its end
        self.pause = min(max(self.pause, self.minimum) * 2, self.maximum)
        return self.pause


@dataclass
class ConnectionCallbacks:
    """What the owner of a ``ConnectionLoop`` does as its connection opens, fails
    to open, or closes (pika's callbacks, on the I/O thread)."""

    opened: Callable[[pika.SelectConnection], None]
    open_failed: Callable[[pika.SelectConnection, BaseException], None]
    closed: Callable[[pika.SelectConnection, BaseException], None]


class ConnectionLoop:
    """One ``SelectConnection`` after another until stopped (run it on the I/O thread).

    ``logger``: the owner's, so that its operators' filters see these lines as
    before. ``lock`` guards ``connection``; an owner that checks "closing" and reads the
    connection under its own lock passes that lock, so that a connection is
    either created before ``close`` looks or not created at all.
    """

    def __init__(
        self,
        addresses: BrokerAddresses,
        callbacks: ConnectionCallbacks,
        *,
        stopped: Callable[[], bool],
        wait: Callable[[float], object],
        lock=None,
        minimum: float = BACKOFF_MIN,
        logger: logging.Logger = log,
    ):
        self.addresses = addresses
        self.backoff = Backoff(addresses, minimum, pause=minimum)
        self.callbacks = callbacks
        self.lock = lock if lock is not None else threading.Lock()
        #: the connection being opened or in use; None between two of them
        self.connection: pika.SelectConnection | None = None
        self._stopped = stopped
        self._wait = wait
        self._log = logger

    def run(
        self,
        ended: Callable[[], bool],
        prepare: Callable[[], str | None] | None = None,
        crashed: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Connect, run, reconnect until ``stopped()``.

        ``prepare()`` runs before each connection (the worker declares its
        topology): it returns None to go on, or why not, and then the next address
        is tried after a pause. ``ended()`` runs after each connection's loop
        ended and returns whether that connection got to work. ``crashed(exc)``
        runs first when the loop raised, while ``connection`` still names the dead
        connection (the client marks its link down there, before anyone can see
        no connection and a link still up)."""
        while not self._stopped():
            if prepare is not None:
                failed_at = self.addresses.current_url
                problem = prepare()
                if problem is not None:
                    if self._stopped():
                        break
                    pause = self.backoff.next(reached=False)
                    self._log.warning(
                        "broker %s unavailable: %s; retrying in %.1fs", failed_at, problem, pause
                    )
                    self._wait(pause)
                    continue
            with self.lock:
                if self._stopped():
                    break
                connection = pika.SelectConnection(
                    self.addresses.current,
                    on_open_callback=self.callbacks.opened,
                    on_open_error_callback=self.callbacks.open_failed,
                    on_close_callback=self.callbacks.closed,
                )
                self.connection = connection
            try:
                connection.ioloop.start()
            except Exception as exc:  # never let the I/O thread die silently
                self._log.exception("AMQP I/O loop failed; reconnecting")
                if crashed is not None:
                    crashed(exc)
            with self.lock:
                self.connection = None
            reached = ended()
            connection.ioloop.close()
            if self._stopped():
                break
            self._wait(self.backoff.next(reached))

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread (from any thread); False when there is
        no connection to run it on."""
        with self.lock:
            connection = self.connection
            if connection is None:
                return False
            connection.ioloop.add_callback_threadsafe(callback)
            return True
