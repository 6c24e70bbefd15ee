"""What the per-request path does in fewer steps (issue 15) gives the same answers
as the slower code it replaced: argument binding, the header-size bound, the
reply-address cache, and the client's per-call signal. Broker-free."""

from __future__ import annotations

import datetime
import inspect
import random
import threading
import time

import pytest

from dataspace_client.rpc.calls import Done
from dataspace_worker import reply_addresses
from dataspace_worker.bounds import headers_within
from dataspace_worker.dead_letters import table_size
from dataspace_worker.dispatch import Parameters

ADDRESS = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABYJwAAAABrE1hc.abcdefghijklmnopqrstuv=="


def _insert(taskmanager_id, generation_id, key, value, header=None, *, metadata=None):
    """A method of the datasource's shape."""


@pytest.mark.parametrize(
    "args",
    [
        {"taskmanager_id": 1, "generation_id": 2, "key": "k", "value": b"v"},
        {"taskmanager_id": 1, "generation_id": 2, "key": "k", "value": b"v", "metadata": {}},
        {"taskmanager_id": 1, "key": "k", "value": b"v"},
        {},
        {"taskmanager_id": 1, "generation_id": 2, "key": "k", "value": b"v", "extra": 1},
        {"extra": 1},
    ],
)
def test_binding_by_name_answers_as_inspect_did(args):
    signature = inspect.signature(_insert)
    try:
        bound = signature.bind(**args)
        bound.apply_defaults()
        expected = dict(bound.arguments)
    except TypeError as exc:
        expected = str(exc)
    try:
        got = Parameters(signature).bind(args)
    except TypeError as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, dict):
        assert list(got) == list(signature.parameters)  # the signature's order


def test_binding_refuses_a_method_with_star_args():
    def method(a, *rest):
        pass

    with pytest.raises(TypeError, match="only named parameters"):
        Parameters(inspect.signature(method))


def _random_value(rng: random.Random):
    text = "".join(rng.choice("aé€😀\x00z") for _ in range(rng.randint(0, 300)))
    return rng.choice(
        [
            text,
            text.encode(),
            rng.randint(-(2**63), 2**63 - 1),
            rng.choice([True, False]),
            None,
            1.5,
            {"nested": 1},
            [1, "a"],
            datetime.datetime(2020, 1, 1),
        ]
    )


def test_the_header_bound_never_passes_a_table_over_the_limit():
    """``headers_within`` says yes only where the encoded table fits: it is an
    upper bound, checked against pika's encoding of 3,000 random tables."""
    rng = random.Random(15)
    said_yes = 0
    for _ in range(3000):
        headers = {
            "".join(rng.choice("kéy€") for _ in range(rng.randint(1, 60))): _random_value(rng)
            for _ in range(rng.randint(0, 12))
        }
        limit = rng.choice([64, 512, 2048, 16 * 1024])
        if headers_within(headers, limit):
            said_yes += 1
            assert table_size(headers) <= limit, headers
    assert said_yes > 300  # it does answer for the usual tables


def test_the_usual_request_headers_are_within_without_encoding():
    headers = {"x-dataspace-protocol": 1, "x-dataspace-frames": 1, "x-dataspace-lane": "tm-1"}
    assert headers_within(headers, 16 * 1024)
    assert headers_within(None, 16 * 1024) and headers_within({}, 16 * 1024)
    assert not headers_within({"x": "y" * 5000}, 16 * 1024)  # may be over: encode it
    # a timestamp past 64 bits stays an integer (patches.py) pika cannot encode
    assert not headers_within({"x": 2**64 - 1}, 16 * 1024)
    assert not headers_within({"x": -(2**63) - 1}, 16 * 1024)
    assert headers_within({"x": 2**63 - 1, "y": -(2**63)}, 16 * 1024)


def test_a_reply_address_is_decoded_once_and_a_bad_one_every_time():
    assert reply_addresses.parse(ADDRESS) is reply_addresses.parse(ADDRESS)
    for _ in range(2):
        with pytest.raises(reply_addresses.BadReplyTo, match="not a direct reply-to"):
            reply_addresses.parse("some.queue")
    with pytest.raises(reply_addresses.BadReplyTo, match="not text"):
        reply_addresses.parse(b"bytes")


def test_the_call_signal_is_set_once_whoever_sets_it():
    done = Done()
    assert not done.is_set() and not done.wait(0.01)
    threading.Timer(0.05, done.set).start()
    started = time.monotonic()
    assert done.wait(5) and time.monotonic() - started < 2
    done.set()  # again: no error
    assert done.is_set() and done.wait(0) and done.wait(0.01)
    for _ in range(300):  # three threads set it at once; the waiter wakes every time
        done = Done()
        setters = [threading.Thread(target=done.set) for _ in range(3)]
        for setter in setters:
            setter.start()
        assert done.wait(5)
        for setter in setters:
            setter.join()
        assert done.wait(0)


def test_a_call_leaves_from_its_own_thread_only_on_the_links_open_channel():
    """``Calls._here_now``: a request goes out on the caller's thread only with
    the link up on the connection it was registered on, an open channel (not one
    being recycled, nor a new one before ``link_up`` numbers its confirms from
    1), the call not failed meanwhile, nothing published before it still in the
    outbox, and no other call in flight (those the I/O thread sends together)."""
    import types

    from dataspace_client.rpc.calls import Call, Calls
    from dataspace_client.rpc.link import Link

    class Loop:
        connection = object()

    link = Link("amqp://broker")
    link.loop = Loop()
    link.open = True
    link.channel = types.SimpleNamespace(is_open=True)
    queued = [False]
    calls = Calls(link, app_id="t", no_worker_check=2.0, queued=lambda: queued[0])
    call = Call("get_dataproduct", time.monotonic() + 5)
    calls._waiting["c1"] = call
    here = lambda: calls._here_now(call, Loop.connection)  # noqa: E731
    assert here()
    assert not calls._here_now(call, object())  # another connection since
    link.channel.is_open = False  # closing: recycled after a nack
    assert not here()
    link.channel.is_open = True
    link.open = False  # a new channel, not consuming yet
    assert not here()
    link.open = True
    queued[0] = True  # fire-and-forget requests wait to go
    assert not here()
    queued[0] = False
    calls._waiting["c2"] = Call("insert", time.monotonic() + 5)  # another call in flight
    assert not here()
    del calls._waiting["c2"]
    call.fail(RuntimeError("lost"))  # failed by a lost connection meanwhile
    assert not here()
