"""Reads on the fast path (docs/protocol.md, "Reads"): a classic transient queue,
messages not persisted; a read delivered again is not run on it (no delivery
limit there) but asked once more through the request queue; a read the fast
queue cannot take goes through the request queue."""

from __future__ import annotations

import threading
import time

import pika

from dataspace_client import DataSpace
from dataspace_core.protocol import OPERATIONS, READS_QUEUE, REQUEST_QUEUE
from dataspace_worker import metrics
from tests.support.configs import remote_config


def _space(url: str, timeout: float = 20) -> DataSpace:
    config = remote_config(url, timeout=timeout)
    config["dataspace"]["datasource"]["config"]["no_worker_check"] = 60  # no early end
    return DataSpace(config)


def _in_background(call) -> tuple[threading.Thread, list]:
    """``call()`` on a thread of its own; its result (or the error it raised) in the list."""
    result: list = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:  # the test looks at it
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _take(url: str, queue: str, timeout: float = 10):
    """The first message of ``queue``, taken and left unacked on a channel kept open;
    returns (connection, channel, method, properties)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, properties, _body = channel.basic_get(queue, auto_ack=False)
        if method is not None:
            return connection, channel, method, properties
        time.sleep(0.05)
    connection.close()
    raise AssertionError(f"nothing reached {queue} within {timeout} s")


def test_a_read_goes_to_the_fast_queue_unpersisted_and_a_write_to_the_request_queue(
    queues_without_worker,
):
    space = _space(queues_without_worker, timeout=5)
    try:
        reader, _ = _in_background(space.get_taskmanagers)
        connection, channel, method, properties = _take(queues_without_worker, READS_QUEUE)
        assert method.routing_key == "read.get_taskmanagers"
        assert properties.delivery_mode == 1  # transient: nothing written to disk
        channel.basic_nack(method.delivery_tag, requeue=False)
        connection.close()
        writer, _ = _in_background(lambda: space.store_taskmanager("fast-reads", "00ff"))
        connection, channel, method, properties = _take(queues_without_worker, REQUEST_QUEUE)
        assert method.routing_key == "data.store_taskmanager"
        assert properties.delivery_mode == 2
        connection.close()
    finally:
        space.close()
    reader.join(10)
    writer.join(10)


def test_a_read_delivered_again_is_asked_once_more_through_the_request_queue(
    queues_without_worker, pool_factory
):
    """A worker that took a read and died (here: a channel closed with the read
    unacked) leaves it redelivered: the next worker does not run it on the fast
    queue, which has no delivery limit to end a read that kills every worker, and
    the client sends it once more through the request queue, which has one."""
    refused = metrics.REQUESTS.labels("get_taskmanagers", "read_redelivered")
    refused_before = refused._value.get()
    space = _space(queues_without_worker)
    try:
        reader, result = _in_background(space.get_taskmanagers)
        connection, channel, method, _ = _take(queues_without_worker, READS_QUEUE)
        assert not method.redelivered
        connection.close()  # the "crash": the read goes back, marked redelivered
        pool = pool_factory(queues_without_worker, consumers=1)
        reader.join(20)
        # answered (the database is the run's own, shared: whatever it holds)
        assert len(result) == 1 and isinstance(result[0], list), result
        # refused, not run: no reason to take writes one at a time
        assert pool.intake.careful_until == 0.0
    finally:
        space.close()
    assert refused._value.get() == refused_before + 1


def test_a_read_the_fast_queue_cannot_take_goes_through_the_request_queue(queues_without_worker):
    """No fast read queue (workers older than it, or its node just went down): the
    read comes back unroutable and is sent at once to the request queue."""
    connection, answered = _answering(queues_without_worker)
    connection.channel().queue_delete(READS_QUEUE)
    space = _space(queues_without_worker)
    try:
        reader, result = _in_background(space.get_taskmanagers)
        _until_done(connection, reader)
    finally:
        space.close()
        connection.close()
    assert result == [[]] and answered == ["data.get_taskmanagers"]


def _answering(url: str):
    """A bare consumer of the request queue that answers every request with an
    empty list; returns (connection, routing keys it answered)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    answered: list[str] = []

    def answer(ch, method, properties, _body):
        answered.append(method.routing_key)
        ch.basic_publish(
            "",
            properties.reply_to,
            b'{"v": 1, "ok": true, "result": []}',
            pika.BasicProperties(correlation_id=properties.correlation_id),
        )
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(REQUEST_QUEUE, answer)
    return connection, answered


def _until_done(connection, thread: threading.Thread, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    thread.join(5)


def test_a_fast_read_nobody_takes_goes_through_the_request_queue(queues_without_worker):
    """dataspace.reads exists but nobody consumes it (workers rolled back to a release
    without it, or its node went down with the read in it): after no_worker_check
    seconds the read goes again through the request queue."""
    connection, answered = _answering(queues_without_worker)
    config = remote_config(queues_without_worker, timeout=20)
    config["dataspace"]["datasource"]["config"]["no_worker_check"] = 1.0
    space = DataSpace(config)
    try:
        started = time.monotonic()
        reader, result = _in_background(space.get_taskmanagers)
        _until_done(connection, reader)
        elapsed = time.monotonic() - started
    finally:
        space.close()
        connection.close()
    assert result == [[]] and answered == ["data.get_taskmanagers"]
    assert 1.0 <= elapsed < 5, elapsed


def test_old_style_reads_to_the_request_queue_are_still_served(queues_without_worker, pool_factory):
    """A client of before the fast read queue (``fast_reads`` false: every read as
    ``data.<op>``) is served as it was."""
    pool_factory(queues_without_worker, consumers=1)
    config = remote_config(queues_without_worker, timeout=20)
    config["dataspace"]["datasource"]["config"]["fast_reads"] = False
    with DataSpace(config) as space:
        route = space.datasource._route(OPERATIONS["get_taskmanagers"], {})
        assert route == ("data.get_taskmanagers", None)
        sequence_id = space.store_taskmanager("old-style", "00aa")
        assert space.get_taskmanager("old-style")["sequence_id"] == sequence_id
