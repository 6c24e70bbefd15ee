"""What a flood of hostile requests leaves in the worker's log: one full WARNING
line and one summary line, no traceback, nothing a terminal would execute."""

from __future__ import annotations

import logging
import time

import orjson
import pika
import pytest

from dataspace_worker import logs
from dataspace_worker.dead_letters import DEAD_LETTERS, log_dead_letter_summary
from tests import services

pytestmark = pytest.mark.timeout(90)


def test_throttle_allows_a_burst_then_counts_what_it_left_out(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    throttle = logs.Throttle(window=10.0, burst=2)
    assert [throttle.allow() for _ in range(5)] == [(True, 0), (True, 0)] + [(False, 0)] * 3
    clock[0] += 10.0
    assert throttle.allow() == (True, 3)
    assert throttle.allow() == (True, 0)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("fuzz-1", "fuzz-1"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("abc\u202edef", "abc\\u202edef"),
        (b"\xff\xfe", "b'\\xff\\xfe'"),
        (None, "-"),
        ("x" * 1000, "x" * 255),
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(text, shown):
    assert logs.printable(text) == shown


def test_a_flood_of_bad_requests_is_a_few_warning_lines_and_no_traceback(
    own_vhost, pool_factory, caplog
):
    caplog.set_level(logging.INFO)
    pool = pool_factory(own_vhost)
    # a window of its own: what earlier tests in this process left is dropped unsaid
    DEAD_LETTERS.summary(force=True)
    bodies = [
        b"not json",
        orjson.dumps({"v": 1, "op": ["x"], "args": {}}),
        orjson.dumps({}),
        b"[" * 1000 + b"]" * 1000,
        orjson.dumps({"v": 1, "op": "delete_data_older_than", "args": {"days": 1}}),
    ]
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    sent = 300
    for n in range(sent):
        channel.basic_publish(
            "dataspace",
            "data.get_schema",
            bodies[n % len(bodies)],
            pika.BasicProperties(message_id=f"\x1b[2Jflood-{n}"),
        )
    connection.close()
    deadline = time.monotonic() + 60
    while pool.handled < sent and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.handled >= sent
    assert len(services.drain_queue(own_vhost, "dataspace.dead", idle=1.0)) == sent
    log_dead_letter_summary()  # within the minute: nothing yet
    warnings = [r for r in caplog.records if r.getMessage().startswith("dead-lettering")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    # its body named no operation: the line names the routing key it came with
    assert warnings[0].getMessage().startswith("dead-lettering data.get_schema request ")
    assert not [r for r in caplog.records if r.getMessage().startswith("dead-lettered ")]
    log_dead_letter_summary(force=True)  # as the worker does when a minute is over
    summary = [r for r in caplog.records if r.getMessage().startswith("dead-lettered ")]
    print(f"\n{sent} refused requests: {summary[0].getMessage()}")
    assert len(summary) == 1
    assert summary[0].getMessage().startswith(f"dead-lettered {sent - 1} more requests")
    assert f"(bad_request: {sent - 1})" in summary[0].getMessage()
    assert DEAD_LETTERS.summary(force=True) is None
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a bad request"
    assert "\x1b" not in caplog.text
