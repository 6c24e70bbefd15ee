"""``dataspace`` prints what others wrote without letting it drive the terminal
(issue 12, finding 9).

A client may put anything in a message_id, a type, headers or a body, and a
dead letter keeps them; a worker's error text and a queue's name come from
elsewhere too. None of it may reach the terminal as control characters: no
clear-screen (``ESC [2J``), no window title (``ESC ]0;...BEL``), no bidi
override (U+202E) reordering what follows, no C1 controls or DEL, no line break
forging a line. Each is shown as a ``\\uXXXX`` escape, also inside JSON, whose
decoded value is still the original text.
"""

from __future__ import annotations

import uuid

import orjson
import pika
import pytest

from dataspace_client import cli
from dataspace_client.values import encode_value
from dataspace_worker.topology import declare_blocking, topology

HOSTILE = "\x1b[2J\x1b]0;title\x07\u202eevil\x9b31m\x7f\u2066\n\rfake line\u200f\U000e0041"
#: (the broker takes these in a queue name; it never answered a declare with all of HOSTILE)
QUEUE = "dataspace.\x1b[2J\u202eevil\x07\x9b"
#: characters no output may hold (the terminal would act on them)
CONTROL = {chr(c) for c in range(0x20)} - {"\n"} | {chr(c) for c in range(0x7F, 0xA0)}
FORMAT = {"\u202e", "\u2066", "\u200f", "\U000e0041", "\u2028"}


def _assert_inert(text: str) -> None:
    found = sorted({c for c in text if c in CONTROL or c in FORMAT})
    assert not found, f"raw control characters in the output: {found!r}\n{text!r}"
    assert "fake line" not in "\n".join(
        line for line in text.splitlines() if line.startswith("fake line")
    )


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def hostile_vhost(own_vhost):
    """The service's topology in a vhost of its own, with one hostile dead letter (no
    routing key, so replay skips it and names it) and a queue with a hostile name."""
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    declare_blocking(channel, topology())
    channel.queue_declare(QUEUE, exclusive=True)
    channel.confirm_delivery()
    channel.basic_publish(
        "",
        "dataspace.dead",
        ("body " + HOSTILE).encode(),
        pika.BasicProperties(
            message_id="id-" + HOSTILE,
            type="op-" + HOSTILE,
            app_id=HOSTILE,
            headers={
                "x-dataspace-reason": "reason " + HOSTILE,
                "x-dataspace-error-code": "code" + HOSTILE,
                "x-dead-lettered-by": HOSTILE,
            },
            delivery_mode=2,
        ),
    )
    yield own_vhost, connection
    connection.close()


def test_dead_list_and_status_escape_what_others_wrote(capsys, hostile_vhost):
    url, _ = hostile_vhost
    code, out, err = _run(capsys, "dead", "list", "--url", url)
    assert code == 0, err
    _assert_inert(out + err)
    assert "id-\\u001b[2J\\u001b]0;title\\u0007\\u202eevil\\u009b31m\\u007f" in out
    assert "\\u000a\\u000dfake line\\u200f\\udb40\\udc41" in out
    assert "reason: reason \\u001b[2J" in out
    assert out.count("\n") == 4  # the entry's three lines and the summary: none forged

    code, out, err = _run(capsys, "dead", "list", "--json", "--url", url)
    assert code == 0, err
    _assert_inert(out)
    entry = orjson.loads(out)["messages"][0]
    assert entry["message_id"] == "id-" + HOSTILE  # escaped on screen, intact as data
    assert entry["type"] == "op-" + HOSTILE and entry["app_id"] == HOSTILE

    code, out, err = _run(capsys, "status", "--url", url)
    _assert_inert(out + err)
    assert "dataspace.\\u001b[2J\\u202eevil\\u0007\\u009b" in out

    code, out, err = _run(capsys, "status", "--json", "--url", url)
    _assert_inert(out)
    names = [q["name"] for q in orjson.loads(out)["queues"]]
    assert QUEUE in names


def test_dead_replay_escapes_the_ids_it_names(capsys, hostile_vhost):
    url, _ = hostile_vhost
    code, out, err = _run(capsys, "dead", "replay", "--yes", "--url", url)
    assert code == 0, err
    _assert_inert(out + err)
    assert "skipped id-\\u001b[2J" in err
    assert "replayed 0, skipped 1" in out


def test_errors_and_values_are_escaped(capsys, amqp_url, worker_pool):
    from dataspace_client.datablock import Header, Metadata
    from dataspace_client.remote import RemoteDataSource

    source = RemoteDataSource({"url": amqp_url, "timeout": 30, "app_id": "dataspace-tests"})
    try:
        tm = source.store_taskmanager(f"cli-out-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:32])
        value = {"text": HOSTILE, HOSTILE: [HOSTILE]}
        source.insert(tm, 1, "k", encode_value(value), Header(tm), Metadata(tm, generation_id=1))
        source.insert(
            tm, 1, "t", encode_value({"t": (HOSTILE,)}), Header(tm), Metadata(tm, generation_id=1)
        )
    finally:
        source.close()
    code, out, err = _run(capsys, "get", str(tm), "1", "k", "--url", amqp_url)
    assert code == 0, err
    _assert_inert(out + err)
    assert orjson.loads(out) == value  # JSON escapes: the same value read back
    code, out, err = _run(capsys, "get", str(tm), "1", "t", "--url", amqp_url)  # a literal
    assert code == 0, err
    _assert_inert(out + err)
    # an error naming what was asked for (here the key) is escaped as well
    code, out, err = _run(capsys, "get", str(tm), "1", "no-" + HOSTILE, "--url", amqp_url)
    assert code == 4
    _assert_inert(out + err)
    assert err.count("\n") == 1


def test_safe_leaves_ordinary_text_alone():
    text = "amqp://ops:***@mq:5672/prod Grüße 日本 ✓ tabs-free"
    assert cli.output._safe(text) == text
    assert cli.output._safe("a\tb\x00") == "a\\u0009b\\u0000"
    assert orjson.loads(f'"{cli.output._safe(HOSTILE)}"') == HOSTILE
