"""``dataspace dead list``, ``purge`` and ``drop``: the dead letters in queue
dataspace.dead, looked at as ``dead_letters`` says (``dead replay`` is in
``dead_replay``)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import orjson

from dataspace_core.protocol import DEAD_LETTER_QUEUE

from .broker import _close, _vhost
from .dead_letters import (
    MAX_WINDOW,
    _dead_connection,
    _dead_entry,
    _DeadLetters,
    _described,
    _filtering,
    _looked_at,
    _selected,
)
from .output import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    _ask,
    _emit,
    _error,
    _progress,
    _safe,
    _terminal,
)


def _dead_list(args) -> int:
    connection, present = _dead_connection(args, "list")
    entries: list[dict] = []
    seen = 0
    try:
        letters = _DeadLetters(connection, present)
        try:
            for method, props, body in letters:
                seen += 1
                entry = _dead_entry(method, props, body)
                if _selected(entry, args):
                    entries.append(entry)
        finally:
            letters.close()
    finally:
        _close(connection)
    vhost = _vhost(args)
    shown = entries[: args.limit]
    if args.json:
        out = {
            "vhost": vhost,
            "total": present,
            "examined": seen,
            "matching": len(entries),
            "messages": shown,
        }
        _emit(orjson.dumps(out).decode())
        return EXIT_OK
    for e in shown:
        _emit(
            f"{_safe(e['message_id'] or '-')}  {_safe(e['operation'] or '-')}  "
            f"{_safe(e['code'] or '-')}  {_safe(e['time'] or '-')}  {_safe(e['size'])} bytes"
        )
        _emit(f"    reason: {_safe(e['reason'] or '-')}")
        _emit(f"    body:   {_safe(e['preview'])}")
    summary = f"{len(shown)} shown"
    if _filtering(args):
        summary += f" of {len(entries)} matching"
    elif len(shown) < len(entries):
        summary += f" (-n {args.limit})"
    _emit(
        f"{summary}; {present} dead letter(s) in {DEAD_LETTER_QUEUE} of vhost {vhost!r}"
        + _looked_at(seen, present)
    )
    return EXIT_OK


def _must_ask_first(args, what: str) -> int | None:
    """For a command that removes dead letters: exit 2 when it could neither ask nor
    was told -y."""
    if args.yes or _terminal(sys.stdin):
        return None
    _error(f"{what} removes dead letters for good: pass -y (there is no terminal to ask on)")
    return EXIT_CONFIG


def _remove_selected(
    args, connection, present: int, chosen: Callable[[dict], bool], what: str
) -> tuple[int, int, list[dict]]:
    """Look at every dead letter, remove those ``chosen`` (after asking, unless -y)
    and give the others back in order. ``(removed, looked at, chosen entries)``;
    nothing is removed when the operator says no (then ``removed`` is -1)."""
    tags: list[int] = []
    entries: list[dict] = []
    seen = 0
    removed = 0
    letters = _DeadLetters(connection, present)
    try:
        with _progress(total=min(present, MAX_WINDOW), unit="msg", desc="looking") as bar:
            for method, props, body in letters:
                seen += 1
                bar.update(1)
                entry = _dead_entry(method, props, body)
                if chosen(entry):
                    tags.append(method.delivery_tag)
                    entries.append(entry)
        if tags and not args.yes:
            if not _ask(
                f"remove {len(tags)} dead letter(s) {what}, of the {seen} there, for good?",
                connection,
            ):
                tags = []
                removed = -1
    finally:
        letters.close(remove=tags)
    return (removed if removed < 0 else len(tags)), seen, entries


def _dead_purge(args) -> int:
    refused = _must_ask_first(args, "purge")
    if refused is not None:
        return refused
    connection, present = _dead_connection(args, "purge")
    vhost = _vhost(args)
    try:
        if present == 0:
            _emit(f"purged 0 (no dead letters in {DEAD_LETTER_QUEUE} of vhost {vhost!r})")
            return EXIT_OK
        if not _filtering(args):
            if not args.yes and not _ask(
                f"purge all {present} dead letter(s) of {DEAD_LETTER_QUEUE} in vhost {vhost!r} "
                "for good?",
                connection,
            ):
                _error("not purged: answered no")
                return EXIT_FAILED
            purged = connection.channel().queue_purge(DEAD_LETTER_QUEUE).method.message_count
            _emit(f"purged {purged} dead letter(s) from {DEAD_LETTER_QUEUE} of vhost {vhost!r}")
            return EXIT_OK
        removed, seen, _ = _remove_selected(
            args, connection, present, lambda e: _selected(e, args), f"with {_described(args)}"
        )
    finally:
        _close(connection)
    if removed < 0:
        _error("not purged: answered no")
        return EXIT_FAILED
    _emit(
        f"purged {removed} of {seen} dead letter(s) from {DEAD_LETTER_QUEUE} of vhost "
        f"{vhost!r}" + _looked_at(seen, present)
    )
    return EXIT_OK


def _dead_drop(args) -> int:
    refused = _must_ask_first(args, "drop")
    if refused is not None:
        return refused
    wanted = set(args.message_ids)
    connection, present = _dead_connection(args, "drop")
    vhost = _vhost(args)
    try:
        removed, seen, entries = _remove_selected(
            args,
            connection,
            present,
            lambda e: e["message_id"] in wanted,
            "with the message_id(s) given",
        )
    finally:
        _close(connection)
    if removed < 0:
        _error("not dropped: answered no")
        return EXIT_FAILED
    _emit(
        f"dropped {removed} dead letter(s) from {DEAD_LETTER_QUEUE} of vhost {vhost!r}"
        + _looked_at(seen, present)
    )
    found = {e["message_id"] for e in entries}
    missing = [m for m in dict.fromkeys(args.message_ids) if m not in found]
    for message_id in missing:
        _error(
            f"not found in {DEAD_LETTER_QUEUE}: {message_id}; 'dataspace dead list' shows "
            "what is there"
        )
    return EXIT_NOT_FOUND if missing else EXIT_OK
