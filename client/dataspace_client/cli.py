"""``dataspace``: the operator's command.

    dataspace reap --now --days 30      # one retention run, through the workers' reaper

Exit codes: 0 done, 1 the service failed the request, 2 bad usage or
configuration, 3 the broker or service could not be reached in time.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from .errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceTimeoutError,
)
from .remote import DEFAULT_URL, RemoteDataSource

MIN_RETENTION_DAYS = 7

EXAMPLES = """\
examples:
  dataspace reap --now --days 30
  DATASPACE_AMQP_URL=amqp://ops:secret@mq:5672/prod dataspace reap --now --days 90 --timeout 3600
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataspace",
        description="Operate a dataspace service through RabbitMQ.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("DATASPACE_AMQP_URL", DEFAULT_URL),
        help="broker URL (env DATASPACE_AMQP_URL, default the local broker)".replace("%", "%%"),
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the result (600)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    reap = commands.add_parser(
        "reap",
        help="delete task managers older than a retention period, now",
        description="Send one retention message to the workers' reaper and print what it "
        "removed. Only one reap runs at a time across all workers.",
        epilog="example:\n  dataspace reap --now --days 30",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reap.add_argument("--now", action="store_true", required=True, help="run it now")
    reap.add_argument(
        "--days",
        type=float,
        default=_env_days(),
        help=f"retention period in days, at least {MIN_RETENTION_DAYS} "
        "(env DATASPACE_RETENTION_DAYS)",
    )
    return parser


def _env_days() -> float | None:
    value = os.environ.get("DATASPACE_RETENTION_DAYS")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _reap(args) -> int:
    if args.days is None:
        print("dataspace reap: give --days (or DATASPACE_RETENTION_DAYS)", file=sys.stderr)
        return 2
    if args.days < MIN_RETENTION_DAYS:
        print(
            f"dataspace reap: --days must be at least {MIN_RETENTION_DAYS}, got {args.days:g}",
            file=sys.stderr,
        )
        return 2
    source = RemoteDataSource({"url": args.url, "timeout": args.timeout, "app_id": "dataspace-cli"})
    try:
        result = source.reap(args.days)
    finally:
        source.close()
    print(
        f"reaped task managers older than {args.days:g} days: "
        f"{result['taskmanagers']} task managers, {result['dataproducts']} products, "
        f"{result['batches']} batches in {result['seconds']:.1f} s"
    )
    print(orjson.dumps(result).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _reap(args)
    except DataSpaceConfigurationError as exc:
        print(f"dataspace: {exc}", file=sys.stderr)
        return 2
    except (DataSpaceConnectionError, DataSpaceTimeoutError) as exc:
        print(f"dataspace: {exc}", file=sys.stderr)
        return 3
    except (DataSpaceError, KeyError, ValueError, TypeError) as exc:
        print(f"dataspace: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
