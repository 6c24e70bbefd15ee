"""Logging set-up: plain text for people, JSON lines for log collectors.

In JSON each line is one object with ``time``, ``level``, ``logger``, ``message``
and whatever the call passed in ``extra`` (per-request lines carry
``operation``, ``outcome``, ``correlation_id``, ``message_id``, ``duration_ms``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "JSON":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs each failed connection attempt as ~7 ERROR lines and a traceback,
    # and a refused publish as a WARNING; the worker says the same in one line of
    # its own (cause in words, what it does next). Its warnings and errors show at
    # DEBUG only (its own debug lines, one per frame, never).
    logging.getLogger("pika").setLevel(logging.WARNING if level == "DEBUG" else logging.CRITICAL)


def printable(text) -> str:
    """Client-written text (an id, a type) as a log line may show it: control
    characters and escapes escaped, at most 255 characters, so a crafted value
    cannot clear an operator's terminal or forge log lines."""
    if text is None:
        return "-"
    if isinstance(text, bytes):
        return repr(text)[:255]
    text = str(text)
    return text[:255] if text.isprintable() else ascii(text)[1:-1][:255]


class Throttle:
    """At most ``burst`` lines of one kind per ``window`` seconds, whoever asks.

    A flood of refused requests (3,000 dead letters) must not become 3,000 WARNING
    lines: the line that follows a quiet spell says how many were left out, and the
    metrics count every one.
    """

    def __init__(self, window: float = 10.0, burst: int = 5):
        self.window = window
        self.burst = burst
        self._lock = threading.Lock()
        self._started = float("-inf")
        self._lines = 0
        self._left_out = 0

    def allow(self) -> tuple[bool, int]:
        """(whether to log this one, how many were left out since the last logged)."""
        now = time.monotonic()
        with self._lock:
            if now - self._started >= self.window:
                self._started, self._lines = now, 0
            if self._lines >= self.burst:
                self._left_out += 1
                return False, 0
            self._lines += 1
            left_out, self._left_out = self._left_out, 0
            return True, left_out


class Tally:
    """Events of one kind (dead letters) as one full line, then a summary per window.

    The first event after a quiet spell is logged in full (it names its message, so
    an operator can look it up); the ones that follow within ``window`` seconds are
    only counted, by reason, and ``summary`` gives them as one line once the window
    is over: 3,000 refused requests make two lines, not 3,000.
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self._lock = threading.Lock()
        self._started: float | None = None
        self._counts: dict[str, int] = {}

    def add(self, reason: str) -> bool:
        """Count one event; True when it is to be logged in full (a new window)."""
        now = time.monotonic()
        with self._lock:
            if self._started is None:
                self._started = now
                return True
            self._counts[reason] = self._counts.get(reason, 0) + 1
            return False

    def summary(self, force: bool = False) -> tuple[int, str] | None:
        """Once the window is over (or ``force``): how many events were counted and
        not logged, and "reason: n, ..."; a new window starts. None when there is
        nothing to say."""
        now = time.monotonic()
        with self._lock:
            if self._started is None or (not force and now - self._started < self.window):
                return None
            counts, self._counts = self._counts, {}
            self._started = None
        if not counts:
            return None
        parts = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(counts.items()))
        return sum(counts.values()), parts
