"""How the ``dataspace`` command writes: every line made safe for a terminal
(``_safe``, ``_emit``), errors and notes on stderr, times in ISO 8601 UTC, a
progress bar only on a terminal, and the exit codes scripts rely on."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
from typing import Any

from tqdm import tqdm

EXIT_OK = 0
EXIT_FAILED = 1  # the service failed the request; unhealthy; answered no
EXIT_CONFIG = 2  # usage or configuration
EXIT_UNREACHABLE = 3  # broker or management API unreachable, or no answer in time
EXIT_NOT_FOUND = 4
EXIT_WARNINGS = 5  # status: healthy, with warnings
EXIT_INTERRUPTED = 130  # Ctrl-C


def _safe(text: Any) -> str:
    """``text`` fit for a terminal: every character that is not printable (C0 and C1
    controls, DEL, so ANSI escape sequences; bidi overrides and other format
    characters; line breaks) written as a ``\\uXXXX`` escape, which is also valid
    inside a JSON string. Everything this command prints of what the broker, the
    workers or other clients supplied goes through here (``_emit``)."""
    text = text if isinstance(text, str) else str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON writes it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _emit(text: Any = "", file=None) -> None:
    """Print ``text`` line by line, each made safe (``_safe``): the only way this
    command writes. Text that may hold line breaks of its own (a field shown
    inside a line) must go through ``_safe`` first."""
    print("\n".join(_safe(line) for line in str(text).split("\n")), file=file or sys.stdout)


def _error(message: str) -> None:
    _emit(f"dataspace: {_safe(message)}", file=sys.stderr)


def _note(message: str) -> None:
    """A line about one item on stderr, above a progress bar if one is shown."""
    tqdm.write(f"dataspace: {_safe(message)}", file=sys.stderr)


def _iso(moment: Any) -> str | None:
    """ISO 8601 in UTC (``...Z``) of epoch seconds or a datetime (naive: UTC, as pika
    decodes an AMQP timestamp)."""
    if isinstance(moment, dt.datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(moment, bool) or not isinstance(moment, (int, float)):
        return None
    try:
        when = dt.datetime.fromtimestamp(moment, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat().replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _progress(**kwargs) -> tqdm:
    """A progress bar on stderr when it is a terminal; nothing otherwise (pipes, tests)."""
    return tqdm(file=sys.stderr, disable=not _terminal(sys.stderr), **kwargs)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reader_gone() -> None:
    """stdout's reader left (``| head``, say) with what it wanted: send what is
    still to be written to /dev/null, so that exiting does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _ask(question: str, connection=None) -> bool:
    """The operator's yes on the terminal; ``connection`` keeps answering the broker's
    heartbeats meanwhile (dead letters may be held for the answer)."""
    sys.stderr.write(f"{_safe(question)} [y/N] ")
    sys.stderr.flush()
    if connection is None:
        answer = sys.stdin.readline()
    else:
        box: list[str] = []
        reader = threading.Thread(
            target=lambda: box.append(sys.stdin.readline()), name="dataspace-ask", daemon=True
        )
        reader.start()
        while reader.is_alive():
            connection.sleep(0.2)
        answer = box[0] if box else ""
    return answer.strip().lower() in ("y", "yes")
