"""Another thread's turn on a SelectConnection while its I/O loop waits in the kernel.

A pika connection belongs to the thread that runs its loop: a caller hands it
work (``add_callback_threadsafe``), and that thread wakes up, runs it, and goes
back to wait. For a synchronous call that is one wake-up of the I/O thread per
request: a byte through its wake-up socket, a turn of its loop, and ~60 µs on
this machine before the request leaves.

Here the loop's thread holds an ``IoLock`` whenever it runs, and lets go of it
only while it is blocked in the kernel waiting for its sockets (``attach`` wraps
the poller's epoll object). Another thread that gets the lock without waiting
(``try_run``) has the connection to itself: nothing in the loop's thread runs
until it lets go. It publishes, sends the frames at once, and the loop never
wakes for it. When the loop is busy, or has work handed to it that is not done
yet, the caller does not wait: it hands its work over behind that, as before,
so that what one thread hands over and then publishes goes out in that order.

A change of the descriptors the loop waits on (a writer watched after a partial
send) is made with ``epoll_ctl``, which a thread blocked in ``epoll_wait`` sees
at once (Linux). Other pollers (select, poll, kqueue) are left alone:
``try_run`` then always hands over.
"""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Callable, Iterator

from .patches import send_pending

#: the kernel wait whose descriptor changes a blocked waiter sees at once
_EPOLL = getattr(select, "epoll", ())


class _ReleasingPoll:
    """A poller's ``select.epoll`` whose ``poll`` lets go of the loop's lock while
    it waits in the kernel."""

    def __init__(self, polling, lock: threading.Lock):
        self._polling = polling
        self._lock = lock

    def poll(self, *args):
        self._lock.release()
        try:
            return self._polling.poll(*args)
        finally:
            self._lock.acquire()

    def __getattr__(self, name: str):  # register, modify, unregister, close, fileno
        return getattr(self._polling, name)


class IoLock:
    """Held by a connection's I/O thread while it runs; taken by another thread
    for a short turn while the loop waits (``try_run``)."""

    def __init__(self):
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The I/O thread's: hold the lock while running loops (``attach`` them)."""
        with self._lock:
            yield

    def attach(self, connection) -> bool:
        """Have ``connection``'s loop let go of the lock while it waits (from the
        I/O thread, holding it, once the loop runs); whether it could."""
        poller = getattr(connection.ioloop, "_poller", None)
        polling = getattr(poller, "_poll", None)
        if isinstance(polling, _ReleasingPoll):
            return True
        if not isinstance(polling, _EPOLL):
            # select(), poll(), kqueue: a wait already begun would not see a writer
            # switched on meanwhile (the rest of a large request would wait)
            return False
        poller._poll = _ReleasingPoll(polling, self._lock)
        return True

    def try_run(self, connection, work: Callable[[], bool]) -> bool:
        """Run ``work()`` on this thread while ``connection``'s loop waits, then send
        what it wrote; ``work`` returns whether it did the work. False, running
        nothing, when the loop is busy, not attached, or has callbacks queued
        (work handed over earlier, a thread's own included, goes first: the
        caller hands its work over behind them)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            poller = getattr(connection.ioloop, "_poller", None)
            if not isinstance(getattr(poller, "_poll", None), _ReleasingPoll):
                return False
            if getattr(connection.ioloop, "_callbacks", True):
                return False
            try:
                return bool(work())
            finally:  # whatever was written goes, even if ``work`` raised
                send_pending(poller)
        finally:
            self._lock.release()
