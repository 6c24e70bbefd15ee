"""A client facing a vhost where no worker consumes: it says so within seconds, and
what it leaves behind (an expired read) does not become a dead letter."""

from __future__ import annotations

import time

import pika
import pytest

from dataspace_client import DataSpace, DataSpaceNoWorkerError, DataSpaceTimeoutError
from dataspace_core.protocol import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, REQUEST_QUEUE
from tests import services
from tests.support.configs import remote_config

pytestmark = pytest.mark.timeout(120)


def _config(url: str, timeout: float) -> dict:
    config = remote_config(url, timeout=timeout)
    config["dataspace"]["datasource"]["config"]["no_worker_check"] = 1.0
    return config


def test_a_call_with_no_worker_fails_within_seconds_naming_the_queue(queues_without_worker):
    space = DataSpace(_config(queues_without_worker, timeout=30))
    try:
        started = time.monotonic()
        with pytest.raises(DataSpaceNoWorkerError) as caught:
            space.get_taskmanagers()
        elapsed = time.monotonic() - started
    finally:
        space.close()
    assert elapsed < 5, f"took {elapsed:.1f} s, not a few seconds"
    message = str(caught.value)
    # a read: unanswered on the fast read queue, then sent through the request queue
    assert f"no worker consumes {REQUEST_QUEUE}" in message
    assert "start dataspace-worker" in message
    assert "guest:***@" in message and "guest:guest@" not in message
    # code written for timeouts still catches it
    assert isinstance(caught.value, DataSpaceTimeoutError)


def test_a_slow_reply_with_a_worker_is_not_taken_for_no_worker(queues_without_worker):
    """A consumer present (here a bare pika consumer that answers late): the check
    finds it, and the call waits for the reply."""
    connection = pika.BlockingConnection(pika.URLParameters(queues_without_worker))
    channel = connection.channel()

    def answer_late(ch, method, properties, body):
        time.sleep(2.5)
        ch.basic_publish(
            "",
            properties.reply_to,
            b'{"v": 1, "ok": true, "result": []}',
            pika.BasicProperties(correlation_id=properties.correlation_id),
        )
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(REQUEST_QUEUE, answer_late)
    config = _config(queues_without_worker, timeout=20)
    config["dataspace"]["datasource"]["config"]["fast_reads"] = False  # the request queue
    space = DataSpace(config)
    try:
        import threading

        caller = threading.Thread(target=lambda: result.append(space.get_taskmanagers()))
        result: list = []
        caller.start()
        deadline = time.monotonic() + 15
        while caller.is_alive() and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
        caller.join(5)
    finally:
        space.close()
        connection.close()
    assert result == [[]]


def test_an_expired_read_leaves_no_dead_letter_an_expired_write_does(queues_without_worker):
    url = queues_without_worker
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for key in ("data.get_taskmanagers", "data.insert", "lane.get_dataproduct"):
        channel.basic_publish(
            "dataspace" if key.startswith("data.") else DEAD_LETTER_EXCHANGE,
            key,
            b"{}",
            pika.BasicProperties(
                message_id=key, expiration="50" if key.startswith("data.") else None
            ),
        )
    time.sleep(0.3)
    # a queue expires messages at its head when it is read
    assert channel.basic_get(REQUEST_QUEUE)[0] is None
    connection.close()
    dead = services.drain_queue(url, DEAD_LETTER_QUEUE, idle=1.5, deadline=20)
    ids = sorted(properties.message_id for properties, _body in dead)
    # the insert expired in dataspace.requests: kept; the read expired: dropped; the
    # third, published straight to the dead-letter exchange without an expiry
    # record (not expired by the broker), is kept however it is named
    assert ids == ["data.insert", "lane.get_dataproduct"], ids
    emptied, _ = services.poll(lambda: _depth(url, REQUEST_QUEUE) == 0, timeout=10)
    assert emptied, "an expired request stayed in dataspace.requests"


def _depth(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()
