"""The ``dataspace`` command's arguments: the main parser, built from one small
function per command (``_add_status``, ``_add_dead`` and its four, ``_add_get``,
``_add_put``, ``_add_reap``), the help texts and the argument types."""

from __future__ import annotations

import argparse
import os

from .. import __version__
from ..remote import DEFAULT_URL
from .broker import CREATOR, DEFAULT_TIMEOUT, MANAGEMENT_TIMEOUT, REAP_TIMEOUT
from .dead_letters import MAX_WINDOW
from .reap import MIN_RETENTION_DAYS

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
    _add_status(commands, common)
    _add_dead(commands, common)
    _add_get(commands, common)
    _add_put(commands, common)
    _add_reap(commands, common)
    return parser


def _add_status(commands, common) -> None:
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


def _add_dead(commands, common) -> None:
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
    _add_dead_list(dead_commands, common)
    _add_dead_replay(dead_commands, common)
    _add_dead_purge(dead_commands, common)
    _add_dead_drop(dead_commands, common)


def _add_dead_list(dead_commands, common) -> None:
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


def _add_dead_replay(dead_commands, common) -> None:
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


def _add_dead_purge(dead_commands, common) -> None:
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


def _add_dead_drop(dead_commands, common) -> None:
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


def _add_get(commands, common) -> None:
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


def _add_put(commands, common) -> None:
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


def _add_reap(commands, common) -> None:
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
