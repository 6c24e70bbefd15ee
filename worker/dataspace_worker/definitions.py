"""RabbitMQ definitions for the service, generated from ``topology.topology()``.

A definitions document is what ``rabbitmqctl import_definitions``, the
management API (``POST /api/definitions``) and a node's boot-time import
(``definitions.local.path`` in rabbitmq.conf) accept.  It is made from the
same ``Topology`` the worker declares, so a broker set up from it and a worker
can never disagree about a queue's arguments (406 ``inequivalent arg``).

Two parts, kept apart on purpose:

- the **topology** (vhost, exchanges, queues, bindings): public, committed as
  ``deploy/rabbitmq/definitions.json``::

      python -m dataspace_worker.definitions > deploy/rabbitmq/definitions.json

- the **accounts** (users, their permissions): secret, made per deployment
  from passwords in the environment, never committed::

      DATASPACE_BROKER_WORKER_PASSWORD=... DATASPACE_BROKER_CLIENT_PASSWORD=... \\
          python -m dataspace_worker.definitions --accounts | rabbitmqctl import_definitions

  An import sets each user's password to the one in the document: a file of
  accounts that the broker re-imports at every boot would undo any password
  changed since, which is why the committed file holds none.

Permissions (regular expressions on exchange and queue names, checked by
experiment on RabbitMQ 3.10):

- worker (``dataspace``): configure and read ``^dataspace(\\..+)?$``; write the
  same and ``amq.default``.  It declares every exchange and queue (configure),
  binds queues (write on the queue, read on the exchange), consumes
  ``dataspace.requests`` and ``dataspace.reaper`` (read), publishes replies and
  the next scheduled reap through the default exchange (write on
  ``amq.default``) and dead letters to ``dataspace.dead`` (write).  Declaring a
  queue with a dead-letter exchange also needs read on the queue and write on
  that exchange (``dataspace.reaper.schedule`` -> ``dataspace``).
- client (``dataspace-client``): write ``^(dataspace|dataspace\\.lanes)$``, nothing
  else.  It publishes requests to exchange ``dataspace`` (or, with ordering lanes,
  ``dataspace.lanes``) and reads replies through direct
  reply-to, which needs no permission; it declares nothing.  It keeps the
  right to send ``admin.reap``: the seed's ``Reaper`` API, which client
  programs use unchanged, sends it.  So no topic permission narrows it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys

from dataspace_client.protocol import LANES_EXCHANGE

from .topology import Topology, topology

WORKER_USER = "dataspace"
CLIENT_USER = "dataspace-client"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"

#: Names the worker may configure, write and read: the protocol's namespace.
NAMESPACE = r"dataspace(\..+)?"
WORKER_PERMISSIONS = {
    "configure": rf"^{NAMESPACE}$",
    "write": rf"^({NAMESPACE}|amq\.default)$",
    "read": rf"^{NAMESPACE}$",
}
NOTHING = "^$"

#: Environment variables ``--accounts`` takes the passwords from.
WORKER_PASSWORD_ENV = "DATASPACE_BROKER_WORKER_PASSWORD"
CLIENT_PASSWORD_ENV = "DATASPACE_BROKER_CLIENT_PASSWORD"
ADMIN_USER_ENV = "DATASPACE_BROKER_ADMIN_USER"
ADMIN_PASSWORD_ENV = "DATASPACE_BROKER_ADMIN_PASSWORD"

ACCOUNT_KEYS = ("vhosts", "users", "permissions", "topic_permissions")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``password`` as RabbitMQ stores it (``rabbit_password_hashing_sha256``):
    base64 of a 4-byte salt followed by SHA-256(salt + UTF-8 password)."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("the salt must be 4 bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def client_permissions(topo: Topology) -> dict:
    """Write on the request exchange and the ordering lanes' exchange only (a client
    with ``lanes`` publishes there); direct reply-to needs no permission."""
    exchange = topo.exchanges[0][0]
    write = f"^({re.escape(exchange)}|{re.escape(LANES_EXCHANGE)})$"
    return {"configure": NOTHING, "write": write, "read": NOTHING}


def _check_namespace(topo: Topology) -> None:
    """Every name the worker declares falls under its permissions (or this fails loudly)."""
    pattern = re.compile(WORKER_PERMISSIONS["configure"])
    names = [name for name, _kind in topo.exchanges] + [q.name for q in topo.queues]
    outside = [name for name in names if not pattern.match(name)]
    if outside:  # pragma: no cover - a topology change that forgot the permissions
        raise RuntimeError(f"names outside the worker's permissions: {', '.join(outside)}")


def definitions(
    delivery_limit: int = 10,
    vhost: str = "/",
    user: str = WORKER_USER,
    password_hash: str | None = None,
    *,
    client_user: str = CLIENT_USER,
    client_password_hash: str | None = None,
    admin_user: str | None = None,
    admin_password_hash: str | None = None,
) -> dict:
    """The definitions document for one vhost.

    Without password hashes (the default) it has no users and no permissions:
    the topology only, which is safe to commit and to import at every boot.
    Each account whose hash is given (see ``hash_password``) is added with its
    permissions on ``vhost``: the worker ``user``, the ``client_user``, and an
    optional ``admin_user`` (tag ``administrator``, every permission on the
    vhost: the management UI and operator commands).
    """
    topo = topology(delivery_limit)
    _check_namespace(topo)
    doc: dict = {
        "vhosts": [{"name": vhost}],
        "users": [],
        "permissions": [],
        "topic_permissions": [],
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": kind,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for name, kind in topo.exchanges
        ],
        "queues": [
            {
                "name": queue.name,
                "vhost": vhost,
                "durable": queue.durable,
                "auto_delete": False,
                "arguments": dict(queue.arguments),
            }
            for queue in topo.queues
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": queue.name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
            for queue in topo.queues
            for exchange, key in queue.bindings
        ],
        "policies": [],
    }
    accounts = [
        (user, password_hash, "", WORKER_PERMISSIONS),
        (client_user, client_password_hash, "", client_permissions(topo)),
    ]
    if admin_user:
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        accounts.append((admin_user, admin_password_hash, "administrator", everything))
    for name, hashed, tags, permissions in accounts:
        if hashed is None:
            continue
        doc["users"].append(
            {
                "name": name,
                "password_hash": hashed,
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": tags,
            }
        )
        doc["permissions"].append({"user": name, "vhost": vhost, **permissions})
    return doc


def accounts_only(doc: dict) -> dict:
    """The accounts part of a document (with its vhost, so that it imports on its own)."""
    return {key: doc[key] for key in ACCOUNT_KEYS}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataspace_worker.definitions",
        description="Print the service's RabbitMQ definitions (JSON), made from its topology.",
        epilog=(
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
        "--accounts",
        action="store_true",
        help=f"print users and permissions instead, passwords from {WORKER_PASSWORD_ENV}, "
        f"{CLIENT_PASSWORD_ENV} and optionally {ADMIN_USER_ENV} with {ADMIN_PASSWORD_ENV}",
    )
    parser.add_argument("--user", default=WORKER_USER, help=f"the worker's user ({WORKER_USER})")
    parser.add_argument(
        "--client-user", default=CLIENT_USER, help=f"the clients' user ({CLIENT_USER})"
    )
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    return parser


def main(argv: list[str] | None = None, environ: dict | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    if args.delivery_limit < 1:
        print("definitions: --delivery-limit must be at least 1", file=sys.stderr)
        return 2
    if not args.accounts:
        doc = definitions(args.delivery_limit, args.vhost)
    else:
        missing = [v for v in (WORKER_PASSWORD_ENV, CLIENT_PASSWORD_ENV) if not environ.get(v)]
        admin_user = environ.get(ADMIN_USER_ENV) or None
        if admin_user and not environ.get(ADMIN_PASSWORD_ENV):
            missing.append(ADMIN_PASSWORD_ENV)
        if missing:
            print(f"definitions: --accounts needs {', '.join(missing)} set", file=sys.stderr)
            return 2
        admin_password = environ.get(ADMIN_PASSWORD_ENV)
        doc = accounts_only(
            definitions(
                args.delivery_limit,
                args.vhost,
                args.user,
                hash_password(environ[WORKER_PASSWORD_ENV]),
                client_user=args.client_user,
                client_password_hash=hash_password(environ[CLIENT_PASSWORD_ENV]),
                admin_user=admin_user,
                admin_password_hash=hash_password(admin_password) if admin_user else None,
            )
        )
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        tmp = f"{args.output}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
