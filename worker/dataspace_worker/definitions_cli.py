"""The command ``python -m dataspace_worker.definitions``: prints the broker
definitions (the topology, or with ``--accounts`` the accounts) as JSON.

What the document holds, and why the two parts are kept apart, is in
definitions.py; this module is the command line around it: options, passwords
from the environment, limits, output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .definitions import (
    ACCOUNTS,
    ADMIN_USER_ENV,
    CLIENT_PASSWORD_ENV,
    CLIENT_USER,
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_POLICY,
    DEAD_LETTER_QUEUE,
    MAINTAINER_USER,
    OPS_USER,
    OPS_USER_ENV,
    READER_USER,
    ROLES,
    WORKER_PASSWORD_ENV,
    WORKER_USER,
    Account,
    accounts_only,
    definitions,
    hash_password,
)


def limit_commands(doc: dict) -> list[str]:
    """The ``rabbitmqctl`` commands that set the document's user limits (for a broker
    loaded another way, or to check them with ``rabbitmqctl list_user_limits``)."""
    return [
        f"rabbitmqctl set_user_limits {_shell_word(u['name'])} "
        f"{_shell_word(json.dumps(u['limits'], separators=(',', ':')))}"
        for u in doc.get("users", [])
        if u.get("limits")
    ]


def _shell_word(text: str) -> str:
    return (
        text
        if re.fullmatch(r"[A-Za-z0-9_.@%+=:,/-]+", text)
        else "'" + text.replace("'", "'\\''") + "'"
    )


def _limit(text: str) -> tuple[str, tuple[int, int] | None]:
    """``ROLE=CONNECTIONS,CHANNELS`` or ``ROLE=none``."""
    role, sep, value = text.partition("=")
    if not sep or role not in ROLES:
        raise argparse.ArgumentTypeError(f"ROLE=CONNECTIONS,CHANNELS with ROLE one of {ROLES}")
    if value == "none":
        return role, None
    try:
        connections, channels = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: CONNECTIONS,CHANNELS as two integers"
        ) from None
    if connections < 1 or channels < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: limits are at least 1")
    return role, (connections, channels)


def _parser() -> argparse.ArgumentParser:
    table = "\n".join(
        f"  {a.role:<11} {a.user:<21} {a.password_env}"
        + (f" (or {', '.join(a.legacy_envs)})" if a.legacy_envs else "")
        + (f"  limits {a.limits[0]} connections, {a.limits[1]} channels" if a.limits else "")
        for a in ACCOUNTS
    )
    parser = argparse.ArgumentParser(
        prog="python -m dataspace_worker.definitions",
        description="Print the service's RabbitMQ definitions (JSON), made from its topology.",
        epilog=(
            "accounts (--accounts; one whose password variable is unset is left out):\n"
            f"{table}\n"
            f"  the ops account's name: {OPS_USER_ENV} (or {ADMIN_USER_ENV})\n\n"
            "examples:\n"
            "  python -m dataspace_worker.definitions > deploy/rabbitmq/definitions.json\n"
            f"  {WORKER_PASSWORD_ENV}=... {CLIENT_PASSWORD_ENV}=... \\\n"
            "    python -m dataspace_worker.definitions --accounts "
            "| rabbitmqctl import_definitions\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--delivery-limit", type=int, default=10, help="as the workers' (10)")
    parser.add_argument("--vhost", default="/", help="virtual host (/)")
    parser.add_argument(
        "--dead-letter-max-bytes",
        type=int,
        default=DEAD_LETTER_MAX_BYTES,
        help=f"bound of queue {DEAD_LETTER_QUEUE} (policy {DEAD_LETTER_POLICY}; "
        f"{DEAD_LETTER_MAX_BYTES}, 1 GiB): beyond it the oldest dead letters are dropped",
    )
    parser.add_argument(
        "--accounts",
        action="store_true",
        help="print users, permissions, topic permissions and limits instead",
    )
    parser.add_argument("--user", default=WORKER_USER, help=f"the worker's user ({WORKER_USER})")
    parser.add_argument(
        "--client-user", default=CLIENT_USER, help=f"the writer's user ({CLIENT_USER})"
    )
    parser.add_argument(
        "--reader-user", default=READER_USER, help=f"the reader's user ({READER_USER})"
    )
    parser.add_argument(
        "--maintainer-user",
        default=MAINTAINER_USER,
        help=f"the maintainer's user ({MAINTAINER_USER})",
    )
    parser.add_argument(
        "--ops-user",
        help=f"the ops user (env {OPS_USER_ENV} or {ADMIN_USER_ENV}, else {OPS_USER})",
    )
    parser.add_argument(
        "--prefix", default="", help="put this before every user name (scratch accounts)"
    )
    parser.add_argument(
        "--limit",
        action="append",
        type=_limit,
        default=[],
        metavar="ROLE=CONNECTIONS,CHANNELS",
        help="per-user limits of a role instead of its default ('ROLE=none': no limit)",
    )
    parser.add_argument(
        "--limit-commands",
        action="store_true",
        help="with --accounts: print the rabbitmqctl set_user_limits commands on stderr too",
    )
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    return parser


def _password(account: Account, environ) -> str | None:
    for name in (account.password_env, *account.legacy_envs):
        if environ.get(name):
            return environ[name]
    return None


def main(argv: list[str] | None = None, environ: dict | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    if args.delivery_limit < 1:
        print("definitions: --delivery-limit must be at least 1", file=sys.stderr)
        return 2
    if args.dead_letter_max_bytes < 1:
        print("definitions: --dead-letter-max-bytes must be at least 1", file=sys.stderr)
        return 2
    if not args.accounts:
        doc = definitions(
            args.delivery_limit, args.vhost, dead_letter_max_bytes=args.dead_letter_max_bytes
        )
    else:
        accounts = _accounts(args, environ)
        if not accounts:
            print("definitions: --accounts needs at least one password set", file=sys.stderr)
            return 2
        doc = accounts_only(
            definitions(args.delivery_limit, args.vhost, accounts, limits=dict(args.limit))
        )
        if args.limit_commands:
            for command in limit_commands(doc):
                print(command, file=sys.stderr)
    _write(json.dumps(doc, indent=2) + "\n", args.output)
    return 0


def _accounts(args: argparse.Namespace, environ) -> dict[str, tuple[str, str]]:
    """role -> (user name, password hash) of every account whose password is set;
    one line on stderr for each left out."""
    ops_user = args.ops_user or environ.get(OPS_USER_ENV) or environ.get(ADMIN_USER_ENV)
    names = {
        "worker": args.user,
        "writer": args.client_user,
        "reader": args.reader_user,
        "maintainer": args.maintainer_user,
        "ops": ops_user or OPS_USER,
    }
    accounts = {}
    for account in ACCOUNTS:
        password = _password(account, environ)
        if password is None:
            print(
                f"definitions: {account.password_env} is not set: no {account.role} "
                f"account ({names[account.role]})",
                file=sys.stderr,
            )
            continue
        accounts[account.role] = (args.prefix + names[account.role], hash_password(password))
    return accounts


def _write(text: str, output: str | None) -> None:
    """To stdout, or to ``output`` whole (written aside, then renamed into place)."""
    if output:
        tmp = f"{output}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, output)
    else:
        sys.stdout.write(text)
