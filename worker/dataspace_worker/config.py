"""Worker settings: defaults, then an optional TOML file, then environment, then flags.

Every setting is declared once in ``SETTINGS`` with its flag, environment
variable, default and help; the README's table is made from the same list
(``dataspace-worker --print-settings``).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import tomllib

from dataspace_core.errors import DataSpaceConfigurationError
from dataspace_core.limits import MAX_MESSAGE_BYTES

from .postgres import DEFAULT_DSN as DEFAULT_PG_DSN

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    #: a one-letter flag as well (``-n``), for the settings typed most often
    short: str | None = None
    #: shown masked by --print-settings and in logs (may hold a password)
    secret: bool = False

    @property
    def env(self) -> str:
        return "DATASPACE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "amqp_url",
        str,
        DEFAULT_AMQP_URL,
        "RabbitMQ URL (amqp://user:pass@host:port/vhost); a cluster's nodes: comma-separated",
        secret=True,
    ),
    Setting(
        "pg_dsn",
        str,
        DEFAULT_PG_DSN,
        "PostgreSQL DSN (libpq string or postgresql:// URL)",
        secret=True,
    ),
    Setting(
        "create_database",
        bool,
        False,
        "create the database named in pg_dsn if it is missing (needs the CREATEDB right); "
        "without it a missing database stops the worker",
    ),
    Setting(
        "name",
        str,
        "",
        "this worker's name in its connection names and consumer tags (default: the host name)",
        short="-n",
    ),
    Setting(
        "consumers",
        int,
        2,
        "consumers (channels, each with its own database thread)",
        1,
        short="-c",
    ),
    Setting(
        "prefetch", int, 128, "unacknowledged requests each consumer holds and runs as one batch", 1
    ),
    Setting("delivery_limit", int, 10, "deliveries of one request before it is dead-lettered", 1),
    Setting(
        "lanes",
        int,
        0,
        "ordering lanes for requests by task manager (0: none; same on every worker)",
        0,
    ),
    Setting("drain_timeout", float, 30.0, "seconds to finish requests in hand on SIGTERM", 0),
    Setting(
        "retention_days",
        float,
        0.0,
        "scheduled reaps delete task managers older than this (0: no schedule; else >= 7)",
        0,
    ),
    Setting("reap_interval", float, 86400.0, "seconds between scheduled reaps (>= 7080)", 0),
    Setting("reap_batch", int, 5000, "rows deleted per transaction by a reap", 1),
    Setting("max_body", int, 64 * 1024 * 1024, "largest request body accepted, in bytes", 1024),
    Setting(
        "max_headers",
        int,
        16 * 1024,
        "largest request header table accepted, in encoded bytes (larger: refused)",
        1024,
    ),
    Setting(
        "max_message_size",
        int,
        MAX_MESSAGE_BYTES,
        "the broker's max_message_size: a larger reply becomes a too_large error",
        64 * 1024,
    ),
    Setting(
        "dead_letter_body",
        int,
        1024 * 1024,
        "body bytes a dead letter keeps (longer: truncated, with its size and SHA-256)",
        1024,
    ),
    Setting(
        "max_bytes_in_hand",
        int,
        256 * 1024 * 1024,
        "bytes of request bodies held unsettled over which the worker takes no more",
        1024 * 1024,
    ),
    Setting("idempotency_ttl", float, 86400.0, "seconds a write's message_id is remembered", 600),
    Setting("connect_timeout", float, 10.0, "seconds per broker or database connection attempt", 1),
    Setting(
        "log_level",
        str,
        "INFO",
        "logging level",
        None,
        ("DEBUG", "INFO", "WARNING", "ERROR"),
        short="-l",
    ),
    Setting("log_format", str, "TEXT", "log lines as TEXT or JSON", None, ("TEXT", "JSON")),
    Setting(
        "metrics_host",
        str,
        "127.0.0.1",
        "address of the metrics and health server (0.0.0.0 in containers)",
    ),
    Setting("metrics_port", int, 9464, "port of /metrics, /healthz, /readyz, /livez (0: off)", 0),
)


@dataclass(frozen=True)
class WorkerSettings:
    """Resolved settings; defaults live in SETTINGS only."""

    amqp_url: str
    pg_dsn: str
    create_database: bool
    name: str
    consumers: int
    prefetch: int
    delivery_limit: int
    lanes: int
    drain_timeout: float
    retention_days: float
    reap_interval: float
    reap_batch: int
    max_body: int
    max_headers: int
    max_message_size: int
    dead_letter_body: int
    max_bytes_in_hand: int
    idempotency_ttl: float
    connect_timeout: float
    log_level: str
    log_format: str
    metrics_host: str
    metrics_port: int

    @classmethod
    def with_defaults(cls, **overrides: Any) -> WorkerSettings:
        values = {s.name: s.default for s in SETTINGS}
        values.update(overrides)
        return cls(**values)


if [f.name for f in fields(WorkerSettings)] != [s.name for s in SETTINGS]:  # pragma: no cover
    raise RuntimeError("WorkerSettings and SETTINGS disagree")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _coerce(setting: Setting, value: Any, source: str) -> Any:
    where = f"setting '{setting.name}' (from {source})"
    try:
        if setting.kind is bool:
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                value = value.strip().lower() in _TRUE
            elif not isinstance(value, bool):
                raise ValueError
        elif setting.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif setting.kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError):
        kind = "true or false" if setting.kind is bool else setting.kind.__name__
        raise DataSpaceConfigurationError(f"{where} must be {kind}, got {value!r}") from None
    if setting.choices is not None:
        value = value.upper()
        if value not in setting.choices:
            raise DataSpaceConfigurationError(
                f"{where} must be one of {', '.join(setting.choices)}, got {value!r}"
            )
    if setting.minimum is not None and value < setting.minimum:
        raise DataSpaceConfigurationError(
            f"{where} must be at least {setting.minimum}, got {value}"
        )
    return value


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise DataSpaceConfigurationError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataSpaceConfigurationError(f"config file {path} is not valid TOML: {exc}") from None
    data = data.get("worker", data)
    known = {s.name for s in SETTINGS}
    unknown = set(data) - known
    if unknown:
        raise DataSpaceConfigurationError(
            f"config file {path}: unknown setting(s) {', '.join(sorted(unknown))}"
        )
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with worker settings")
    for s in SETTINGS:
        flags = (s.short, s.flag) if s.short else (s.flag,)
        text = f"{s.help} (env {s.env}, default {s.default!r})".replace("%", "%%")
        if s.kind is bool:
            parser.add_argument(
                *flags, dest=s.name, default=None, action="store_const", const=True, help=text
            )
        else:
            parser.add_argument(
                *flags, dest=s.name, default=None, metavar=s.name.upper(), help=text
            )


def load(args: argparse.Namespace | None = None, environ: dict | None = None) -> WorkerSettings:
    """Resolve every setting from its sources; DataSpaceConfigurationError names a bad one."""
    return resolve(args, environ)[0]


def resolve(
    args: argparse.Namespace | None = None, environ: dict | None = None
) -> tuple[WorkerSettings, dict[str, str]]:
    """The settings, and where each came from ("default", "file F", "environment
    DATASPACE_X", "flag --x"): for --print-settings, and for error lines that must
    say which setting to fix, and where."""
    environ = os.environ if environ is None else environ
    file_path = getattr(args, "config", None) or environ.get("DATASPACE_CONFIG")
    file_values = _from_file(file_path) if file_path else {}
    values = {}
    sources = {}
    for s in SETTINGS:
        value, source = s.default, "default"
        if s.name in file_values:
            value, source = file_values[s.name], f"file {file_path}"
        if s.env in environ:
            value, source = environ[s.env], f"environment {s.env}"
        flag_value = getattr(args, s.name, None) if args is not None else None
        if flag_value is not None:
            value, source = flag_value, f"flag {s.flag}"
        values[s.name] = _coerce(s, value, source)
        sources[s.name] = source
    _check_amqp_url(values["amqp_url"])
    _check_pg_dsn(values["pg_dsn"])
    _check_name(values["name"], sources["name"])
    _check_retention(values)
    return WorkerSettings(**values), sources


def _check_name(name: str, source: str) -> None:
    from .identity import check_name

    problem = check_name(name)
    if problem is not None:
        raise DataSpaceConfigurationError(f"setting 'name' (from {source}) {problem}")


def _check_retention(values: dict) -> None:
    """The seed Reaper's minimums, read at load time from ``reaper`` (tests lower them)."""
    from . import reaper

    days = values["retention_days"]
    if days and days < reaper.MIN_RETENTION_DAYS:
        raise DataSpaceConfigurationError(
            f"setting 'retention_days' must be 0 (no scheduled reaps) or at least "
            f"{reaper.MIN_RETENTION_DAYS}, got {days:g}"
        )
    if values["reap_interval"] < reaper.MIN_INTERVAL:
        raise DataSpaceConfigurationError(
            f"setting 'reap_interval' must be at least {reaper.MIN_INTERVAL} seconds, "
            f"got {values['reap_interval']:g}"
        )


#: libpq keywords an error message may name as they are (any other quoted text in
#: libpq's message may be a piece of the password, and is masked)
_DSN_KEYWORDS = frozenset(
    "host hostaddr port dbname user password passfile channel_binding connect_timeout "
    "client_encoding options application_name fallback_application_name keepalives "
    "keepalives_idle keepalives_interval keepalives_count tcp_user_timeout replication "
    "gssencmode sslmode requiressl sslcompression sslcert sslkey sslpassword sslrootcert "
    "sslcrl sslcrldir sslsni requirepeer ssl_min_protocol_version ssl_max_protocol_version "
    "krbsrvname gsslib service target_session_attrs load_balance_hosts".split()
)
_KEEP = _DSN_KEYWORDS | {"="}


def _check_pg_dsn(dsn: str) -> None:
    """libpq must read the DSN; its complaint is shown without any piece of the
    password (libpq quotes the text it stumbled on, which may be one)."""
    from psycopg2.extensions import parse_dsn

    from dataspace_core.urls import _userinfo

    where = "setting 'pg_dsn'"
    _, userinfo, _ = _userinfo(dsn)
    if userinfo and ":" in userinfo and "/" in userinfo:  # libpq takes '#', '?', '@' there
        raise DataSpaceConfigurationError(
            f"{where}: not a usable PostgreSQL URL: an unencoded '/' before the host (in the "
            "user name or password): percent-encode it as %2F (the DSN is not shown: it may "
            "hold a password)"
        )
    try:
        parsed = parse_dsn(dsn)
    except Exception as exc:  # psycopg2.ProgrammingError, with libpq's words
        detail = str(exc).strip().removeprefix("invalid dsn: ")
        detail = re.sub(
            r'"([^"]*)"',
            lambda m: m.group(0) if m.group(1) in _KEEP else '"***"',
            detail,
        )
        raise DataSpaceConfigurationError(
            f"{where}: not a valid PostgreSQL DSN: {detail} (the DSN is not shown: it may "
            "hold a password)"
        ) from None
    port = parsed.get("port")
    if port and not all(p.strip().isdigit() for p in port.split(",")):
        raise DataSpaceConfigurationError(
            f"{where}: the port is not a number (the DSN is not shown: it may hold a "
            "password; in a URL, percent-encode '/' in the password as %2F)"
        )


def _check_amqp_url(url: str) -> None:
    from dataspace_core.amqp.addresses import broker_addresses

    try:
        broker_addresses(url)
    except ValueError as exc:
        raise DataSpaceConfigurationError(f"setting 'amqp_url': {exc}") from None


def effective(settings: WorkerSettings, sources: dict[str, str]) -> str:
    """Each setting's value as the worker would run with it, and its source;
    passwords masked."""
    from dataspace_core.urls import mask_password

    width = max(len(s.name) for s in SETTINGS)
    lines = []
    for s in SETTINGS:
        value = getattr(settings, s.name)
        if s.secret:
            value = mask_password(value) if "://" in value else mask_dsn(value)
        lines.append(f"{s.name:<{width}}  {value!r:<44}  {sources[s.name]}")
    return "\n".join(lines)


def mask_dsn(dsn: str) -> str:
    """A DSN fit for logs: the password hidden, in URL or key=value form."""
    from dataspace_core.urls import mask_password

    if "://" in dsn:
        return mask_password(dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def settings_table() -> str:
    """The settings as a Markdown table (for the README)."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| {s.name} | `{s.flag}` | `{s.env}` | `{s.default}` | {s.help} |")
    return "\n".join(rows)
