"""The shared AMQP layer without a broker: confirm bookkeeping, the pause before
reconnecting, and one function for connection parameters."""

from __future__ import annotations

import pytest

from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.amqp.confirms import ConfirmTracker
from dataspace_core.amqp.reconnect import BACKOFF_MAX, BACKOFF_MIN, Backoff


def test_a_confirm_settles_its_own_tag_or_every_one_up_to_it():
    tracker: ConfirmTracker[str] = ConfirmTracker()
    assert [tracker.add(x) for x in "abcde"] == [1, 2, 3, 4, 5]
    assert tracker.settle(2, multiple=False) == ["b"]
    assert tracker.settle(2, multiple=False) == []  # settled once only
    assert tracker.settle(4, multiple=True) == ["a", "c", "d"]
    assert len(tracker) == 1 and tracker.get(5) == "e" and tracker.next_tag == 6
    assert tracker.settle(99, multiple=True) == ["e"]
    assert not tracker


def test_a_new_channel_numbers_from_one_and_gives_back_what_was_in_doubt():
    tracker: ConfirmTracker[str] = ConfirmTracker()
    for x in "abc":
        tracker.add(x)
    tracker.settle(1, multiple=False)
    assert tracker.restart() == ["b", "c"]
    assert tracker.add("d") == 1


def test_forgetting_keeps_the_numbering_of_a_channel_that_goes_on():
    tracker: ConfirmTracker[str] = ConfirmTracker()
    tracker.add("a")
    assert tracker.clear() == ["a"]
    assert tracker.add("b") == 2  # the broker still counts "a"
    assert tracker.settle(1, multiple=True) == []


def test_the_pause_is_short_within_a_round_and_doubles_between_failed_rounds():
    addresses = broker_addresses("amqp://a/x,amqp://b/x")
    backoff = Backoff(addresses)
    pauses = [backoff.next(reached=False) for _ in range(12)]
    # a, b: next node at once; after b, a new round after a longer pause each time
    assert pauses[0] == BACKOFF_MIN
    assert pauses[1] == 2 * BACKOFF_MIN
    assert pauses[2] == BACKOFF_MIN and pauses[3] == 4 * BACKOFF_MIN
    assert max(pauses) == BACKOFF_MAX
    assert backoff.next(reached=True) == BACKOFF_MIN


def test_one_function_sets_what_every_connection_shares():
    addresses = broker_addresses(
        "amqp://u:p@a:5672/v,amqp://u:p@b:5673/v?heartbeat=7",
        name="who",
        connect_timeout=3,
        blocked_timeout=30,
        stack_timeout=4,
    )
    for params in addresses.params:
        assert params.connection_attempts == 1 and params.retry_delay == 0
        assert params.socket_timeout == 3 and params.stack_timeout == 4
        assert params.blocked_connection_timeout == 30
        assert params.client_properties == {"connection_name": "who"}
        assert params.virtual_host == "v"
    assert [p.port for p in addresses.params] == [5672, 5673]
    assert addresses.params[1].heartbeat == 7  # the URL's own settings apply
    assert addresses.user == "u"
    with pytest.raises(ValueError, match="\\*\\*\\*"):
        broker_addresses("amqp://u:secret@a/v,http://u:secret@b/v")


class _FakeTransport:
    """What pika's ``_produce`` uses of a transport: the buffers, their byte count, a
    socket whose ``send`` records each call and may send less than asked."""

    def __init__(self, chunks: list[bytes], take: int | None = None):
        from collections import deque

        self._tx_buffers = deque(chunks)
        self._tx_buffered_byte_count = sum(len(c) for c in chunks)
        self._sock = self
        self.sent: list[bytes] = []
        self.take = take

    def _sigint_safe_send(self, sock, data: bytes) -> int:
        if self.take is not None and self.sent:
            raise BlockingIOError  # the socket would block: the rest waits
        n = len(data) if self.take is None else min(self.take, len(data))
        self.sent.append(bytes(data[:n]))
        return n


def test_buffered_frames_go_out_in_one_send():
    from dataspace_core.amqp import patches

    frames = [b"method", b"header", b"body", b"ack"]
    transport = _FakeTransport(list(frames))
    patches._coalescing_produce(transport)
    assert transport.sent == [b"".join(frames)]
    assert transport._tx_buffered_byte_count == 0 and not transport._tx_buffers


def test_a_partial_send_leaves_the_rest_in_order_and_large_chunks_alone():
    from dataspace_core.amqp import patches

    big = b"x" * (patches.COALESCE_BYTES + 1)
    transport = _FakeTransport([b"abc", b"def", big, b"ghi"], take=4)
    with pytest.raises(BlockingIOError):
        patches._coalescing_produce(transport)
    assert transport.sent == [b"abcd"]
    assert list(transport._tx_buffers) == [b"ef", big, b"ghi"]
    assert transport._tx_buffered_byte_count == 2 + len(big) + 3


def _running_loop():
    """A pika IOLoop running on a thread of its own (no connection: only callbacks)."""
    import threading

    from pika.adapters.select_connection import IOLoop

    loop = IOLoop()
    thread = threading.Thread(target=loop.start, daemon=True)
    thread.start()
    return loop, thread


def test_callbacks_from_many_threads_all_run_with_fewer_wake_ups(monkeypatch):
    """Each callback added from another thread runs soon after (none waits for a
    wake-up byte skipped because one was pending), and bursts share bytes."""
    import threading

    from dataspace_core.amqp import patches

    writes = []
    real = patches._wake_threadsafe
    monkeypatch.setattr(
        patches, "_wake_threadsafe", lambda poller: (writes.append(1), real(poller))
    )
    loop, thread = _running_loop()
    try:
        threads, rounds = 4, 1500
        late = []

        def caller() -> None:
            for _ in range(rounds):
                ran = threading.Event()
                loop.add_callback_threadsafe(ran.set)
                if not ran.wait(2):  # a lost wake-up leaves the loop asleep
                    late.append(1)
                    return

        callers = [threading.Thread(target=caller) for _ in range(threads)]
        for c in callers:
            c.start()
        for c in callers:
            c.join(60)
        assert not late, "a callback waited for a wake-up that never came"

        burst = threading.Event()
        count = [0]

        def bump() -> None:
            count[0] += 1
            if count[0] == 500:
                burst.set()

        before = len(writes)
        for _ in range(500):
            loop.add_callback_threadsafe(bump)
        assert burst.wait(5)
        assert len(writes) - before < 500, "every callback of a burst wrote its own byte"
    finally:
        loop.add_callback_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_wake_up_during_the_read_is_not_lost():
    """The mark "a byte is pending" is only ever set while a byte is unread: a
    wake-up written while the loop reads its socket (here from inside the read)
    is read with it, and the next one writes a new byte."""
    import select

    from pika.adapters.select_connection import PollPoller

    poller = PollPoller(lambda: None, lambda: None)
    reader, writer = poller._get_interrupt_pair()
    poller._w_interrupt = writer

    def unread() -> bool:
        return bool(select.select([reader], [], [], 0)[0])

    class ReadWhileWoken:
        def recv(self, size):
            poller.wake_threadsafe()  # another thread, between the wake and the read
            return reader.recv(size)

    poller._r_interrupt = ReadWhileWoken()
    try:
        poller.wake_threadsafe()
        assert unread()
        poller.wake_threadsafe()  # pending: no second byte
        poller._read_interrupt(reader.fileno(), 0)
        assert not unread()
        poller.wake_threadsafe()
        assert unread(), "the mark outlived its byte: this wake-up wrote nothing"
    finally:
        reader.close()
        writer.close()


def test_a_poller_made_before_the_patch_wakes_for_every_callback():
    """Its wake-up socket is read by pika's own handler, which never clears the
    mark: such a poller must not skip a wake-up (it would sleep up to pika's 5 s)."""
    from pika.adapters.select_connection import PollPoller

    poller = PollPoller(lambda: None, lambda: None)
    del poller._dataspace_wake_pending  # as a poller made before the import has it
    reader = poller._r_interrupt
    try:
        poller.wake_threadsafe()
        poller.wake_threadsafe()
        assert reader.recv(512) == b"XX"
        assert not hasattr(poller, "_dataspace_wake_pending")
    finally:
        poller.close()


def _transport_on_a_socketpair():
    """pika's plain transport on one end of a socket pair, run by a new IOLoop (no
    thread: the test turns the loop), and the other end to read what it sends."""
    import socket

    from pika.adapters.select_connection import IOLoop
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
    from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

    from dataspace_core.amqp import patches  # noqa: F401

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    loop = IOLoop()
    loop._poller.activate_poller()  # what loop.start() does first
    nbio = SelectorIOServicesAdapter(loop)
    transport = _AsyncPlaintextTransport(ours, protocol=None, nbio=nbio)
    return loop, nbio, transport, theirs


def test_frames_written_in_one_turn_go_out_before_the_next_poll_in_one_send():
    """No writability watcher is switched on for them (two epoll_ctl calls and a
    turn of the loop each burst, before): the loop's next poll sends them first."""
    loop, nbio, transport, theirs = _transport_on_a_socketpair()
    try:
        for frame in (b"method", b"header", b"body"):
            transport.write(frame)
        assert transport.get_write_buffer_size() == 16  # not sent yet
        watched = nbio._watchers[transport._sock.fileno()]  # its reader
        assert watched.writer is None  # writability not watched
        loop.poll()  # sends, and returns without blocking
        assert transport.get_write_buffer_size() == 0
        assert theirs.recv(100) == b"methodheaderbody"
        assert watched.writer is None
    finally:
        loop.close()
        transport._sock.close()
        theirs.close()


def test_what_the_kernel_does_not_take_is_sent_when_the_socket_is_writable():
    """A burst larger than the socket's buffer: the rest waits for writability,
    as pika's own write does, and arrives whole and in order."""
    loop, nbio, transport, theirs = _transport_on_a_socketpair()
    chunks = [bytes([i]) * 100_000 for i in range(1, 30)]  # ~2.9 MB, over any buffer
    try:
        for chunk in chunks:
            transport.write(chunk)
        loop.poll()
        assert transport.get_write_buffer_size() > 0  # the kernel took only part
        assert nbio._watchers[transport._sock.fileno()].writer is not None
        received = bytearray()
        while len(received) < sum(map(len, chunks)):
            received += theirs.recv(1 << 20)
            loop.poll()  # writable again: pika's handler sends more
        assert bytes(received) == b"".join(chunks)
        assert transport.get_write_buffer_size() == 0
    finally:
        loop.close()
        transport._sock.close()
        theirs.close()


def test_a_blocking_connection_still_publishes_and_consumes(own_vhost):
    """pika's BlockingConnection waits for its output in a loop of polls: the
    frames written before a poll must go without one that blocks for nothing."""
    import pika

    from dataspace_core.amqp import patches  # noqa: F401

    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        for i in range(50):
            channel.basic_publish("", queue, str(i).encode())
        got = []
        for method, _properties, body in channel.consume(queue, inactivity_timeout=5):
            if method is None:
                break
            got.append(body.decode())
            channel.basic_ack(method.delivery_tag)
            if len(got) == 50:
                break
        channel.cancel()
        assert got == [str(i) for i in range(50)]
    finally:
        connection.close()


def test_another_thread_runs_only_while_the_loop_waits_in_the_kernel():
    """io_lock.IoLock: a loop attached to it lets another thread in only while it
    waits in epoll, and not while work handed to it waits to run."""
    import threading
    import types

    from pika.adapters.select_connection import IOLoop

    from dataspace_core.amqp.io_lock import IoLock

    lock, loop = IoLock(), IOLoop()
    connection = types.SimpleNamespace(ioloop=loop)
    attached, busy, release = threading.Event(), threading.Event(), threading.Event()

    def run() -> None:
        with lock.held():
            loop.add_callback_threadsafe(
                lambda: attached.set() if lock.attach(connection) else None
            )
            loop.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert attached.wait(5)
        ran: list[str] = []
        assert lock.try_run(connection, lambda: ran.append("waiting") or True)
        assert not lock.try_run(connection, lambda: False)  # the work declined
        loop.add_callback_threadsafe(lambda: (busy.set(), release.wait(5)))
        assert busy.wait(5)  # the loop runs a callback: not in the kernel
        assert not lock.try_run(connection, lambda: ran.append("busy") or True)
        release.set()
        assert ran == ["waiting"]
    finally:
        release.set()
        loop.add_callback_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_work_handed_to_the_loop_first_keeps_another_thread_out():
    import types

    from pika.adapters.select_connection import IOLoop

    from dataspace_core.amqp.io_lock import IoLock

    lock, loop = IoLock(), IOLoop()
    loop._poller.activate_poller()
    connection = types.SimpleNamespace(ioloop=loop)
    assert lock.attach(connection)  # this thread stands for the loop's, not holding it
    try:
        loop.add_callback_threadsafe(lambda: None)  # handed over, not run yet
        assert not lock.try_run(connection, lambda: True)
        loop.process_timeouts()  # the loop runs it
        assert lock.try_run(connection, lambda: True)
    finally:
        loop.close()


def test_a_loop_that_writes_at_every_turn_still_reads_at_once():
    """A turn that sends is followed by a poll that does not wait: a loop busy
    writing (settles handed over at every turn) still reads the broker's frames,
    heartbeats and confirms as they come, not once the socket buffer is full."""
    import socket
    import threading
    import time

    from pika.adapters.select_connection import IOLoop
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
    from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

    from dataspace_core.amqp import patches  # noqa: F401

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = IOLoop()
    received: list[float] = []
    sent_at: list[float] = []

    class Protocol:
        def data_received(self, data):
            received.append(time.monotonic())

        def eof_received(self):
            return False

        def connection_lost(self, error):
            pass

    transport = _AsyncPlaintextTransport(ours, Protocol(), SelectorIOServicesAdapter(loop))

    def drain() -> None:  # the peer reads whatever the loop writes
        while True:
            try:
                if not theirs.recv(65536):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    end = time.monotonic() + 0.5

    def frame_in() -> None:
        sent_at.append(time.monotonic())
        theirs.send(b"incoming frame")

    threading.Timer(0.1, frame_in).start()

    def busy() -> None:  # writes at every turn of the loop
        transport.write(b"x" * 10)
        if time.monotonic() < end and not received:
            loop.add_callback_threadsafe(busy)
        else:
            loop.stop()

    loop.add_callback_threadsafe(busy)
    try:
        loop.start()
        assert received, "the frame was never read while the loop wrote"
        assert received[0] - sent_at[0] < 0.05
    finally:
        loop.close()
        ours.close()
        theirs.close()


def test_a_poller_whose_poll_does_not_send_keeps_pikas_writes():
    """A poller class with a poll of its own (a later pika's, a subclass) never
    sends what waits for the next poll: writes there watch the socket as pika's do."""
    from pika.adapters import select_connection

    class OwnPoll(select_connection.EPollPoller):
        def poll(self):  # its own: never called here
            raise AssertionError("not polled in this test")

    loop, nbio, transport, theirs = _transport_on_a_socketpair()
    loop._poller.__class__ = OwnPoll
    try:
        transport.write(b"frame")
        assert not loop._poller._dataspace_unsent
        assert nbio._watchers[transport._sock.fileno()].writer is not None  # pika's way
    finally:
        loop._poller.__class__ = select_connection.EPollPoller
        loop.close()
        transport._sock.close()
        theirs.close()


def test_what_a_turn_wrote_is_sent_even_when_its_work_raises():
    import types

    import pytest
    from pika.adapters.select_connection import IOLoop

    from dataspace_core.amqp.io_lock import IoLock

    loop, nbio, transport, theirs = _transport_on_a_socketpair()
    lock = IoLock()
    connection = types.SimpleNamespace(ioloop=loop)
    assert lock.attach(connection)
    assert isinstance(loop, IOLoop)

    def work() -> bool:
        transport.write(b"written before the error")
        raise RuntimeError("a bug in the work")

    try:
        with pytest.raises(RuntimeError):
            lock.try_run(connection, work)
        assert theirs.recv(100) == b"written before the error"
    finally:
        loop.close()
        transport._sock.close()
        theirs.close()
