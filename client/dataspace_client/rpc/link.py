"""What every thread of an ``RpcClient`` shares about its link to the broker.

One lock guards the client's whole shared state: this, its calls (``Calls``) and
its publications (``Publications``). It is a ``threading.Condition``: callers wait
on it for the link to open and for room in the publication window, and whoever
changes what they wait for calls ``notify_all``. Callers never touch pika: they
hand work to the I/O thread with ``run_on_io_thread``, which only a link found
``open`` under the lock may do (a connection loss then either sees their call, or
happened before and they saw the link down).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from dataspace_core.amqp.confirms import ConfirmTracker
from dataspace_core.amqp.io_lock import IoLock

if TYPE_CHECKING:
    from collections.abc import Callable

    import pika

    from dataspace_core.amqp.reconnect import ConnectionLoop

    from .publications import Publication


class Link:
    """The connection's state as callers and the I/O thread both see it."""

    def __init__(self, masked_url: str):
        self.lock = threading.Condition()
        self.masked_url = masked_url
        #: the channel consumes replies: requests can go (false while reconnecting)
        self.open = False
        #: ``close()`` (or ``abandon()``) was called: nothing new goes out
        self.closing = False
        #: set by ``close()``: wakes the I/O thread from its pause between connections
        self.closed = threading.Event()
        #: why the link is down, for the errors of the calls that find it so
        self.last_error = "not connected yet"
        #: the channel requests go out on (opened and replaced on the I/O thread)
        self.channel = None
        #: delivery tag -> correlation_id of a call, or the Publication itself
        self.unconfirmed: ConfirmTracker[str | Publication] = ConfirmTracker()
        #: the loop of connections, one after another (``RpcChannel`` makes and runs it)
        self.loop: ConnectionLoop | None = None
        #: held by the I/O thread except while it waits for the broker: a caller
        #: that takes it publishes its request itself (io_lock.py). Never waited
        #: for under ``lock``: the I/O thread takes ``lock`` while holding it.
        self.io = IoLock()

    @property
    def connection(self) -> pika.SelectConnection | None:
        """The connection being opened or in use; None between two of them."""
        return self.loop.connection

    def run_on_io_thread(self, callback: Callable[[], None]) -> None:
        """Have the I/O thread run ``callback`` (under ``lock``, the link ``open``)."""
        self.connection.ioloop.add_callback_threadsafe(callback)

    def down(self, reason: str) -> None:
        """The link is lost (under ``lock``): nothing in flight will be confirmed."""
        self.open = False
        self.last_error = reason
        self.unconfirmed.clear()
