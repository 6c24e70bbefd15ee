"""``dataspace``: the operator's command.

    dataspace status [-j]                            # broker, queues, consumers, warnings
    dataspace dead list [-n N] [-j] [FILTERS]        # dead letters, left in place
    dataspace dead replay [-n N] [-y] [FILTERS]      # dead letters back to the workers
    dataspace dead purge [-y] [FILTERS]              # dead letters removed for good
    dataspace dead drop MESSAGE_ID... [-y]           # the named dead letters removed
    dataspace get TM_SEQ GEN KEY [--allow-pickle]    # print one product's value
    dataspace put TM_SEQ GEN KEY '{"cpus": 4}'       # insert or update one product
    dataspace reap --now --days 30 [-j]              # one retention run, through the reaper

FILTERS (on ``dead list``, ``replay`` and ``purge``; each repeatable, a dead letter
must match every option given, any of its values): ``--message-id ID``, ``--code
CODE`` (the error code, or the broker's x-death reason such as ``delivery_limit``),
``--operation OP`` (e.g. ``insert``), ``--reason TEXT`` (a part of the reason, any
case). Options every command takes, before or after its name: ``-u/--url``
(broker URL, env ``DATASPACE_AMQP_URL``), ``--management-url`` (env
``DATASPACE_MANAGEMENT_URL``; default: the broker URL's host and credentials on
port 15672, and its vhost) and ``-t/--timeout`` (seconds; default 600 for
``reap``, 10 for ``status``, 30 otherwise).

Every command first opens an AMQP connection with the broker URL, so that one
cause gets one message and one exit code whatever the command: a refused login
is "authentication refused by the broker at URL (check the user and password)",
exit 2; a refused or silent port is "cannot reach the broker at URL: ...", exit 3.

``status`` counts each queue's ready messages and consumers over AMQP (a passive
queue.declare: exact at that moment) and takes the rest from the RabbitMQ
management API (plugin ``rabbitmq_management``): the queues' type and state, the
unacknowledged counts (statistics, up to 5 s old) and who the consumers are
(about a second behind).

The ``dead`` commands work over AMQP. Each looks at every dead letter (the first
65535: basic.qos counts in 16 bits) through one consumer whose prefetch window
holds them all, unacknowledged, and gives back those it keeps by cancelling it.
Measured on RabbitMQ 3.10.8 (``tests/test_dead_tools.py``), a quorum queue
delivers the messages given back before those never delivered, in the order they
were given back: a cancelled or closed consumer's (or a killed process's) in
their order, so a look at the whole queue leaves it as it was, while a look at
its first N after an earlier look at more moves those N behind the rest. A
basic.nack or basic.reject with requeue moved the message behind the others too,
and messages held by basic.get (what the management API's "Get messages" does)
came back in no particular order once more than a few were held. Whichever way,
every message looked at comes back marked redelivered, its ``x-delivery-count``
raised by one: only ``rabbitmq-queues peek`` on a broker node reads without
that. A message is removed (acked) only once it was matched (``purge``,
``drop``) or its copy was confirmed (``replay``); if the command dies half-way,
the broker gives the rest back, in order.

``dead replay`` publishes each dead letter again to exchange ``dataspace`` with
its original routing key and properties (message_id kept, so a write that did
get applied is not applied twice), without the dead-letter headers and without
``reply_to`` (its sender is gone; a request that fails again is dead-lettered
again rather than answered to nobody).

Exit codes (scripts may rely on them):

    0  done; for ``status``: healthy, nothing to look at
    1  the service failed the request; ``status`` found something unhealthy (a
       queue missing or not running, no consumer on dataspace.requests or
       dataspace.reaper); a dead letter could not be replayed; the operator
       answered no
    2  bad usage or configuration: a bad argument, authentication refused, no
       such vhost or no permission on it, a TLS certificate refused, the
       management API refused the user, no such queue
    3  the broker or the management API could not be reached (connection
       refused, no answer in time)
    4  not found: ``get`` of a product that does not exist, ``put`` into a task
       manager that does not exist, ``dead drop`` of a message_id not there
    5  ``status``: healthy, with warnings (dead letters wait in dataspace.dead)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pprint
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pika
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    AMQPError,
    ChannelClosedByBroker,
    IncompatibleProtocolError,
    NackError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
    StreamLostError,
    UnroutableError,
)
from tqdm import tqdm

from dataspace_core import pika_patches  # noqa: F401  (one bad header must not break the connection)
from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceExistsError,
    DataSpaceTimeoutError,
)
from dataspace_core.protocol import (
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    REAPER_QUEUE,
    REQUEST_QUEUE,
    SCHEDULE_QUEUE,
)
from dataspace_core.urls import BrokerAddresses, causes, mask_password, split_urls, tls_failure

from .. import __version__
from ..management import (
    ManagementAuthError,
    ManagementClient,
    ManagementError,
    ManagementNotFoundError,
    ManagementUnreachableError,
    vhost_of,
)
from ..remote import DEFAULT_URL, RemoteDataSource
from ..values import PickleRefusedError, ValueTooLargeError, decode_value, encode_value

MIN_RETENTION_DAYS = 7
REAP_TIMEOUT = 600.0
DEFAULT_TIMEOUT = 30.0
MANAGEMENT_TIMEOUT = 10.0
#: at most this long to open an AMQP connection (and for its handshake)
CONNECT_TIMEOUT = 10.0
CREATOR = "dataspace-cli"

EXIT_OK = 0
EXIT_FAILED = 1  # the service failed the request; unhealthy; answered no
EXIT_CONFIG = 2  # usage or configuration
EXIT_UNREACHABLE = 3  # broker or management API unreachable, or no answer in time
EXIT_NOT_FOUND = 4
EXIT_WARNINGS = 5  # status: healthy, with warnings

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
#: basic.qos prefetch_count is 16 bits: the most dead letters one consumer can hold
MAX_WINDOW = 65535
#: seconds without a delivery after which the dead letters asked for are not coming
LOOK_IDLE = 2.0
#: seconds to wait, when stopping, for deliveries the broker may still be sending
DRAIN_IDLE = 0.3

REDELIVERY_NOTE = (
    f"Every dead letter (up to {MAX_WINDOW}) is looked at and given back in its place, but "
    "RabbitMQ 3.10 marks each one redelivered and raises its x-delivery-count by one (only "
    "rabbitmq-queues peek on a broker node reads without that)."
)
#: for the other dead commands, which look the same way
LOOKS_NOTE = "It looks at the dead letters as dead list does (see its --help)."
EXIT_CODES = (
    "exit codes: 0 ok, 1 the service failed the request or something is unhealthy,\n"
    "2 usage or configuration (e.g. authentication refused), 3 broker or management API\n"
    "unreachable or timed out, 4 not found, 5 status healthy with warnings, 130 interrupted"
)

EXAMPLES = f"""\
examples:
  dataspace status
  dataspace status -j | jq .warnings
  dataspace dead list -n 20
  dataspace dead list --code not_found --operation update
  dataspace dead replay -y
  dataspace dead purge --reason 'no product' -y
  dataspace dead drop 9f1c2e... 77ab01...
  dataspace get 42 1 resources
  dataspace put 42 1 resources '{{"cpus": 4}}'
  dataspace reap --now --days 30
  DATASPACE_AMQP_URL=amqp://ops:secret@mq:5672/prod dataspace status
  dataspace -u amqp://ops:secret@mq:5672/prod --management-url https://mq-admin.example/ status

{EXIT_CODES}
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; keeps text with line breaks (examples) as it is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


# -- arguments -----------------------------------------------------------------------
def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """-u/--url, --management-url, -t/--timeout: on the main parser with their defaults,
    and on each command (``suppress``) so that they may also follow the command's name."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "-u",
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
        "-t",
        "--timeout",
        type=_positive_float,
        default=default(None),
        help=f"seconds to wait (default {REAP_TIMEOUT:g} for reap, {MANAGEMENT_TIMEOUT:g} for "
        f"status, {DEFAULT_TIMEOUT:g} otherwise)",
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


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--json", action="store_true", help="one JSON object, for machines")


def _filter_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "filters (each repeatable; a dead letter must match every option given)"
    )
    group.add_argument("--message-id", action="append", metavar="ID", help="this message_id")
    group.add_argument(
        "--code",
        action="append",
        metavar="CODE",
        help="this error code (e.g. not_found, bad_request) or x-death reason (delivery_limit)",
    )
    group.add_argument(
        "--operation", action="append", metavar="OP", help="this operation (e.g. insert)"
    )
    group.add_argument(
        "--reason", action="append", metavar="TEXT", help="a reason holding TEXT (any case)"
    )


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
        help="broker, queues, consumers, the next scheduled reap, warnings",
        description="Check the broker URL (an AMQP connection) and show each dataspace.* "
        "queue of the vhost: messages ready and consumers (asked of the queue now), "
        "unacknowledged (management statistics, up to 5 s old), each consumer's connection "
        "name and tag (management API, about a second behind), the next scheduled reap. "
        "Dead letters waiting are a warning.",
        epilog="exit codes:\n  0 healthy\n  1 unhealthy (a queue missing or not running, no "
        "consumer on dataspace.requests or dataspace.reaper)\n  2 configuration "
        "(authentication refused, no such vhost)\n  3 broker or management API unreachable\n"
        "  5 healthy with warnings (dead letters waiting)\n\n"
        "examples:\n  dataspace status\n  dataspace status -j | jq .warnings\n"
        "  dataspace status --management-url http://mq:15672/",
        formatter_class=_Formatter,
        parents=common,
    )
    _json_option(status)

    dead = commands.add_parser(
        "dead",
        help="list, replay, purge or drop the dead letters (queue dataspace.dead)",
        description="Requests the workers could not handle wait in queue dataspace.dead "
        "with the reason in their headers.",
        epilog="examples:\n  dataspace dead list\n  dataspace dead replay -y\n"
        "  dataspace dead purge --code bad_request\n  dataspace dead drop 9f1c2e...",
        formatter_class=_Formatter,
    )
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="COMMAND")
    dead_list = dead_commands.add_parser(
        "list",
        help="show dead letters without removing them",
        description="Show dead letters, oldest first, without removing them: message_id, "
        "operation, error code, when (ISO 8601, UTC), size; the reason; a preview of the "
        f"body. {REDELIVERY_NOTE}",
        epilog="examples:\n  dataspace dead list\n  dataspace dead list -n 500 -j\n"
        "  dataspace dead list --code not_found --operation update\n"
        "  dataspace dead list --reason 'not valid JSON'",
        formatter_class=_Formatter,
        parents=common,
    )
    dead_list.add_argument(
        "-n",
        "--limit",
        type=_positive_int,
        default=50,
        help="show the first N (default 50) of those matching",
    )
    _json_option(dead_list)
    _filter_options(dead_list)

    replay = dead_commands.add_parser(
        "replay",
        help="publish dead letters again to the workers",
        description="Move dead letters back to exchange dataspace with their original "
        "routing key (header x-original-routing-key, else the x-death routing key), "
        "message_id (the idempotency key) and properties, without reply_to and the "
        "dead-letter headers. Each is removed from dataspace.dead once the broker confirmed "
        "its copy; those skipped or not matching stay, in order. A request that fails again "
        "is dead-lettered again. Asks first, unless -y or stdin is not a terminal. On a "
        "terminal, shows its progress. " + LOOKS_NOTE,
        epilog="examples:\n  dataspace dead replay\n  dataspace dead replay -n 10 -y\n"
        "  dataspace dead replay --code unavailable -y\n"
        "  dataspace dead replay --message-id 9f1c2e... -y",
        formatter_class=_Formatter,
        parents=common,
    )
    replay.add_argument(
        "-n",
        "--limit",
        type=_positive_int,
        default=None,
        help="replay the first N of those matching (default all there when it starts)",
    )
    replay.add_argument("-y", "--yes", action="store_true", help="do not ask")
    _filter_options(replay)

    purge = dead_commands.add_parser(
        "purge",
        help="remove dead letters for good: all, or those matching filters",
        description="Without filters: empty dataspace.dead (queue.purge). With filters: "
        "remove the dead letters that match and give the others back in order. Asks first, "
        "saying how many; without a terminal to ask on, needs -y. " + LOOKS_NOTE,
        epilog="examples:\n  dataspace dead purge\n  dataspace dead purge -y\n"
        "  dataspace dead purge --code bad_request --operation insert -y\n"
        "  dataspace dead purge --reason 'no product'",
        formatter_class=_Formatter,
        parents=common,
    )
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask")
    _filter_options(purge)

    drop = dead_commands.add_parser(
        "drop",
        help="remove the dead letters with these message_ids",
        description="Remove the dead letters whose message_id is given (every one with "
        "that id); the others stay, in order. Exit 4 if an id is not there. Asks first; "
        "without a terminal to ask on, needs -y. " + LOOKS_NOTE,
        epilog="examples:\n  dataspace dead drop 9f1c2e...\n"
        "  dataspace dead drop 9f1c2e... 77ab01... -y",
        formatter_class=_Formatter,
        parents=common,
    )
    drop.add_argument("message_ids", metavar="MESSAGE_ID", nargs="+", help="a message_id")
    drop.add_argument("-y", "--yes", action="store_true", help="do not ask")

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
        "removed (one line, or one JSON object with -j). Only one reap runs at a time across "
        "all workers. On a terminal, shows the time elapsed while it runs.",
        epilog="examples:\n  dataspace reap --now --days 30\n  dataspace reap --now --days 30 -j",
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
    _json_option(reap)
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
            "connect_timeout": min(timeout, CONNECT_TIMEOUT),
            "app_id": CREATOR,
        }
    )


def _vhost(args) -> str:
    """The vhost the commands work on: that of the (first) broker URL."""
    return vhost_of(split_urls(args.url)[0])


def _management(args) -> ManagementClient:
    return ManagementClient.for_broker(
        args.url, args.management_url, timeout=_timeout(args, MANAGEMENT_TIMEOUT)
    )


# -- output --------------------------------------------------------------------------
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


# -- the AMQP connection -------------------------------------------------------------
def _connection_problem(exc: BaseException, url: str, seconds: float) -> tuple[str, bool]:
    """``(one line saying what happened and what to do, is it configuration)`` for a
    failed AMQP connection to ``url``. The same cause gets the same words in every
    command; "cannot reach" is kept for a port refused or silent."""
    masked = mask_password(url)
    parts = urlsplit(url)
    vhost = vhost_of(url)
    if isinstance(exc, ProbableAuthenticationError):
        return (
            f"authentication refused by the broker at {masked} (check the user and password)",
            True,
        )
    if isinstance(exc, ProbableAccessDeniedError):
        if "not found" in str(exc):
            return (
                f"no vhost {vhost!r} on the broker at {masked} (check the vhost at the end "
                "of the URL)",
                True,
            )
        user = unquote(parts.username or "guest")
        return (
            f"user {user!r} may not use vhost {vhost!r} on the broker at {masked} (grant it "
            "permissions there, e.g. rabbitmqctl set_permissions)",
            True,
        )
    tls = tls_failure(exc)
    if tls is not None:
        return f"cannot connect to the broker at {masked}: {tls[0]}", tls[1]
    port = parts.port or (5671 if parts.scheme.lower() == "amqps" else 5672)
    for cause in causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return (
                f"cannot reach the broker at {masked}: connection refused (is RabbitMQ "
                f"running and listening on port {port}?)",
                False,
            )
        if isinstance(cause, (TimeoutError, socket.timeout)) or "Timeout during AMQP" in str(cause):
            return (
                f"cannot reach the broker at {masked}: no answer within {seconds:g} s (check "
                "the host, the port and firewalls; -t to wait longer)",
                False,
            )
        if isinstance(cause, socket.gaierror):
            return (
                f"the broker host {parts.hostname!r} of {masked} is not known (check the "
                "host name)",
                True,
            )
        if isinstance(cause, (IncompatibleProtocolError, StreamLostError)):
            return (
                f"the broker at {masked} closed the connection during the AMQP handshake "
                f"(is port {port} RabbitMQ's AMQP port? is it starting? see its log)",
                False,
            )
    return f"connecting to the broker at {masked} failed: {_reason(exc)}", False


def _connect(
    args, purpose: str, default_timeout: float = DEFAULT_TIMEOUT
) -> tuple[pika.BlockingConnection, list[str]]:
    """A connection to the first of the broker URLs that takes one, and a line for each
    URL before it that did not. Raises DataSpaceConfigurationError (exit 2) for a
    refusal retrying cannot cure (credentials, vhost, certificate), else
    DataSpaceConnectionError (exit 3) when none could be reached."""
    timeout = _timeout(args, default_timeout)
    seconds = min(timeout, CONNECT_TIMEOUT)

    def configure(params) -> None:
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = seconds
        params.stack_timeout = seconds
        params.blocked_connection_timeout = timeout
        params.client_properties = {
            "connection_name": f"{CREATOR} {purpose} on {socket.gethostname()} pid {os.getpid()}"
        }

    addresses = BrokerAddresses(args.url, configure)  # checked by main
    failures: list[str] = []
    for url, params in zip(addresses.urls, addresses.params):
        try:
            return pika.BlockingConnection(params), failures
        except Exception as exc:  # pika raises errors of no common base here
            text, configuration = _connection_problem(exc, url, seconds)
            if configuration:
                raise DataSpaceConfigurationError(text) from None
            failures.append(text)
    raise DataSpaceConnectionError("; ".join(failures))


def _check_broker(args, default_timeout: float = DEFAULT_TIMEOUT) -> None:
    """Open and close an AMQP connection: a wrong password or a closed port is then
    said the same way by every command, before the client library tries."""
    connection, _ = _connect(args, "check", default_timeout)
    _close(connection)


def _close(connection) -> None:
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except AMQPError:
            pass


# -- reap ----------------------------------------------------------------------------
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


# -- status --------------------------------------------------------------------------
def _raise_if_no_vhost(api: ManagementClient) -> None:
    """After a 401/404: say so plainly if the cause is a vhost the broker lacks."""
    if not api.vhost_exists():
        raise DataSpaceConfigurationError(
            f"no vhost {api.vhost!r} on the broker at {api.url} (check the vhost at the end "
            "of the URL)"
        )


def _queue_order(name: str) -> tuple:
    return (SERVICE_QUEUES.index(name) if name in SERVICE_QUEUES else len(SERVICE_QUEUES), name)


def _fresh_figures(connection, names: list[str]) -> dict[str, tuple[int, int] | None]:
    """``{queue: (messages ready, consumers)}`` asked of each queue now (passive
    queue.declare), None for a queue that is not there; a queue this account may not
    ask about (or held exclusively by another connection) is left out."""
    figures: dict[str, tuple[int, int] | None] = {}
    channel = None
    for name in names:
        try:
            if channel is None or not channel.is_open:
                channel = connection.channel()
            ok = channel.queue_declare(name, passive=True).method
            figures[name] = (ok.message_count, ok.consumer_count)
        except ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                figures[name] = None
        except AMQPError:
            break  # the connection went: the management API's figures will do
    if channel is not None and channel.is_open:
        try:
            channel.close()
        except AMQPError:
            pass
    return figures


def _consumers(api: ManagementClient) -> dict[str, list[dict]]:
    """Each queue's consumers with the name their connection gave itself
    (client_properties.connection_name), from the management API; empty where it
    does not tell (an account that sees only its own connections)."""
    try:
        listed = api.consumers()
    except ManagementError:
        return {}
    try:
        connections = {
            c.get("name"): c.get("user_provided_name")
            or (c.get("client_properties") or {}).get("connection_name")
            for c in api.connections()
        }
    except ManagementError:
        connections = {}
    found: dict[str, list[dict]] = {}
    for consumer in listed or []:
        channel = consumer.get("channel_details") or {}
        connection = channel.get("connection_name")
        queue = (consumer.get("queue") or {}).get("name")
        found.setdefault(queue, []).append(
            {
                "consumer_tag": consumer.get("consumer_tag"),
                "connection_name": connections.get(connection),
                "connection": connection,
                "channel": channel.get("name"),
                "peer": f"{channel.get('peer_host')}:{channel.get('peer_port')}",
                "activity_status": consumer.get("activity_status"),
            }
        )
    for consumers in found.values():
        consumers.sort(key=lambda c: (str(c["connection_name"]), str(c["consumer_tag"])))
    return found


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


def _collect_status(api: ManagementClient, connection) -> dict:
    try:
        listed = api.queues()
    except (ManagementNotFoundError, ManagementAuthError):
        _raise_if_no_vhost(api)
        raise
    by_api = {q["name"]: q for q in listed if str(q.get("name", "")).startswith("dataspace.")}
    # the service's queues are asked for even when the API does not list them (yet)
    names = sorted(set(by_api) | set(SERVICE_QUEUES), key=_queue_order)
    fresh = _fresh_figures(connection, names) if connection is not None else {}
    consumers = _consumers(api)
    queues = []
    for name in names:
        queue = by_api.get(name, {})
        figures = fresh.get(name)
        if figures is None and (name in fresh or not queue):
            continue  # not there (deleted since the API listed it, or never declared)
        ready, count = figures if figures else (queue.get("messages_ready"), queue.get("consumers"))
        details = consumers.get(name, [])
        active = next((c for c in details if c["activity_status"] == "single_active"), None)
        queues.append(
            {
                "name": name,
                "type": queue.get("type"),
                "state": queue.get("state"),
                "messages": queue.get("messages"),
                "messages_ready": ready,
                "messages_unacknowledged": queue.get("messages_unacknowledged"),
                "consumers": count,
                "fresh": figures is not None,
                "consumer_details": details,
                "active_consumer": None
                if active is None
                else {
                    "consumer_tag": active["consumer_tag"],
                    "connection": active["connection"],
                    "channel": active["channel"],
                    "peer": active["peer"],
                    "name": active["connection_name"],
                },
            }
        )
    by_name = {q["name"]: q for q in queues}
    schedule = _schedule(api) if SCHEDULE_QUEUE in by_name else None
    problems = [
        f"queue {name} is missing: start a dataspace-worker on this vhost (it declares the "
        "topology), or check the vhost in the URL"
        for name in SERVICE_QUEUES
        if name not in by_name
    ]
    for queue in queues:
        if queue["state"] not in (None, "running"):
            problems.append(
                f"queue {queue['name']} is {queue['state']}: see the broker's log "
                "(rabbitmq-queues quorum_status for a quorum queue)"
            )
    for name, what in ((REQUEST_QUEUE, "requests"), (REAPER_QUEUE, "retention messages")):
        if by_name.get(name, {}).get("consumers") == 0:
            problems.append(
                f"no consumer on {name}: no worker takes {what}; start dataspace-worker"
            )
    dead = by_name.get(DEAD_LETTER_QUEUE, {}).get("messages_ready")
    warnings = []
    if dead:
        warnings.append(
            f"{dead} dead letter(s) wait in {DEAD_LETTER_QUEUE}: look at them with "
            "'dataspace dead list', then replay, purge or drop them"
        )
    return {
        "vhost": api.vhost,
        "management_url": api.url,
        "queues": queues,
        "next_reap": schedule,
        "dead_letters": dead,
        "problems": problems,
        "warnings": warnings,
    }


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
    _table(rows, 3)
    if all(q["fresh"] for q in status["queues"]):
        _emit(
            "(READY and CONSUMERS: now; STATE and UNACKED: management statistics, up to 5 s "
            "old, -: none yet)"
        )
    else:
        _emit("(figures from the management statistics, up to 5 s old; -: none yet)")
    listed = [(q["name"], c) for q in status["queues"] for c in q["consumer_details"]]
    if listed:
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
            _emit("active reaper consumer: not reported by the management API yet")
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
    if status["warnings"]:
        _emit("WARNINGS:")
        for warning in status["warnings"]:
            _emit(f"  - {_safe(warning)}")
    if status["problems"]:
        _emit("UNHEALTHY:")
        for problem in status["problems"]:
            _emit(f"  - {_safe(problem)}")
    elif status["warnings"]:
        _emit(f"healthy, with {len(status['warnings'])} warning(s)")
    else:
        _emit("healthy")


def _status(args) -> int:
    masked = mask_password(args.url)
    api = _management(args)  # a management URL that cannot be used: exit 2 before anything
    unreachable = None
    connection = None
    skipped: list[str] = []
    try:
        connection, skipped = _connect(args, "status", MANAGEMENT_TIMEOUT)
    except DataSpaceConfigurationError:
        raise  # authentication refused, no vhost, ...: one line, exit 2
    except DataSpaceConnectionError as exc:
        unreachable = str(exc)  # the management API may still tell the rest
    try:
        status = _collect_status(api, connection)
    except ManagementUnreachableError:
        if unreachable:
            _error(unreachable)
        raise
    finally:
        _close(connection)
    status["amqp"] = {"url": masked, "connected": unreachable is None, "problem": unreachable}
    if unreachable:
        status["problems"].insert(0, unreachable)
    status["warnings"][:0] = [f"{text} (another broker URL answered)" for text in skipped]
    status["healthy"] = not status["problems"]
    if unreachable:
        status["state"], code = "unreachable", EXIT_UNREACHABLE
    elif status["problems"]:
        status["state"], code = "unhealthy", EXIT_FAILED
    elif status["warnings"]:
        status["state"], code = "warnings", EXIT_WARNINGS
    else:
        status["state"], code = "healthy", EXIT_OK
    if args.json:
        _emit(orjson.dumps(status).decode())
    else:
        _print_status(status)
    return code


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


def _preview(body: bytes) -> str:
    """The start of a body on one line: as text when it is UTF-8, else a bytes literal."""
    head = body[: 4 * PREVIEW_CHARS]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        cut_in_a_character = len(body) > len(head) and exc.start >= len(head) - 3
        text = head[: exc.start].decode("utf-8") if cut_in_a_character else repr(head)
    text = _safe(" ".join(text.split()))
    if len(text) > PREVIEW_CHARS or len(body) > len(head):
        return text[:PREVIEW_CHARS] + "..."
    return text


def _dead_entry(method, props, body: bytes) -> dict:
    headers = props.headers or {}
    death = _first_death(headers)
    routing_key = _original_routing_key(headers) or method.routing_key
    reason = _text(headers.get("x-dataspace-reason"))
    by = _text(headers.get("x-dead-lettered-by"))
    when = headers.get("x-dead-lettered-at")
    code = _text(headers.get("x-dataspace-error-code"))
    if reason is None and death:
        reason = _text(death.get("reason"))
        if death.get("queue"):
            reason = f"{reason} (queue {_text(death['queue'])}, count {death.get('count')})"
        by = "broker"
        when = death.get("time")
    if code is None and death:
        code = f"x-death:{_text(death.get('reason'))}"
    return {
        "message_id": props.message_id,
        "operation": props.type or routing_key,
        "type": props.type,
        "routing_key": routing_key,
        "code": code,
        "reason": reason,
        "dead_lettered_by": by,
        "time": _iso(when if when is not None else props.timestamp),
        "size": len(body),
        "content_type": props.content_type,
        "app_id": props.app_id,
        "preview": _preview(body),
        "redelivered": bool(method.redelivered),
        "delivery_count": headers.get("x-delivery-count"),
    }


def _filtering(args) -> bool:
    return any(getattr(args, name, None) for name in ("message_id", "code", "operation", "reason"))


def _selected(entry: dict, args) -> bool:
    """Whether a dead letter matches every filter given (any of each one's values)."""
    if args.message_id and entry["message_id"] not in args.message_id:
        return False
    if args.code:
        code = entry["code"] or ""
        if code not in args.code and code.removeprefix("x-death:") not in args.code:
            return False
    if args.operation:
        key = entry["routing_key"] or ""
        names = {entry["type"], key, key.rpartition(".")[2]}
        if not names & set(args.operation):
            return False
    if args.reason:
        reason = (entry["reason"] or "").casefold()
        if not any(part.casefold() in reason for part in args.reason):
            return False
    return True


def _described(args) -> str:
    """The filters given, for a question or a summary."""
    parts = [
        f"{flag} {' or '.join(repr(v) for v in values)}"
        for flag, values in (
            ("message_id", args.message_id),
            ("code", args.code),
            ("operation", args.operation),
            ("reason holding", args.reason),
        )
        if values
    ]
    return " and ".join(parts)


def _dead_connection(args, purpose: str) -> tuple[pika.BlockingConnection, int]:
    """A connection, and how many dead letters wait (asked of the queue now)."""
    connection, _ = _connect(args, f"dead {purpose}")
    try:
        channel = connection.channel()
        present = channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count
        channel.close()
    except ChannelClosedByBroker as exc:
        _close(connection)
        if exc.reply_code == 404:
            raise DataSpaceConfigurationError(
                f"no queue {DEAD_LETTER_QUEUE} in vhost {_vhost(args)!r} at "
                f"{mask_password(args.url)} (check the vhost in the URL, or start a "
                "dataspace-worker there: it declares the topology)"
            ) from None
        raise DataSpaceConfigurationError(
            f"the broker refused to show {DEAD_LETTER_QUEUE}: {exc.reply_code} "
            f"{exc.reply_text} (this account needs read permission on it)"
        ) from None
    except BaseException:
        _close(connection)
        raise
    return connection, present


class _DeadLetters:
    """Every dead letter there (the first ``MAX_WINDOW``), in queue order, through one
    consumer whose prefetch window holds them all, unacknowledged.

    Why all of them, through a consumer (measured on RabbitMQ 3.10.8, module
    docstring): a quorum queue delivers what was given back before what was never
    delivered, in the order it was given back, and a consumer gives back what it
    holds in its order; so a look at the whole queue leaves it as it was, where a
    look at a part of it could move that part behind the rest. pika rejects (which
    moves a message behind the others) whatever it received and did not hand over
    when a consumer is cancelled, so before cancelling, ``close`` takes every
    delivery the broker may still send: one more for each ack made while looking.
    The queue takes back what a closed channel held a moment after the close: ``close``
    waits for that (briefly), so that the next command finds them all there.
    """

    def __init__(self, connection, present: int):
        self.connection = connection
        self.channel = connection.channel()
        self.count = present
        self.window = max(1, min(present, MAX_WINDOW))
        self.delivered = 0
        self.acked = 0
        self.channel.basic_qos(prefetch_count=self.window)

    def __iter__(self):
        seen = 0
        if self.count < 1:
            return
        for method, props, body in self.channel.consume(
            DEAD_LETTER_QUEUE, inactivity_timeout=LOOK_IDLE
        ):
            if method is None:  # fewer there than counted (gone meanwhile), or a full window
                return
            self.delivered += 1
            seen += 1
            yield method, props, body
            if seen >= self.count:
                return

    def ack(self, tag: int) -> None:
        self.channel.basic_ack(tag)
        self.acked += 1

    def close(self, remove: list[int] = ()) -> None:
        """Stop looking, remove (ack) ``remove``, give every other one back in order.
        On an error the connection's end gives them back the same way."""
        if not self.channel.is_open:
            return
        try:
            if self.delivered and self.delivered - self.acked < self.window:
                for method, _props, _body in self.channel.consume(
                    DEAD_LETTER_QUEUE, inactivity_timeout=DRAIN_IDLE
                ):
                    if method is None:
                        break
                    self.delivered += 1
                    if self.delivered - self.acked >= self.window:
                        break
            if self.count >= 1:  # a consumer was started
                self.channel.cancel()
            for tag in remove:
                self.ack(tag)
            self.channel.close()
            if self.delivered > self.acked:
                _wait_for_ready(self.connection, self.count - self.acked)
        except AMQPError:
            pass  # the connection went: the broker gives back what was not acked


def _wait_for_ready(connection, expected: int, timeout: float = 3.0) -> None:
    """Until dataspace.dead has ``expected`` messages ready again (or ``timeout``)."""
    channel = connection.channel()
    deadline = time.monotonic() + timeout
    while channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count < expected:
        if time.monotonic() > deadline:
            break
        connection.sleep(0.05)
    channel.close()


def _looked_at(seen: int, present: int) -> str:
    """What a summary adds when not every dead letter could be looked at."""
    if seen >= present:
        return ""
    return f" (looked at the first {seen} of {present}: at most {MAX_WINDOW} at a time)"


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


def _must_ask_first(args, what: str) -> int | None:
    """For a command that removes dead letters: exit 2 when it could neither ask nor
    was told -y."""
    if args.yes or _terminal(sys.stdin):
        return None
    _error(f"{what} removes dead letters for good: pass -y (there is no terminal to ask on)")
    return EXIT_CONFIG


def _dead_replay(args) -> int:
    connection, present = _dead_connection(args, "replay")
    vhost = _vhost(args)
    masked = mask_password(args.url)
    tally = {"replayed": 0, "skipped": 0, "left": 0}
    failed = None
    seen = 0
    try:
        if present == 0:
            _emit("replayed 0, skipped 0 (no dead letters)")
            return EXIT_OK
        which = f"those with {_described(args)} among " if _filtering(args) else ""
        most = f"at most {args.limit} of " if args.limit else ""
        if (
            not args.yes
            and _terminal(sys.stdin)
            and not _ask(
                f"replay {most}{which}the {present} dead letter(s) of vhost {vhost!r} to "
                f"exchange {EXCHANGE!r}?",
                connection,
            )
        ):
            _error("not replayed: answered no")
            return EXIT_FAILED
        send = connection.channel()
        send.confirm_delivery()
        # Every dead letter there when it started is looked at (those not replayed are
        # given back in order); one that fails again and comes back behind them is not
        # replayed twice in one run.
        letters = _DeadLetters(connection, present)
        try:
            with _progress(total=min(present, MAX_WINDOW), unit="msg", desc="replaying") as bar:
                for method, props, body in letters:
                    seen += 1
                    bar.update(1)
                    if failed or (args.limit and tally["replayed"] >= args.limit):
                        tally["left"] += 1
                        continue
                    if _filtering(args) and not _selected(_dead_entry(method, props, body), args):
                        tally["left"] += 1
                        continue
                    failed = _replay_one(send, letters, method, props, body, tally)
        finally:
            letters.close()
    except AMQPConnectionError as exc:
        _summary_of_replay(tally, seen, present)
        raise DataSpaceConnectionError(
            f"lost the broker at {masked}: {_reason(exc)}; the dead letters not replayed stay"
        ) from None
    except AMQPChannelError as exc:
        _summary_of_replay(tally, seen, present)
        _error(f"the broker closed the channel: {exc}; the dead letters not replayed stay")
        return EXIT_FAILED
    finally:
        _close(connection)
    _summary_of_replay(tally, seen, present)
    if failed:
        _error(failed)
        return EXIT_FAILED
    return EXIT_OK


def _replay_one(send, letters: _DeadLetters, method, props, body: bytes, tally: dict) -> str | None:
    """Publish one dead letter again and remove it once confirmed; None, or why the
    broker refused it (then the replay stops: it stays, as do those after it)."""
    headers = props.headers or {}
    name = _safe(props.message_id or "-")
    if "x-dataspace-body-size" in headers:  # kept cut: not the request any more
        _note(
            f"skipped {name}: its body was cut to {len(body)} of "
            f"{_safe(headers['x-dataspace-body-size'])} bytes when it was dead-lettered; "
            "ask its sender to send it again"
        )
        tally["skipped"] += 1
        return None
    routing_key = _original_routing_key(headers)
    if not routing_key:
        _note(
            f"skipped {name}: no x-original-routing-key or x-death routing key; drop it, "
            "or publish it by hand"
        )
        tally["skipped"] += 1
        return None
    try:
        send.basic_publish(EXCHANGE, routing_key, body, _replay_properties(props), mandatory=True)
    except (UnroutableError, NackError) as exc:
        tally["left"] += 1
        return (
            f"the broker refused the copy of {name} (routing key {_safe(routing_key)}): "
            f"{type(exc).__name__}; it stays dead (is a dataspace-worker running? it declares "
            "the queues)"
        )
    except ChannelClosedByBroker as exc:
        tally["left"] += 1
        return (
            f"the broker refused the copy of {name}: {exc.reply_code} {exc.reply_text}; it "
            f"stays dead (replay with an account that may publish to exchange {EXCHANGE!r})"
        )
    letters.ack(method.delivery_tag)
    tally["replayed"] += 1
    return None


def _summary_of_replay(tally: dict, seen: int, present: int) -> None:
    line = f"replayed {tally['replayed']}, skipped {tally['skipped']}"
    if tally["left"]:
        line += f", {tally['left']} left in place"
    _emit(line + _looked_at(seen, present))


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
    _check_broker(args)
    source = _source(args)
    try:
        stored = source.get_dataproduct(args.tm_seq, args.generation, args.key)
    except KeyError:
        # what was asked for, in its own words (not the store's: it may be SQL)
        _error(
            f"not found: product {args.key!r} of task manager {args.tm_seq}, generation "
            f"{args.generation} (check TM_SEQ, GEN and KEY)"
        )
        return EXIT_NOT_FOUND
    finally:
        source.close()
    try:
        value = decode_value(stored, allow_pickle=args.allow_pickle)
    except PickleRefusedError:
        _error(
            "the product is pickled; pass --allow-pickle to unpickle it (which runs code "
            "chosen by whoever wrote it)"
        )
        return EXIT_FAILED
    except ValueTooLargeError as exc:  # a bomb, or a product larger than this reader allows
        _error(f"get: {exc}")
        return EXIT_FAILED
    except DataSpaceError:
        _emit(
            f"dataspace: not in DataBlock format: {len(stored)} raw bytes",
            file=sys.stderr,
        )
        _emit(stored.hex() if args.hex else repr(stored))
        return EXIT_OK
    if _is_json(value):
        _emit(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    else:
        _emit(pprint.pformat(value, sort_dicts=False))
    return EXIT_OK


def _put(args) -> int:
    from ..datablock import Header, Metadata

    text = sys.stdin.read() if args.value == "-" else args.value
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _error(f"put: VALUE is not JSON: {exc}")
        return EXIT_CONFIG
    if not isinstance(value, dict):
        _error(
            f"put: VALUE must be a JSON object, e.g. '{{\"cpus\": 4}}', not {type(value).__name__}"
        )
        return EXIT_CONFIG
    stored = encode_value(value, allow_pickle=False)
    header = Header(args.tm_seq, creator=CREATOR)
    metadata = Metadata(args.tm_seq, state="NEW", generation_id=args.generation)
    _check_broker(args)
    source = _source(args)
    try:
        try:
            source.insert(args.tm_seq, args.generation, args.key, stored, header, metadata)
            done = "inserted"
        except DataSpaceExistsError:
            source.update(args.tm_seq, args.generation, args.key, stored, header, metadata)
            done = "updated"
    except KeyError:
        _error(
            f"not found: task manager {args.tm_seq} (put stores products of a task manager "
            "that exists: check TM_SEQ)"
        )
        return EXIT_NOT_FOUND
    finally:
        source.close()
    _emit(
        f"{done} product {args.key!r} of task manager {args.tm_seq}, generation "
        f"{args.generation} ({len(stored)} bytes stored)"
    )
    return EXIT_OK


COMMANDS = {
    "status": _status,
    "get": _get,
    "put": _put,
    "reap": _reap,
}
DEAD_COMMANDS = {
    "list": _dead_list,
    "replay": _dead_replay,
    "purge": _dead_purge,
    "drop": _dead_drop,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dead":
        command = DEAD_COMMANDS[args.dead_command]
    else:
        command = COMMANDS[args.command]
    started = time.monotonic()
    try:
        # a URL that cannot be used is said once, without its password, for every command
        BrokerAddresses(args.url, lambda _params: None)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    try:
        code = command(args)
        sys.stdout.flush()  # a reader gone (| head) is found here, not at exit
        return code
    except DataSpaceConfigurationError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except (DataSpaceConnectionError, DataSpaceTimeoutError) as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE
    except (DataSpaceError, KeyError, ValueError, TypeError) as exc:
        _error(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error(f"interrupted after {time.monotonic() - started:.1f} s")
        return 130
    except BrokenPipeError:  # piped into head, say: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
