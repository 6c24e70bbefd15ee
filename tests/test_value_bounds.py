"""Reading a product is bounded, whoever wrote its bytes (issue 12, finding 9).

A 204 KB zlib stream inflates to 200 MiB, a 1 MB one to 1 GiB; a literal of
200 MiB of ``0,`` would take ~200 GB to evaluate (about 1 KB per item); a
literal nested 100,000 deep overflows the parser. Each must end in a clear
DataSpaceError, with memory held near the limits, never in MemoryError or an
out-of-memory kill. The engine's formats still read (tests/test_engine_compat.py).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import zlib

import pytest

from dataspace_client import values
from dataspace_client.values import (
    ValueTooLargeError,
    compress,
    decode_value,
    decompress,
    encode_value,
    zloads,
)
from dataspace_core.errors import DataSpaceError
from tests.support.value_bombs import MiB, items_bomb, string_bomb


def test_a_value_past_the_byte_limit_is_refused(monkeypatch):
    monkeypatch.setenv("DATASPACE_MAX_VALUE_BYTES", str(16 * MiB))
    bomb = string_bomb(200)
    assert len(bomb) < 250_000  # the 204 KB bomb of the issue
    for read in (lambda b: decode_value(b, allow_pickle=False), decompress, zloads):
        with pytest.raises(ValueTooLargeError, match="DATASPACE_MAX_VALUE_BYTES") as caught:
            read(bomb)
        assert "more than 16,777,216 bytes" in str(caught.value)
        assert isinstance(caught.value, DataSpaceError)
    # just under the limit reads
    small = string_bomb(15)
    assert len(decode_value(small)["a"]) == 15 * MiB


def test_a_literal_with_too_many_items_is_refused_before_evaluating(monkeypatch):
    with pytest.raises(ValueTooLargeError, match="more than 1,000,000 items"):
        decode_value(items_bomb(8))  # 4 Mi items: ~4 GB to evaluate
    monkeypatch.setenv("DATASPACE_MAX_VALUE_ITEMS", "10")
    with pytest.raises(ValueTooLargeError, match="DATASPACE_MAX_VALUE_ITEMS"):
        decode_value(encode_value({"a": list(range(20))}))
    # separators inside strings and bytes (a pickle's) are not items
    value = {"text": "a,b:c" * 1000, "blob": b",:" * 1000, "tricky": "'''\\',\""}
    assert decode_value(encode_value(value)) == value
    wrapped = encode_value([1, 2, 3])  # a pickle inside the wrapper
    assert decode_value(wrapped) == [1, 2, 3]


def test_a_comment_or_triple_quote_cannot_hide_items(monkeypatch):
    monkeypatch.setenv("DATASPACE_MAX_VALUE_ITEMS", "100")
    items = "0," * 500
    for text in (
        "#'\\\n[" + items + "0]#'",  # a comment that looks like a string opening
        "['''x''', " + items + "0]",
        "['''it''s''', " + items + "0]",
    ):
        with pytest.raises(ValueTooLargeError):
            decode_value(zlib.compress(text.encode()))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        "-" * 100_000 + "1",
        "{'pickled': False, 'value': " + "{'a': " * 50_000 + "1" + "}" * 50_001,
    ],
    ids=["lists", "unary", "dicts"],
)
def test_a_deeply_nested_literal_is_a_clear_error(text):
    with pytest.raises(DataSpaceError, match="not in DataBlock format") as caught:
        decode_value(zlib.compress(text.encode()))
    assert not isinstance(caught.value, ValueTooLargeError)


def test_the_engines_formats_still_read():
    engine_dict = zlib.compress(str({"pickled": False, "value": {"cpus": 4}}).encode("latin1"), 9)
    assert decode_value(engine_dict) == {"cpus": 4}
    pickled = compress({"pickled": True, "value": pickle.dumps({1, 2})})
    assert decode_value(pickled) == {1, 2}
    assert decode_value(str({"pickled": False, "value": {"x": 1}}).encode()) == {"x": 1}
    assert zloads(pickle.dumps([1])) == [1]
    assert decompress(b"not compressed") == "not compressed"
    truncated = zlib.compress(b"{'x': 1}")[:-3]  # not a whole stream: read as it is
    with pytest.raises(DataSpaceError):
        decode_value(truncated)


def test_a_bad_limit_setting_is_named(monkeypatch):
    monkeypatch.setenv("DATASPACE_MAX_VALUE_BYTES", "lots")
    with pytest.raises(DataSpaceError, match="DATASPACE_MAX_VALUE_BYTES must be a positive"):
        decode_value(encode_value({"a": 1}))
    assert values.max_value_items() == values.DEFAULT_MAX_VALUE_ITEMS


def _peak_rss_of(code: str, env: dict | None = None) -> tuple[str, float]:
    """Run ``code`` in a fresh interpreter: its output and peak RSS in MiB."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        from tests.support.value_bombs import peak_rss_mib
        print("PEAK", peak_rss_mib())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    out, _, peak = done.stdout.rpartition("PEAK ")
    return out, float(peak)


def test_reading_bombs_keeps_memory_near_the_limit():
    """Defaults: the issue's 204 KB bomb (200 MiB) and a 1 GiB one stop at 64 MiB
    (+ one 4 MiB chunk); 8 MiB of items (4 Mi of them) are refused before evaluating."""
    out, peak = _peak_rss_of(
        """
        import zlib
        from tests.support.value_bombs import string_bomb, items_bomb
        from dataspace_client.values import decode_value, ValueTooLargeError
        for bomb in (string_bomb(200), string_bomb(1024), items_bomb(8)):
            try:
                decode_value(bomb)
            except ValueTooLargeError as exc:
                print("REFUSED", len(bomb), exc)
        """
    )
    assert out.count("REFUSED") == 3, out
    print(out, f"peak RSS {peak:.0f} MiB")
    assert peak < 64 + 100, peak  # limit + interpreter + one chunk, not 1 GiB


def test_dataspace_get_on_a_bomb_is_one_error_line_in_bounded_memory(amqp_url, worker_pool):
    """The ``dataspace`` command reading bombs stored through the service: exit 1,
    one line naming the limit, its peak RSS measured (VmHWM, in the command itself)."""
    import uuid

    from dataspace_client.datablock import Header, Metadata
    from dataspace_client.remote import RemoteDataSource

    source = RemoteDataSource({"url": amqp_url, "timeout": 60, "app_id": "dataspace-tests"})
    try:
        tm = source.store_taskmanager(f"bomb-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:32])
        for key, bomb in (("gib", string_bomb(1024)), ("items", items_bomb(8))):
            source.insert(tm, 1, key, bomb, Header(tm), Metadata(tm, generation_id=1))
    finally:
        source.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}
    limits = {"gib": "DATASPACE_MAX_VALUE_BYTES", "items": "DATASPACE_MAX_VALUE_ITEMS"}
    peaks = []
    for key, limit in limits.items():
        argv = ["get", str(tm), "1", key, "--url", amqp_url]
        with tempfile.NamedTemporaryFile("r") as peak_file:
            # the command's own main, its peak RSS written where stderr stays clean
            wrapper = (
                "import sys\n"
                "from dataspace_client.cli import main\n"
                "from tests.support.value_bombs import peak_rss_mib\n"
                "try:\n"
                f"    code = main({argv!r})\n"
                "finally:\n"
                f"    open({peak_file.name!r}, 'w').write(str(peak_rss_mib()))\n"
                "sys.exit(code)\n"
            )
            done = subprocess.run(
                [sys.executable, "-c", wrapper],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            peaks.append(float(peak_file.read() or "nan"))
        assert done.returncode == 1, done.stderr
        assert limit in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert done.stdout == ""
    peak = max(peaks)
    print(f"dataspace get on a 1 GiB and an 8 MiB-of-items bomb: peak RSS {peak:.0f} MiB")
    assert peak < 64 + 150, peak
