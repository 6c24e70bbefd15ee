"""``dataspace status`` as text: the table of queues, the consumers, the active
reaper, the next scheduled reap, the dead letters and the verdict."""

from __future__ import annotations

import datetime as dt
from typing import Any

from dataspace_core.protocol import REAPER_QUEUE

from .output import _emit, _safe


def _figure(value: Any) -> str:
    return "-" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        moment = dt.datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    seconds = int((moment - dt.datetime.now(dt.timezone.utc)).total_seconds())
    if seconds < 0:
        return " (overdue: runs when a reaper consumer takes it)"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f" (in {days} d {hours} h)"
    return f" (in {hours} h {rest // 60} min)" if hours else f" (in {rest // 60} min {rest % 60} s)"


def _table(rows: list[tuple[str, ...]], right_from: int) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:right_from], widths)]
        cells += [cell.rjust(width) for cell, width in zip(row[right_from:], widths[right_from:])]
        _emit("  ".join(cells).rstrip())


def _print_status(status: dict) -> None:
    amqp = status["amqp"]
    broker = "AMQP ok" if amqp["connected"] else "AMQP: cannot connect"
    _emit(
        f"vhost {status['vhost']!r}: broker {_safe(amqp['url'])} ({broker}), management API "
        f"{_safe(status['management_url'])}"
    )
    _print_queues(status["queues"])
    _print_consumers(status["queues"])
    _print_reaper(status["queues"])
    _print_schedule(status["next_reap"])
    dead = status["dead_letters"]
    if dead is None:
        _emit("dead letters: unknown (no statistics yet)")
    else:
        _emit(f"dead letters: {dead}" + (" (dataspace dead list)" if dead else ""))
    _print_verdict(status["warnings"], status["problems"])


def _print_queues(queues: list[dict]) -> None:
    rows = [("QUEUE", "TYPE", "STATE", "READY", "UNACKED", "CONSUMERS")]
    for q in queues:
        rows.append(
            (
                _safe(q["name"]),
                _safe(_figure(q["type"])),
                _safe(_figure(q["state"])),
                _figure(q["messages_ready"]),
                _figure(q["messages_unacknowledged"]),
                _figure(q["consumers"]),
            )
        )
    _table(rows, 3)
    if all(q["fresh"] for q in queues):
        _emit(
            "(READY and CONSUMERS: now; STATE and UNACKED: management statistics, up to 5 s "
            "old, -: none yet)"
        )
    else:
        _emit("(figures from the management statistics, up to 5 s old; -: none yet)")


def _print_consumers(queues: list[dict]) -> None:
    listed = [(q["name"], c) for q in queues for c in q["consumer_details"]]
    if not listed:
        return
    _emit("consumers (management API, about a second behind):")
    rows = [
        (
            "  " + _safe(name),
            _safe(c["connection_name"] or c["peer"]),
            _safe(f"tag {c['consumer_tag']}"),
            {"single_active": "active", "waiting": "waiting"}.get(c["activity_status"], ""),
        )
        for name, c in listed
    ]
    _table(rows, 4)


def _print_reaper(queues: list[dict]) -> None:
    reaper = next((q for q in queues if q["name"] == REAPER_QUEUE), None)
    if reaper is None:
        return
    active = reaper["active_consumer"]
    if active:
        who = _safe(active["name"] or active["connection"])
        _emit(
            f"active reaper consumer: {who} (peer {_safe(active['peer'])}, "
            f"{_safe(active['consumer_tag'])})"
        )
    elif reaper["consumers"]:
        _emit("active reaper consumer: not reported by the management API yet")


def _print_schedule(pending: dict | None) -> None:
    if pending and pending["next_reap_at"]:
        days = pending["days"]
        days = f", task managers older than {days:g} days" if _is_number(days) else ""
        when = _safe(pending["next_reap_at"])
        _emit(f"next scheduled reap: {when}{_in(pending['next_reap_at'])}{days}")
    elif pending:
        _emit("next scheduled reap: a run is pending (no x-dataspace-next-reap-at header)")
    else:
        _emit("next scheduled reap: none pending (retention_days 0, or not armed yet)")


def _print_verdict(warnings: list[str], problems: list[str]) -> None:
    if warnings:
        _emit("WARNINGS:")
        for warning in warnings:
            _emit(f"  - {_safe(warning)}")
    if problems:
        _emit("UNHEALTHY:")
        for problem in problems:
            _emit(f"  - {_safe(problem)}")
    elif warnings:
        _emit(f"healthy, with {len(warnings)} warning(s)")
    else:
        _emit("healthy")
