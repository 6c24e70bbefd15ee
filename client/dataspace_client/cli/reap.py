"""``dataspace reap --now --days N``: one retention run, sent to the workers'
reaper (only one runs at a time across all workers), and what it removed."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import orjson

from .broker import REAP_TIMEOUT, _check_broker, _source, _timeout
from .output import EXIT_CONFIG, EXIT_OK, _emit, _error, _progress, _terminal

MIN_RETENTION_DAYS = 7


def _while_waiting(description: str, call: Callable[[], Any]) -> Any:
    """``call()``; on a terminal, with the time elapsed shown on stderr meanwhile."""
    if not _terminal(sys.stderr):
        return call()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="dataspace-call", daemon=True)
    thread.start()
    with _progress(desc=description, bar_format="{desc}: {elapsed} elapsed") as bar:
        while thread.is_alive():
            thread.join(0.25)
            bar.refresh()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _reap(args) -> int:
    if args.days is None:
        _error("reap: give --days (or DATASPACE_RETENTION_DAYS)")
        return EXIT_CONFIG
    if args.days < MIN_RETENTION_DAYS:
        _error(f"reap: --days must be at least {MIN_RETENTION_DAYS}, got {args.days:g}")
        return EXIT_CONFIG
    _check_broker(args, REAP_TIMEOUT)
    source = _source(args, REAP_TIMEOUT)
    try:
        result = _while_waiting(
            f"reaping (older than {args.days:g} days)",
            lambda: source.reap(args.days, timeout=_timeout(args, REAP_TIMEOUT)),
        )
    finally:
        source.close()
    if args.json:
        _emit(orjson.dumps(result).decode())
        return EXIT_OK
    skipped = " (skipped: another reap was running)" if result.get("skipped") else ""
    _emit(
        f"reaped task managers older than {args.days:g} days: "
        f"{result['taskmanagers']} task managers, {result['dataproducts']} products, "
        f"{result['batches']} batches in {result['seconds']:.1f} s{skipped}"
    )
    return EXIT_OK
