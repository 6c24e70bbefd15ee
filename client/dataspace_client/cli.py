"""``dataspace``: the operator's command.

    dataspace status [--json]                        # queues, consumers, next reap, dead letters
    dataspace dead list [--limit N] [--json]         # dead letters, left in place
    dataspace dead replay [--limit N] [--yes]        # dead letters back to the workers
    dataspace get TM_SEQ GEN KEY [--allow-pickle]    # print one product's value
    dataspace put TM_SEQ GEN KEY '{"cpus": 4}'       # insert or update one product
    dataspace reap --now --days 30                   # one retention run, through the reaper

``dead list`` and ``dead replay`` take ``--message-id ID`` (repeatable) to keep to
those dead letters. Options every command takes, before or after its name:
``--url`` (broker URL, env ``DATASPACE_AMQP_URL``), ``--management-url`` (env
``DATASPACE_MANAGEMENT_URL``; default: the broker URL's host and credentials on
port 15672, and its vhost) and ``--timeout`` (seconds; default 600 for ``reap``,
10 for a management API call, 30 otherwise).

``status`` and ``dead list`` read the RabbitMQ management API (plugin
``rabbitmq_management``), whose figures lag by up to its statistics interval (5 s
by default). Both look at messages as the management UI's "Get messages" does:
taken and requeued at once (ackmode ``ack_requeue_true``), so they stay where
they were.

``dead replay`` works over AMQP: each dead letter is published again to exchange
``dataspace`` with its original routing key and properties (message_id kept, so a
write that did get applied is not applied twice), without the dead-letter headers
and without ``reply_to`` (its sender is gone; a request that fails again is
dead-lettered again rather than answered to nobody), and is removed from
``dataspace.dead`` only once the broker has confirmed the copy.

Exit codes (scripts may rely on them):

    0  done; for ``status``: every queue is there and the workers consume
    1  the service failed the request; ``status`` found something unhealthy (a
       queue missing or not running, no consumer on dataspace.requests or
       dataspace.reaper); a dead letter could not be replayed; the operator
       answered no
    2  bad usage or configuration (a bad argument, a refused login, no such vhost
       or queue)
    3  the broker or the management API could not be reached, or did not answer
       in time
    4  not found: ``get`` of a product that does not exist, ``put`` into a task
       manager that does not exist
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import pprint
import sys
import time
from typing import Any

import orjson
import pika
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    NackError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
    UnroutableError,
)
from tqdm import tqdm

from . import __version__, pika_patches  # noqa: F401  (one bad header must not break the connection)
from .errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceExistsError,
    DataSpaceTimeoutError,
)
from .management import (
    ManagementAuthError,
    ManagementClient,
    ManagementError,
    ManagementNotFoundError,
    vhost_of,
)
from .protocol import (
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    REAPER_QUEUE,
    REQUEST_QUEUE,
    SCHEDULE_QUEUE,
)
from .remote import DEFAULT_URL, RemoteDataSource
from .urls import BrokerAddresses, mask_password
from .values import PickleRefusedError, ValueTooLargeError, decode_value, encode_value

MIN_RETENTION_DAYS = 7
REAP_TIMEOUT = 600.0
DEFAULT_TIMEOUT = 30.0
MANAGEMENT_TIMEOUT = 10.0
CREATOR = "dataspace-cli"
#: the queues of the service, in the order ``status`` shows them
SERVICE_QUEUES = (REQUEST_QUEUE, DEAD_LETTER_QUEUE, REAPER_QUEUE, SCHEDULE_QUEUE)
NEXT_REAP_HEADER = "x-dataspace-next-reap-at"
#: headers a dead letter gained on its way to dataspace.dead; a replay drops them
DEAD_LETTER_HEADERS = frozenset(
    {
        "x-dataspace-reason",
        "x-dataspace-error-code",
        "x-original-exchange",
        "x-original-routing-key",
        "x-dead-lettered-by",
        "x-dead-lettered-at",
        "x-dataspace-publish-seq",
        "x-death",
        "x-delivery-count",
    }
)
DEAD_LETTER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
PREVIEW_CHARS = 72

EXAMPLES = """\
examples:
  dataspace status
  dataspace status --json | jq .dead_letters
  dataspace dead list --limit 20
  dataspace dead replay --yes
  dataspace get 42 1 resources
  dataspace put 42 1 resources '{"cpus": 4}'
  dataspace reap --now --days 30
  DATASPACE_AMQP_URL=amqp://ops:secret@mq:5672/prod dataspace status
  dataspace --url amqp://ops:secret@mq:5672/prod --management-url https://mq-admin.example/ status

exit codes: 0 ok, 1 the service failed the request or something is unhealthy,
2 usage or configuration, 3 broker or management API unreachable or timeout,
4 not found (get, put)
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; keeps text with line breaks (examples) as it is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


# -- arguments -----------------------------------------------------------------------
def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """--url, --management-url, --timeout: on the main parser with their defaults, and on
    each command (``suppress``) so that they may also follow the command's name."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=default(os.environ.get("DATASPACE_AMQP_URL", DEFAULT_URL)),
        help="broker URL (env DATASPACE_AMQP_URL, default the local broker)".replace("%", "%%"),
    )
    group.add_argument(
        "--management-url",
        metavar="URL",
        default=default(os.environ.get("DATASPACE_MANAGEMENT_URL") or None),
        help="management API URL (env DATASPACE_MANAGEMENT_URL; default http://HOST:15672/ "
        "with the broker URL's host and credentials)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(None),
        help=f"seconds to wait (default {REAP_TIMEOUT:g} for reap, {MANAGEMENT_TIMEOUT:g} for "
        f"the management API, {DEFAULT_TIMEOUT:g} otherwise)",
    )
    return options


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataspace",
        description="Operate a dataspace service through RabbitMQ.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
        parents=[_connection_options(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"dataspace {__version__}")
    common = [_connection_options(suppress=True)]
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser(
        "status",
        help="queues, consumers, the next scheduled reap and the dead letters",
        description="Show, from the RabbitMQ management API, each dataspace.* queue of the "
        "vhost with its messages ready and unacknowledged and its consumers (for "
        "dataspace.reaper, which consumer is the active one), the next scheduled reap and "
        "the number of dead letters. Exit 0 when every queue is there and the workers "
        "consume, 1 when not, 3 when the management API cannot be reached.",
        epilog="examples:\n  dataspace status\n  dataspace status --json\n"
        "  dataspace status --management-url http://mq:15672/",
        formatter_class=_Formatter,
        parents=common,
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")

    dead = commands.add_parser(
        "dead",
        help="list or replay the dead letters (queue dataspace.dead)",
        description="Requests the workers could not handle wait in queue dataspace.dead "
        "with the reason in their headers.",
        epilog="examples:\n  dataspace dead list\n  dataspace dead replay --yes",
        formatter_class=_Formatter,
    )
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="COMMAND")
    dead_list = dead_commands.add_parser(
        "list",
        help="show dead letters without removing them",
        description="Show the first dead letters, oldest first, without removing them (got "
        "through the management API and requeued at once): message_id, operation, error "
        "code and reason (or the broker's x-death reason), when, body size and a preview.",
        epilog="examples:\n  dataspace dead list\n  dataspace dead list --limit 500 --json\n"
        "  dataspace dead list --message-id 9f1c2e...",
        formatter_class=_Formatter,
        parents=common,
    )
    dead_list.add_argument(
        "--limit", type=_positive_int, default=50, help="look at the first N (default 50)"
    )
    dead_list.add_argument(
        "--message-id",
        action="append",
        metavar="ID",
        help="show only this message_id (repeatable)",
    )
    dead_list.add_argument("--json", action="store_true", help="one JSON object, for machines")
    replay = dead_commands.add_parser(
        "replay",
        help="publish dead letters again to the workers",
        description="Move dead letters back to exchange dataspace with their original "
        "routing key: headers x-original-routing-key, else the x-death routing key. The "
        "dead-letter headers and reply_to are dropped, message_id (the idempotency key) and "
        "the other properties kept. Each is removed from dataspace.dead only after the broker "
        "confirmed its copy; one without a routing key is skipped and stays. A request that "
        "fails again is dead-lettered again. Asks first, unless --yes or stdin is not a "
        "terminal.",
        epilog="examples:\n  dataspace dead replay\n  dataspace dead replay --limit 10 --yes\n"
        "  dataspace dead replay --message-id 9f1c2e... --yes",
        formatter_class=_Formatter,
        parents=common,
    )
    replay.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="look at the first N (default all there when it starts)",
    )
    replay.add_argument(
        "--message-id",
        action="append",
        metavar="ID",
        help="replay only this message_id (repeatable); the others stay",
    )
    replay.add_argument("--yes", "-y", action="store_true", help="do not ask")

    get = commands.add_parser(
        "get",
        help="print the value of one product",
        description="Print the value of a product: as JSON when it is plain JSON data, else "
        "as a Python literal; a value not in DataBlock format as a bytes literal (or hex). "
        "Exit 4 when there is no such product.",
        epilog="examples:\n  dataspace get 42 1 resources\n"
        "  dataspace get 42 1 model --allow-pickle",
        formatter_class=_Formatter,
        parents=common,
    )
    _product_arguments(get)
    get.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle a pickled product (runs code chosen by whoever wrote it)",
    )
    get.add_argument("--hex", action="store_true", help="raw (non-DataBlock) values in hex")

    put = commands.add_parser(
        "put",
        help="store one product (insert, or update if it exists)",
        description="Store VALUE, a JSON object, as a DataBlock dict product, with a Header "
        f"(creator {CREATOR!r}) and a NEW Metadata: inserted, or updated if the product "
        "exists. Exit 4 when the task manager does not exist.",
        epilog="examples:\n  dataspace put 42 1 resources '{\"cpus\": 4}'\n"
        "  echo '{\"cpus\": 4}' | dataspace put 42 1 resources -",
        formatter_class=_Formatter,
        parents=common,
    )
    _product_arguments(put)
    put.add_argument("value", metavar="VALUE", help="a JSON object, or - to read it from stdin")

    reap = commands.add_parser(
        "reap",
        help="delete task managers older than a retention period, now",
        description="Send one retention message to the workers' reaper and print what it "
        "removed. Only one reap runs at a time across all workers.",
        epilog="example:\n  dataspace reap --now --days 30",
        formatter_class=_Formatter,
        parents=common,
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


def _product_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tm_seq", metavar="TM_SEQ", type=int, help="task manager sequence id")
    parser.add_argument("generation", metavar="GEN", type=int, help="generation id")
    parser.add_argument("key", metavar="KEY", help="product key")


def _env_days() -> float | None:
    value = os.environ.get("DATASPACE_RETENTION_DAYS")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _timeout(args, default: float = DEFAULT_TIMEOUT) -> float:
    return args.timeout if args.timeout is not None else default


def _source(args, default_timeout: float = DEFAULT_TIMEOUT) -> RemoteDataSource:
    timeout = _timeout(args, default_timeout)
    return RemoteDataSource(
        {
            "url": args.url,
            "timeout": timeout,
            "connect_timeout": min(timeout, 10.0),
            "app_id": CREATOR,
        }
    )


def _management(args) -> ManagementClient:
    timeout = args.timeout if args.timeout is not None else MANAGEMENT_TIMEOUT
    return ManagementClient.for_broker(args.url, args.management_url, timeout=timeout)


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


def _iso(epoch: Any) -> str | None:
    if isinstance(epoch, dt.datetime):
        return epoch.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return None
    try:
        moment = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat().replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# -- reap ----------------------------------------------------------------------------
def _reap(args) -> int:
    if args.days is None:
        _error("reap: give --days (or DATASPACE_RETENTION_DAYS)")
        return 2
    if args.days < MIN_RETENTION_DAYS:
        _error(f"reap: --days must be at least {MIN_RETENTION_DAYS}, got {args.days:g}")
        return 2
    source = _source(args, REAP_TIMEOUT)
    try:
        result = source.reap(args.days, timeout=_timeout(args, REAP_TIMEOUT))
    finally:
        source.close()
    _emit(
        f"reaped task managers older than {args.days:g} days: "
        f"{result['taskmanagers']} task managers, {result['dataproducts']} products, "
        f"{result['batches']} batches in {result['seconds']:.1f} s"
    )
    _emit(orjson.dumps(result).decode())
    return 0


# -- status --------------------------------------------------------------------------
def _raise_if_no_vhost(api: ManagementClient) -> None:
    """After a 401/404: say so plainly if the cause is a vhost the broker lacks."""
    if not api.vhost_exists():
        raise DataSpaceConfigurationError(
            f"no vhost {api.vhost!r} on the broker at {api.url} (check --url)"
        )


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _queue_order(name: str) -> tuple:
    return (SERVICE_QUEUES.index(name) if name in SERVICE_QUEUES else len(SERVICE_QUEUES), name)


def _active_consumer(api: ManagementClient, name: str) -> dict | None:
    """The single active consumer of a queue, as the management API tells it."""
    try:
        details = api.queue(name).get("consumer_details") or []
    except ManagementNotFoundError:
        return None
    for consumer in details:
        if consumer.get("activity_status") == "single_active":
            channel = consumer.get("channel_details") or {}
            connection = channel.get("connection_name")
            found = {
                "consumer_tag": consumer.get("consumer_tag"),
                "connection": connection,
                "channel": channel.get("name"),
                "peer": f"{channel.get('peer_host')}:{channel.get('peer_port')}",
                "name": None,
            }
            if connection:
                try:
                    info = api.connection(connection)
                    client = info.get("client_properties") or {}
                    found["name"] = info.get("user_provided_name") or client.get("connection_name")
                except ManagementError:
                    pass  # gone since, or no right to see it: the tag and peer will do
            return found
    return None


def _schedule(api: ManagementClient) -> dict | None:
    """The pending scheduled reap, peeked (and requeued) from the schedule queue."""
    try:
        messages = api.peek(SCHEDULE_QUEUE, 1, truncate=1000)
    except ManagementNotFoundError:
        return None
    if not messages:
        return None
    message = messages[0]
    props = message.get("properties") or {}
    headers = props.get("headers") or {}
    pending: dict[str, Any] = {
        "next_reap_at": headers.get(NEXT_REAP_HEADER),
        "expiration_ms": props.get("expiration"),
        "published_at": _iso(props.get("timestamp")),
        "days": None,
    }
    if message.get("payload_encoding") == "string":
        try:
            pending["days"] = orjson.loads(message["payload"])["args"]["days"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    return pending


def _collect_status(api: ManagementClient) -> dict:
    try:
        listed = api.queues()
    except (ManagementNotFoundError, ManagementAuthError):
        _raise_if_no_vhost(api)
        raise
    queues = []
    for queue in sorted(listed, key=lambda q: _queue_order(q.get("name", ""))):
        name = queue.get("name", "")
        if not name.startswith("dataspace."):
            continue
        queues.append(
            {
                "name": name,
                "type": queue.get("type"),
                "state": queue.get("state"),
                "messages": queue.get("messages"),
                "messages_ready": queue.get("messages_ready"),
                "messages_unacknowledged": queue.get("messages_unacknowledged"),
                "consumers": queue.get("consumers"),
                "active_consumer": None,
            }
        )
    by_name = {q["name"]: q for q in queues}
    if REAPER_QUEUE in by_name:
        by_name[REAPER_QUEUE]["active_consumer"] = _active_consumer(api, REAPER_QUEUE)
    schedule = _schedule(api) if SCHEDULE_QUEUE in by_name else None
    problems = [
        f"queue {name} is missing (has a worker declared the topology on this vhost?)"
        for name in SERVICE_QUEUES
        if name not in by_name
    ]
    for queue in queues:
        if queue["state"] not in (None, "running"):
            problems.append(f"queue {queue['name']} is {queue['state']}")
    for name, what in ((REQUEST_QUEUE, "requests"), (REAPER_QUEUE, "retention messages")):
        if by_name.get(name, {}).get("consumers") == 0:
            problems.append(f"no consumer on {name}: no worker takes {what}")
    dead = by_name.get(DEAD_LETTER_QUEUE, {}).get("messages")
    return {
        "vhost": api.vhost,
        "management_url": api.url,
        "queues": queues,
        "next_reap": schedule,
        "dead_letters": dead,
        "healthy": not problems,
        "problems": problems,
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _figure(value: Any) -> str:
    return "-" if value is None else str(value)


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


def _print_status(status: dict) -> None:
    _emit(f"vhost {status['vhost']!r}, management API {_safe(status['management_url'])}")
    rows = [("QUEUE", "TYPE", "STATE", "READY", "UNACKED", "CONSUMERS")]
    for q in status["queues"]:
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2])]
        cells += [cell.rjust(width) for cell, width in zip(row[3:], widths[3:])]
        _emit("  ".join(cells).rstrip())
    if any(q["messages_ready"] is None for q in status["queues"]):
        _emit("(-: no statistics from the broker yet; they come every few seconds)")
    reaper = next((q for q in status["queues"] if q["name"] == REAPER_QUEUE), None)
    if reaper is not None:
        active = reaper["active_consumer"]
        if active:
            who = _safe(active["name"] or active["connection"])
            _emit(
                f"active reaper consumer: {who} (peer {_safe(active['peer'])}, "
                f"{_safe(active['consumer_tag'])})"
            )
        elif reaper["consumers"]:
            _emit("active reaper consumer: not reported by the management API")
    pending = status["next_reap"]
    if pending and pending["next_reap_at"]:
        days = pending["days"]
        days = f", task managers older than {days:g} days" if _is_number(days) else ""
        when = _safe(pending["next_reap_at"])
        _emit(f"next scheduled reap: {when}{_in(pending['next_reap_at'])}{days}")
    elif pending:
        _emit("next scheduled reap: a run is pending (no x-dataspace-next-reap-at header)")
    else:
        _emit("next scheduled reap: none pending (retention_days 0, or not armed yet)")
    dead = status["dead_letters"]
    if dead is None:
        _emit("dead letters: unknown (no statistics yet)")
    else:
        _emit(f"dead letters: {dead}" + (" (dataspace dead list)" if dead else ""))
    if status["problems"]:
        _emit("UNHEALTHY:")
        for problem in status["problems"]:
            _emit(f"  - {_safe(problem)}")
    else:
        _emit("healthy")


def _status(args) -> int:
    status = _collect_status(_management(args))
    if args.json:
        _emit(orjson.dumps(status).decode())
    else:
        _print_status(status)
    return 0 if status["healthy"] else 1


# -- dead letters --------------------------------------------------------------------
def _first_death(headers: dict) -> dict:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _original_routing_key(headers: dict) -> str | None:
    key = _text(headers.get("x-original-routing-key"))
    if key:
        return key
    keys = _first_death(headers).get("routing-keys")
    if isinstance(keys, list) and keys:
        return _text(keys[0]) or None
    return None


def _preview(message: dict) -> str:
    payload = message.get("payload") or ""
    if message.get("payload_encoding") == "base64":
        try:
            text = repr(base64.b64decode(payload))
        except ValueError:
            text = payload
    else:
        text = payload
    text = _safe(" ".join(text.split()))
    if len(text) > PREVIEW_CHARS or (message.get("payload_bytes") or 0) > len(payload):
        return text[:PREVIEW_CHARS] + "..."
    return text


def _dead_entry(message: dict) -> dict:
    props = message.get("properties") or {}
    headers = props.get("headers") or {}
    death = _first_death(headers)
    routing_key = _original_routing_key(headers) or message.get("routing_key")
    reason = headers.get("x-dataspace-reason")
    by = headers.get("x-dead-lettered-by")
    when = headers.get("x-dead-lettered-at")
    if reason is None and death:
        reason = death.get("reason")
        if death.get("queue"):
            reason = f"{reason} (queue {death['queue']}, count {death.get('count')})"
        by = "broker"
        when = death.get("time")
    return {
        "message_id": props.get("message_id"),
        "operation": props.get("type") or routing_key,
        "type": props.get("type"),
        "routing_key": routing_key,
        "code": headers.get("x-dataspace-error-code")
        or (f"x-death:{death.get('reason')}" if death else None),
        "reason": reason,
        "dead_lettered_by": by,
        "time": _iso(when if when is not None else props.get("timestamp")),
        "size": message.get("payload_bytes"),
        "content_type": props.get("content_type"),
        "app_id": props.get("app_id"),
        "preview": _preview(message),
    }


def _dead_list(args) -> int:
    api = _management(args)
    try:
        messages = api.peek(DEAD_LETTER_QUEUE, args.limit, truncate=4 * PREVIEW_CHARS)
    except (ManagementNotFoundError, ManagementAuthError) as exc:
        _raise_if_no_vhost(api)
        if isinstance(exc, ManagementAuthError):
            raise
        raise DataSpaceConfigurationError(
            f"no queue {DEAD_LETTER_QUEUE} in vhost {api.vhost!r} at {api.url} "
            "(wrong vhost in --url, or no worker has declared the topology)"
        ) from None
    # message_count: what was left in the queue after the last message got
    total = len(messages) + ((messages[-1].get("message_count") or 0) if messages else 0)
    entries = [_dead_entry(m) for m in messages]
    if args.message_id:
        wanted = set(args.message_id)
        entries = [e for e in entries if e["message_id"] in wanted]
    if args.json:
        out = {"vhost": api.vhost, "total": total, "examined": len(messages), "messages": entries}
        _emit(orjson.dumps(out).decode())
        return 0
    for e in entries:
        _emit(
            f"{_safe(e['message_id'] or '-')}  {_safe(e['operation'] or '-')}  "
            f"{_safe(e['code'] or '-')}  {_safe(e['time'] or '-')}  {_safe(e['size'])} bytes"
        )
        _emit(f"    reason: {_safe(e['reason'] or '-')}")
        _emit(f"    body:   {_safe(e['preview'])}")
    shown = f"{len(entries)} shown" + (
        f" (of the first {len(messages)})" if len(entries) != len(messages) else ""
    )
    _emit(f"{shown}; {total} dead letter(s) in {DEAD_LETTER_QUEUE} of vhost {api.vhost!r}")
    return 0


def _replay_properties(props) -> pika.BasicProperties:
    headers = {
        k: v
        for k, v in (props.headers or {}).items()
        if k not in DEAD_LETTER_HEADERS and not k.startswith(DEAD_LETTER_HEADER_PREFIXES)
    }
    return pika.BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers or None,
        delivery_mode=props.delivery_mode or pika.DeliveryMode.Persistent,
        priority=props.priority,
        correlation_id=props.correlation_id,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.type,
        app_id=props.app_id,
        cluster_id=props.cluster_id,
    )


def _confirm(question: str) -> bool:
    try:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        interactive = False
    if not interactive:
        return True
    sys.stderr.write(f"{_safe(question)} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _dead_replay(args) -> int:
    timeout = _timeout(args)
    masked = mask_password(args.url)
    vhost = vhost_of(args.url)
    params = BrokerAddresses(args.url, lambda _params: None).current  # checked by main
    params.connection_attempts = 1
    params.socket_timeout = min(timeout, 10.0)
    params.blocked_connection_timeout = timeout
    params.client_properties = {"connection_name": f"{CREATOR} dead replay"}
    try:
        connection = pika.BlockingConnection(params)
    except (ProbableAccessDeniedError, ProbableAuthenticationError) as exc:
        raise DataSpaceConfigurationError(
            f"the broker at {masked} refused the login or the vhost: {_reason(exc)}"
        ) from None
    except AMQPConnectionError as exc:
        raise DataSpaceConnectionError(
            f"cannot reach the broker at {masked}: {_reason(exc)}"
        ) from None
    replayed = skipped = 0
    held: list[int] = []
    try:
        channel = connection.channel()
        try:
            present = channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count
        except AMQPChannelError:
            raise DataSpaceConfigurationError(
                f"no queue {DEAD_LETTER_QUEUE} in vhost {vhost!r} (wrong vhost in --url, or "
                "no worker has declared the topology)"
            ) from None
        channel.confirm_delivery()
        count = present if args.limit is None else min(args.limit, present)
        if count == 0:
            _emit("replayed 0, skipped 0 (no dead letters)")
            return 0
        which = "those with the message_id(s) given among " if args.message_id else ""
        if not args.yes and not _confirm(
            f"replay {which}the first {count} of {present} dead letter(s) of vhost {vhost!r} "
            f"to exchange {EXCHANGE!r}?"
        ):
            _emit("not replayed: answered no", file=sys.stderr)
            return 1
        wanted = set(args.message_id or ())
        failed = None
        # At most the messages there at the start: one that fails again and comes back
        # to the tail of the queue is not replayed twice in one run.
        with tqdm(total=count, file=sys.stderr, unit="msg", desc="replaying", disable=None) as bar:
            for _ in range(count):
                method, props, body = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
                if method is None:
                    break
                bar.update(1)
                headers = props.headers or {}
                if wanted and props.message_id not in wanted:
                    held.append(method.delivery_tag)
                    skipped += 1
                    continue
                if "x-dataspace-body-size" in headers:  # kept cut: not the request any more
                    tqdm.write(
                        f"skipped {_safe(props.message_id or '-')}: its body was cut to "
                        f"{len(body)} of {_safe(headers['x-dataspace-body-size'])} bytes when "
                        "it was dead-lettered; ask its sender to send it again",
                        file=sys.stderr,
                    )
                    held.append(method.delivery_tag)
                    skipped += 1
                    continue
                routing_key = _original_routing_key(headers)
                if not routing_key:
                    tqdm.write(
                        f"skipped {_safe(props.message_id or '-')}: no x-original-routing-key "
                        "or x-death routing key",
                        file=sys.stderr,
                    )
                    held.append(method.delivery_tag)
                    skipped += 1
                    continue
                try:
                    channel.basic_publish(
                        EXCHANGE, routing_key, body, _replay_properties(props), mandatory=True
                    )
                except (UnroutableError, NackError) as exc:
                    held.append(method.delivery_tag)
                    failed = (
                        f"the broker refused the copy of {_safe(props.message_id or '-')} "
                        f"(routing key {_safe(routing_key)}): {type(exc).__name__}; it stays dead"
                    )
                    break
                channel.basic_ack(method.delivery_tag)
                replayed += 1
        for tag in held:
            channel.basic_nack(tag, requeue=True)
        _emit(f"replayed {replayed}, skipped {skipped}")
        if failed:
            _error(failed)
            return 1
        return 0
    except AMQPChannelError as exc:
        _error(f"the broker closed the channel: {exc}; unconfirmed dead letters stay")
        _emit(f"replayed {replayed}, skipped {skipped}")
        return 1
    except AMQPConnectionError as exc:
        _emit(f"replayed {replayed}, skipped {skipped}")
        raise DataSpaceConnectionError(
            f"lost the broker at {masked}: {_reason(exc)}; unconfirmed dead letters stay"
        ) from None
    finally:
        if connection.is_open:
            try:
                connection.close()
            except AMQPConnectionError:
                pass


# -- products ------------------------------------------------------------------------
def _is_json(value: Any) -> bool:
    """Plain JSON data: printing it as JSON loses nothing."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _get(args) -> int:
    source = _source(args)
    try:
        stored = source.get_dataproduct(args.tm_seq, args.generation, args.key)
    except KeyError as exc:
        _error(f"not found: {exc.args[0] if exc.args else exc}")
        return 4
    finally:
        source.close()
    try:
        value = decode_value(stored, allow_pickle=args.allow_pickle)
    except PickleRefusedError:
        _error(
            "the product is pickled; pass --allow-pickle to unpickle it (which runs code "
            "chosen by whoever wrote it)"
        )
        return 1
    except ValueTooLargeError as exc:  # a bomb, or a product larger than this reader allows
        _error(f"get: {exc}")
        return 1
    except DataSpaceError:
        _emit(
            f"dataspace: not in DataBlock format: {len(stored)} raw bytes",
            file=sys.stderr,
        )
        _emit(stored.hex() if args.hex else repr(stored))
        return 0
    if _is_json(value):
        _emit(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    else:
        _emit(pprint.pformat(value, sort_dicts=False))
    return 0


def _put(args) -> int:
    from .datablock import Header, Metadata

    text = sys.stdin.read() if args.value == "-" else args.value
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _error(f"put: VALUE is not JSON: {exc}")
        return 2
    if not isinstance(value, dict):
        _error(
            f"put: VALUE must be a JSON object, e.g. '{{\"cpus\": 4}}', not {type(value).__name__}"
        )
        return 2
    stored = encode_value(value, allow_pickle=False)
    header = Header(args.tm_seq, creator=CREATOR)
    metadata = Metadata(args.tm_seq, state="NEW", generation_id=args.generation)
    source = _source(args)
    try:
        try:
            source.insert(args.tm_seq, args.generation, args.key, stored, header, metadata)
            done = "inserted"
        except DataSpaceExistsError:
            source.update(args.tm_seq, args.generation, args.key, stored, header, metadata)
            done = "updated"
    except KeyError as exc:
        _error(f"not found: {exc.args[0] if exc.args else exc}")
        return 4
    finally:
        source.close()
    _emit(
        f"{done} product {args.key!r} of task manager {args.tm_seq}, generation "
        f"{args.generation} ({len(stored)} bytes stored)"
    )
    return 0


COMMANDS = {
    "status": _status,
    "get": _get,
    "put": _put,
    "reap": _reap,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dead":
        command = _dead_list if args.dead_command == "list" else _dead_replay
    else:
        command = COMMANDS[args.command]
    started = time.monotonic()
    try:
        # a URL that cannot be used is said once, without its password, for every command
        BrokerAddresses(args.url, lambda _params: None)
    except ValueError as exc:
        _error(str(exc))
        return 2
    try:
        return command(args)
    except DataSpaceConfigurationError as exc:
        _error(str(exc))
        return 2
    except (DataSpaceConnectionError, DataSpaceTimeoutError) as exc:
        _error(str(exc))
        return 3
    except (DataSpaceError, KeyError, ValueError, TypeError) as exc:
        _error(f"{type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        _error(f"interrupted after {time.monotonic() - started:.1f} s")
        return 130
    except BrokenPipeError:  # piped into head, say: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
