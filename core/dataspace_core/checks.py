"""Value checks: what each kind of argument must be, shared by both backends so
that they raise the same errors.

The remote client runs them before it sends anything (a bad call fails fast and
costs no round trip); the worker runs them again on what it receives, because it
never trusts a message.  Each returns the normalized value. Which check guards
which parameter of which operation is in ``catalog.py``.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping
from typing import Any

BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
#: Longest key or task manager name, in UTF-8 bytes: unique btree indexes refuse
#: entries much over 2,700 bytes, and no real key comes close.
MAX_TEXT_BYTES = 1024
MAX_UUID_CHARS = 36
MAX_KEYS_PER_CALL = 10_000
MAX_DAYS = 100_000

HEADER_FIELDS = ("create_time", "expiration_time", "scheduled_create_time", "creator", "schema_id")
METADATA_FIELDS = ("state", "generation_time", "missed_update_count")
METADATA_STATES = frozenset({"NEW", "START_BACKUP", "METADATA_UPDATE", "END_CYCLE"})


def _integer(value: Any, what: str, low: int = -BIGINT_MAX - 1, high: int = BIGINT_MAX) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"{what} must be an integer, got {value!r:.80}") from None
    else:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
    if not low <= number <= high:
        raise ValueError(f"{what} {number} is out of range [{low}, {high}]")
    return number


def sequence_id(value: Any) -> int:
    """A task manager's sequence_id: an int, or a numeric string as callers pass it."""
    return _integer(value, "taskmanager_id (sequence_id)")


def generation_id(value: Any) -> int:
    return _integer(value, "generation_id")


def text(value: Any, what: str) -> str:
    """A key or a name: a str that PostgreSQL can store and index."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise ValueError(f"{what} is longer than {MAX_TEXT_BYTES} bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate)") from None
    return value


def key(value: Any) -> str:
    return text(value, "key")


def name(value: Any) -> str:
    return text(value, "taskmanager_name")


def taskmanager_uuid(value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    value = text(value, "taskmanager_id")
    if len(value) > MAX_UUID_CHARS:
        raise ValueError(f"taskmanager_id is longer than {MAX_UUID_CHARS} characters")
    return value


def blob(value: Any) -> bytes:
    """A product value: the store keeps bytes and nothing else."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"value must be bytes, not {type(value).__name__}")


def _fields(value: Any, fields: tuple[str, ...], what: str) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping, not {type(value).__name__}")
    missing = [f for f in fields if f not in value]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    return {f: value[f] for f in fields}


def whole_seconds(value: Any, what: str) -> int:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value}")
        value = int(value)
    return _integer(value, what)


def header(value: Any) -> dict:
    """The stored fields of a Header (times as int seconds)."""
    out = _fields(value, HEADER_FIELDS, "header")
    for field in ("create_time", "expiration_time", "scheduled_create_time"):
        out[field] = whole_seconds(out[field], f"header {field}")
    out["creator"] = text(out["creator"], "header creator")
    if out["schema_id"] is not None:
        out["schema_id"] = _integer(out["schema_id"], "header schema_id")
    return out


def metadata(value: Any) -> dict:
    """The stored fields of a Metadata."""
    out = _fields(value, METADATA_FIELDS, "metadata")
    if out["state"] not in METADATA_STATES:
        raise ValueError(
            f"metadata state {out['state']!r:.80} is not one of {sorted(METADATA_STATES)}"
        )
    out["generation_time"] = whole_seconds(out["generation_time"], "metadata generation_time")
    out["missed_update_count"] = _integer(
        out["missed_update_count"], "metadata missed_update_count", 0, INT_MAX
    )
    return out


def moment(value: Any, what: str, optional: bool = True) -> _dt.datetime | str | None:
    """A time bound or datestamp: a datetime, or a string PostgreSQL parses as a time."""
    if value is None and optional:
        return None
    if isinstance(value, _dt.datetime):
        # An aware time goes as UTC: JSON encoders round offsets with seconds
        # (zoneinfo has them for historic dates) to whole minutes.
        if value.utcoffset() is not None:
            return value.astimezone(_dt.timezone.utc)
        return value
    if isinstance(value, str):
        return text(value, what)
    raise TypeError(f"{what} must be a datetime or an ISO string, not {type(value).__name__}")


def days(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"days must be a number, not {type(value).__name__}")
    if not value > 0:
        # The engine's message, which callers match; then ours.
        raise ValueError(
            f"Argument has to be positive, non zero integer. Supplied {value} (days must be > 0)"
        )
    if not value <= MAX_DAYS:  # also refuses NaN
        raise ValueError(f"days must be at most {MAX_DAYS} (the cut-off must stay after year 1)")
    return value


def keys(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError("keys must be a list of str")
    out = [key(k) for k in value]
    if len(out) > MAX_KEYS_PER_CALL:
        raise ValueError(f"at most {MAX_KEYS_PER_CALL} keys per call")
    return out


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def table(value: Any, known: Iterable[str]) -> str | None:
    if value is None:
        return None
    value = text(value, "table")
    known = tuple(known)
    if value not in known:
        raise ValueError(f"unknown table {value!r:.80}; tables are {', '.join(known)}")
    return value


#: the tables ``get_schema`` describes
TABLES = ("taskmanager", "dataproduct", "header", "metadata")
