"""pika helpers both sides share, and changes to pika's own behaviour, applied
once by importing this module (every module of this project that speaks AMQP does).

- pika 1.4 decodes a header of AMQP type timestamp into a ``datetime``, and a
  double or float into an integer; a timestamp beyond year 9999, or an infinite
  or NaN float, raises inside the frame parser, which aborts the connection, so
  every channel on it drops and the same message comes back to do it again.
  Here such a timestamp stays the integer it was sent as, and such a float a
  float (which no check lets through: pika cannot encode it again).
- pika's asynchronous transports send each frame with a ``send`` call of its own:
  a publish is three frames (method, header, body), a reply and its ack four,
  and a settled batch of 16 requests some 60 system calls. Here the frames
  buffered when the socket becomes writable go out joined, up to
  ``COALESCE_BYTES`` a call (measured: docs/performance.md).
- pika's ``add_callback_threadsafe`` writes a byte to the I/O loop's wake-up
  socket for every callback: a call's publish from the caller's thread, a
  settle from a worker's database thread. Here a byte is written only when none
  is waiting to be read already: the loop runs every queued callback when it
  wakes (and polls without blocking while any are queued), so one byte wakes it
  for all of them.
- pika's plain TCP transport watches its socket for writability whenever it has
  frames to send: two ``epoll_ctl`` calls and one more turn of the loop (with
  its Python dispatch) for each burst of frames. Here the frames written during
  one turn of the loop are sent just before it polls again, and the socket is
  watched only when the kernel did not take them all.
"""

from __future__ import annotations

import struct

import pika.data
from pika.adapters import select_connection
from pika.adapters.utils import io_services_utils

_decode_value = pika.data.decode_value


#: AMQP floats, which pika decodes into integers: an infinite or NaN one raises
_FLOATS = {b"d": (">d", 9), b"f": (">f", 5)}


def _tolerant_decode_value(encoded, offset):
    try:
        return _decode_value(encoded, offset)
    except (OverflowError, OSError, ValueError):
        kind = encoded[offset : offset + 1]
        if kind == b"T":
            return struct.unpack_from(">Q", encoded, offset + 1)[0], offset + 9
        if kind in _FLOATS:  # stays the float it is (no integer holds it)
            fmt, size = _FLOATS[kind]
            return struct.unpack_from(fmt, encoded, offset + 1)[0], offset + size
        raise


if getattr(pika.data.decode_value, "__name__", "") != "_tolerant_decode_value":
    pika.data.decode_value = _tolerant_decode_value

#: the most bytes of buffered frames joined into one ``send``: small frames go
#: together, a large body's frames (up to frame_max, 128 KiB by default) mostly alone
COALESCE_BYTES = 256 * 1024
_produce = io_services_utils._AsyncTransportBase._produce


def _coalescing_produce(self) -> None:
    """pika's ``_produce`` (send buffered chunks until done or the socket would
    block), after joining the leading small chunks into one: one system call for
    a burst of frames instead of one each. A partial send is handled by pika's
    loop as before (the rest of the joined chunk goes back to the front)."""
    buffers = self._tx_buffers
    if len(buffers) > 1 and len(buffers[0]) < COALESCE_BYTES:
        parts, size = [], 0
        while buffers and size + len(buffers[0]) <= COALESCE_BYTES:
            chunk = buffers.popleft()
            parts.append(chunk)
            size += len(chunk)
        buffers.appendleft(b"".join(parts))
    _produce(self)


if getattr(_produce, "__name__", "") != "_coalescing_produce":
    io_services_utils._AsyncTransportBase._produce = _coalescing_produce


_poller_init = select_connection._PollerBase.__init__
_wake_threadsafe = select_connection._PollerBase.wake_threadsafe
_read_interrupt = select_connection._PollerBase._read_interrupt


def _coalescing_init(self, *args, **kwargs) -> None:
    """pika's poller, marked as one whose wake-up socket this module reads
    (``_reading_interrupt``, registered by the poller as it is made). A poller
    made before this module was imported reads it with pika's own handler, which
    never clears the mark: it keeps waking once per callback."""
    _poller_init(self, *args, **kwargs)
    self._dataspace_wake_pending = False
    #: transports with frames written since the last poll (``_write_before_poll``)
    self._dataspace_unsent = []


def _coalescing_wake(self) -> None:
    """pika's ``wake_threadsafe``, skipped while a byte it wrote is still unread."""
    pending = getattr(self, "_dataspace_wake_pending", None)
    if pending:
        return
    if pending is not None:  # None: a poller made before the patch
        self._dataspace_wake_pending = True
    _wake_threadsafe(self)


def _reading_interrupt(self, interrupt_fd: int, events: int) -> None:
    """pika's ``_read_interrupt``, then marking no byte pending: a callback added
    from then on writes a new byte; one added before (its byte skipped, or read
    just now) is run by this iteration, since the loop runs its queued callbacks
    after the socket events. Marked after the read, not before: a byte written
    between the two would be read here and leave the mark set with nothing
    pending, and the next callbacks would wait for the poll's timeout."""
    _read_interrupt(self, interrupt_fd, events)
    self._dataspace_wake_pending = False


if getattr(_wake_threadsafe, "__name__", "") != "_coalescing_wake":
    select_connection._PollerBase.__init__ = _coalescing_init
    select_connection._PollerBase.wake_threadsafe = _coalescing_wake
    select_connection._PollerBase._read_interrupt = _reading_interrupt


_plain_write = io_services_utils._AsyncPlaintextTransport.write


def _poller_of(transport):
    """The SelectConnection poller running ``transport``'s I/O, if it is one made
    after this module was imported (it then flushes writes before it polls)."""
    loop = getattr(transport._nbio, "_loop", None)
    poller = getattr(loop, "_poller", None)
    if getattr(poller, "_dataspace_unsent", None) is None:
        return None
    if getattr(type(poller).poll, "__name__", "") != "sending_poll":
        return None  # a poller class whose own poll would never send them
    return poller


def _write_before_poll(self, data: bytes) -> None:
    """pika's ``write``, except that a first chunk does not switch the socket's
    writability watcher on: the transport is queued on its poller, which sends
    what it holds before it next polls (``_send_before_poll``)."""
    poller = _poller_of(self) if self._state == self._STATE_ACTIVE and data else None
    if poller is None:
        _plain_write(self, data)
        return
    was_empty = self.get_write_buffer_size() == 0
    self._buffer_tx_data(data)
    if was_empty:
        poller._dataspace_unsent.append(self)


def _send_before_poll(poller) -> None:
    """Send what the queued transports hold (pika's writable handler: it joins the
    frames, sends until the kernel would block, and aborts the connection on a
    socket error); a transport with frames left over is then watched for
    writability as pika does, and sends the rest when its socket is writable."""
    unsent = poller._dataspace_unsent
    while unsent:
        transport = unsent.pop()
        if transport._state != transport._STATE_ACTIVE or not transport._tx_buffers:
            continue
        transport._on_socket_writable()
        if transport._state == transport._STATE_ACTIVE and transport._tx_buffers:
            transport._nbio.set_writer(transport._sock.fileno(), transport._on_socket_writable)


def send_pending(poller) -> bool:
    """Send now what was written on ``poller``'s connections (before its next poll,
    and in io_lock.py for a thread that publishes while the loop waits in the
    kernel, which would not send it); whether anything was waiting."""
    if not getattr(poller, "_dataspace_unsent", None):
        return False
    _send_before_poll(poller)
    return True


def _sending_poll(poll):
    def sending_poll(self) -> None:
        """Send what was written, then poll; without waiting when it sent, as
        pika's poll returned at once with the socket's writability: whoever loops
        on ``poll`` (pika's loop, a BlockingConnection waiting for its output to
        go) looks again before a poll that could block with nothing to wake it,
        and a loop that writes at every turn still reads at every turn."""
        if send_pending(self):
            self._dataspace_poll_now = True
        poll(self)

    sending_poll.__name__ = "sending_poll"
    return sending_poll


_max_wait = select_connection._PollerBase._get_max_wait


def _no_wait_after_sending(self) -> float:
    """pika's ``_get_max_wait``: 0 for the poll right after a send."""
    if getattr(self, "_dataspace_poll_now", False):
        self._dataspace_poll_now = False
        return 0
    return _max_wait(self)


if getattr(_plain_write, "__name__", "") != "_write_before_poll":
    io_services_utils._AsyncPlaintextTransport.write = _write_before_poll
    select_connection._PollerBase._get_max_wait = _no_wait_after_sending
    for _poller_class in (
        select_connection.SelectPoller,
        select_connection.KQueuePoller,
        select_connection.PollPoller,
    ):
        _poller_class.poll = _sending_poll(_poller_class.poll)


def close_select_connection(connection) -> None:
    """Close a SelectConnection from its I/O loop, whatever state it is in; the
    loop stops in the connection's close callback (or here, if it never opened)."""
    if connection is None or connection.is_closing:
        return
    if connection.is_open or connection.is_opening:
        connection.close()
    else:
        connection.ioloop.stop()


def close_without_cancel(channel) -> None:
    """Close a channel without pika's basic.cancel of its consumers first.

    For a queue with a single active consumer, RabbitMQ 3.10 makes the next
    consumer active at the cancel while this one still holds its unacked
    deliveries, so the next one would get later messages before those come
    back. A channel closed outright returns its unacked deliveries before the
    queue moves on: the order holds. (pika cancels every consumer it does not
    know to be cancelled already; this tells it they are.)
    """
    channel._cancelled.update(channel.consumer_tags)
    channel.close()


def stop_reading(connection) -> bool:
    """Stop reading a SelectConnection's socket (the broker's later frames wait in
    the kernel and then in the broker); False, doing nothing, unless the transport
    is pika's plain TCP one (a TLS transport switches its reader on and off itself)."""
    transport = getattr(connection, "_transport", None)
    if type(transport).__name__ != "_AsyncPlaintextTransport":
        return False
    transport._nbio.remove_reader(transport._sock.fileno())
    return True


def read_again(connection) -> None:
    """Read the socket again after ``stop_reading``, if the transport still runs (a
    closing connection must still read its close-ok)."""
    transport = getattr(connection, "_transport", None)
    if transport is not None and transport._state == transport._STATE_ACTIVE:
        transport._nbio.set_reader(transport._sock.fileno(), transport._on_socket_readable)
