"""RabbitMQ definitions for the service, generated from ``topology.topology()``.

A definitions document is what ``rabbitmqctl import_definitions``, the
management API (``POST /api/definitions``) and a node's boot-time import
(``load_definitions`` in rabbitmq.conf) accept.  It is made from the same
``Topology`` the worker declares, so a broker set up from it and a worker can
never disagree about a queue's arguments (406 ``inequivalent arg``).

Two parts, kept apart on purpose:

- the **topology** (vhost, exchanges, queues, bindings, policies): public,
  committed as ``deploy/rabbitmq/definitions.json``::

      python -m dataspace_worker.definitions > deploy/rabbitmq/definitions.json

- the **accounts** (users, their permissions, topic permissions and limits):
  secret, made per deployment from passwords in the environment, never
  committed::

      DATASPACE_BROKER_WORKER_PASSWORD=... DATASPACE_BROKER_CLIENT_PASSWORD=... \\
          python -m dataspace_worker.definitions --accounts | rabbitmqctl import_definitions

  An import sets each user's password to the one in the document: a file of
  accounts that the broker re-imports at every boot would undo any password
  changed since, which is why the committed file holds none.

Accounts (one password variable each; an account whose variable is unset is
left out).  The routing key names the operation (``data.<op>``, ``lane.<op>``
through the ordering lanes, ``admin.reap``) and a worker refuses a body that
names another, so the **topic permissions** on exchange ``dataspace`` are the
per-operation access control, enforced by the broker (a publish outside them:
channel closed, 403 ``ACCESS_REFUSED``):

- **reader** (``dataspace-reader``): the read operations;
- **writer** (``dataspace-client``, the historical client account): reads and
  writes, no deletes and no reap;
- **maintainer** (``dataspace-maintainer``): reads, the deletes,
  ``create_tables`` and ``admin.reap``;
- **worker** (``dataspace``): configure and read ``^dataspace(\\..+)?$``, write
  the same and ``amq.default``: the only account that may publish through the
  default exchange (replies to direct reply-to, the next scheduled reap) or to
  ``dataspace.dead``.  It declares every exchange and queue, binds them (write
  on the destination, read on the source), consumes, and dead-letters.
  Declaring a queue with a dead-letter exchange also needs read on the queue
  and write on that exchange (``dataspace.reaper.schedule`` -> ``dataspace``);
- **ops** (``dataspace-ops``): tags ``management`` and ``policymaker`` (not
  ``administrator``), permissions on this vhost only: read on
  ``dataspace.dead`` and ``dataspace.reaper.schedule`` (``dataspace status``,
  ``dataspace dead list``, the management UI's "Get messages" and "Purge"),
  configure and write nothing: it cannot publish a request.

The three client accounts have write on ``^dataspace$`` only (the request
exchange; not ``dataspace.lanes``, nor ``amq.default``, nor ``dataspace.dead``),
configure and read nothing: replies come through direct reply-to, which needs
no permission.  Their topic permission on ``dataspace``: write = their
routing-key expression, read = ``^$``.  Each also gets per-user limits
(``max-connections``, ``max-channels``): RabbitMQ 3.10.8 imports ``limits`` on
a user (checked), and re-importing changes them, but a limit taken out of the
document stays on the broker until ``rabbitmqctl clear_user_limits``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import sys
from dataclasses import dataclass

from dataspace_core.catalog import CATALOG, named
from dataspace_core.protocol import (
    BATCH_ROUTING_PREFIX,
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    LANE_ROUTING_PREFIX,
    OPERATIONS,
    READ_ROUTING_PREFIX,
    REAP_ROUTING_KEY,
    ROUTING_PREFIX,
    SCHEDULE_QUEUE,
)

from .topology import Topology, topology

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
NOTHING = "^$"

#: Names the worker may configure, write and read: the protocol's namespace.
NAMESPACE = r"dataspace(\..+)?"
WORKER_PERMISSIONS = {
    "configure": rf"^{NAMESPACE}$",
    "write": rf"^({NAMESPACE}|amq\.default)$",
    "read": rf"^{NAMESPACE}$",
}


# -- operations, by who may send them (the catalog's ``callers``) -----------------
def _data_ops(role: str) -> tuple[str, ...]:
    """The operations ``role`` may send as ``data.<op>`` or ``lane.<op>``."""
    return named(lambda spec: role in spec.callers and not spec.by_reaper)


#: the reads: every client account's
READ_OPS = _data_ops("reader")
#: what a writer may do beside reading
WRITE_OPS = tuple(op for op in _data_ops("writer") if op not in READ_OPS)
#: deletes and maintenance: the maintainer's beside reading (``admin.reap`` apart:
#: its own routing key)
DELETE_OPS = tuple(op for op in _data_ops("maintainer") if op not in READ_OPS)
#: whether the maintainer may send ``admin.reap``
MAINTAINER_REAPS = "maintainer" in CATALOG["reap"].callers
#: a data operation travels as ``data.<op>``, or ``lane.<op>`` through the ordering lanes
OPERATION_PREFIXES = (ROUTING_PREFIX.rstrip("."), LANE_ROUTING_PREFIX.rstrip("."))


def operation_keys(ops: tuple[str, ...], reap: bool = False) -> str:
    """The topic-permission expression matching exactly the routing keys of ``ops``
    (as ``data.<op>`` and ``lane.<op>``, the reads among them also as
    ``read.<op>``, the fire-and-forget ones also as a batch's ``batch.<op>``), and
    ``admin.reap`` if ``reap``."""
    prefixes = "|".join(OPERATION_PREFIXES)
    names = "|".join(re.escape(op) for op in ops)
    keys = rf"({prefixes})\.({names})"
    reads = "|".join(re.escape(op) for op in ops if OPERATIONS[op].fast_read)
    if reads:
        keys = rf"({keys}|{re.escape(READ_ROUTING_PREFIX.rstrip('.'))}\.({reads}))"
    batched = "|".join(re.escape(op) for op in ops if OPERATIONS[op].fire_and_forget)
    if batched:
        keys = rf"({keys}|{re.escape(BATCH_ROUTING_PREFIX.rstrip('.'))}\.({batched}))"
    if reap:
        keys = rf"({keys}|{re.escape(REAP_ROUTING_KEY)})"
    return f"^{keys}$"


# -- accounts ------------------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    """One generated account: its role, default user name and where its password is."""

    role: str
    user: str
    password_env: str
    #: older variable names still read (the first set one wins, after ``password_env``)
    legacy_envs: tuple[str, ...] = ()
    tags: str = ""
    #: the routing keys it may publish to exchange ``dataspace``; None: a client of
    #: no request at all (ops), "" : no topic permission (the worker: any key)
    keys: str | None = None
    #: default per-user limits (``max-connections``, ``max-channels``); None: none
    limits: tuple[int, int] | None = None


WORKER_PASSWORD_ENV = "DATASPACE_BROKER_WORKER_PASSWORD"
CLIENT_PASSWORD_ENV = "DATASPACE_BROKER_CLIENT_PASSWORD"
READER_PASSWORD_ENV = "DATASPACE_BROKER_READER_PASSWORD"
MAINTAINER_PASSWORD_ENV = "DATASPACE_BROKER_MAINTAINER_PASSWORD"
OPS_USER_ENV = "DATASPACE_BROKER_OPS_USER"
OPS_PASSWORD_ENV = "DATASPACE_BROKER_OPS_PASSWORD"
#: the names the ops account had when it was an ``admin`` (still read)
ADMIN_USER_ENV = "DATASPACE_BROKER_ADMIN_USER"
ADMIN_PASSWORD_ENV = "DATASPACE_BROKER_ADMIN_PASSWORD"

WORKER_USER = "dataspace"
CLIENT_USER = "dataspace-client"
READER_USER = "dataspace-reader"
MAINTAINER_USER = "dataspace-maintainer"
OPS_USER = "dataspace-ops"
OPS_TAGS = "management,policymaker"

ACCOUNTS: tuple[Account, ...] = (
    Account("worker", WORKER_USER, WORKER_PASSWORD_ENV, keys=""),
    Account(
        "reader", READER_USER, READER_PASSWORD_ENV, keys=operation_keys(READ_OPS), limits=(100, 400)
    ),
    Account(
        "writer",
        CLIENT_USER,
        CLIENT_PASSWORD_ENV,
        keys=operation_keys(READ_OPS + WRITE_OPS),
        limits=(100, 400),
    ),
    Account(
        "maintainer",
        MAINTAINER_USER,
        MAINTAINER_PASSWORD_ENV,
        keys=operation_keys(READ_OPS + DELETE_OPS, reap=MAINTAINER_REAPS),
        limits=(10, 40),
    ),
    Account(
        "ops",
        OPS_USER,
        OPS_PASSWORD_ENV,
        legacy_envs=(ADMIN_PASSWORD_ENV,),
        tags=OPS_TAGS,
        limits=(10, 40),
    ),
)
ROLES = tuple(a.role for a in ACCOUNTS)
ACCOUNT = {a.role: a for a in ACCOUNTS}

#: ``dataspace.dead`` is bounded by a policy (queue arguments cannot change on an
#: existing queue; a policy can).  Over the bound the oldest dead letters go.
DEAD_LETTER_POLICY = "dataspace-dead-bound"
DEAD_LETTER_MAX_BYTES = 1024**3
DEAD_LETTER_OVERFLOW = "drop-head"

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
    """Write on the request exchange only; direct reply-to needs no permission."""
    exchange = topo.exchanges[0][0]
    return {"configure": NOTHING, "write": f"^{re.escape(exchange)}$", "read": NOTHING}


def ops_permissions() -> dict:
    """Look at (and purge) dead letters and the pending scheduled reap; nothing else."""
    queues = "|".join(re.escape(q) for q in (DEAD_LETTER_QUEUE, SCHEDULE_QUEUE))
    return {"configure": NOTHING, "write": NOTHING, "read": f"^({queues})$"}


def permissions(role: str, topo: Topology) -> dict:
    """The configure/write/read expressions of ``role`` on the vhost."""
    if role == "worker":
        return dict(WORKER_PERMISSIONS)
    if role == "ops":
        return ops_permissions()
    return client_permissions(topo)


def _check_namespace(topo: Topology) -> None:
    """Every name the worker declares falls under its permissions (or this fails loudly)."""
    pattern = re.compile(WORKER_PERMISSIONS["configure"])
    names = [name for name, _kind in topo.exchanges] + [q.name for q in topo.queues]
    outside = [name for name in names if not pattern.match(name)]
    if outside:  # pragma: no cover - a topology change that forgot the permissions
        raise RuntimeError(f"names outside the worker's permissions: {', '.join(outside)}")


def dead_letter_policy(vhost: str, max_bytes: int = DEAD_LETTER_MAX_BYTES) -> dict:
    return {
        "vhost": vhost,
        "name": DEAD_LETTER_POLICY,
        "pattern": f"^{re.escape(DEAD_LETTER_QUEUE)}$",
        "apply-to": "queues",
        "definition": {"max-length-bytes": max_bytes, "overflow": DEAD_LETTER_OVERFLOW},
        "priority": 0,
    }


def definitions(
    delivery_limit: int = 10,
    vhost: str = "/",
    accounts: dict[str, tuple[str, str]] | None = None,
    *,
    limits: dict[str, tuple[int, int] | None] | None = None,
    dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
) -> dict:
    """The definitions document for one vhost.

    ``accounts`` maps a role (``ROLES``) to ``(user name, password hash)`` (see
    ``hash_password``); without it (the default) the document has no users and
    no permissions: the topology only, safe to commit and to import at every
    boot.  ``limits`` overrides a role's ``(max-connections, max-channels)``
    (None: no limit).
    """
    topo = topology(delivery_limit)
    _check_namespace(topo)
    doc: dict = {
        "vhosts": [{"name": vhost}],
        "users": [],
        "permissions": [],
        "topic_permissions": [],
        "exchanges": _exchanges(topo, vhost),
        "queues": _queues(topo, vhost),
        "bindings": _bindings(topo, vhost),
        "policies": [dead_letter_policy(vhost, dead_letter_max_bytes)],
    }
    limits = limits or {}
    for account in ACCOUNTS:
        if account.role in (accounts or {}):
            name, hashed = accounts[account.role]
            limit = limits.get(account.role, account.limits)
            _add_account(doc, account, name, hashed, limit, vhost, topo)
    return doc


def _exchanges(topo: Topology, vhost: str) -> list[dict]:
    exchange_arguments = getattr(topo, "exchange_arguments", {})
    return [
        {
            "name": name,
            "vhost": vhost,
            "type": kind,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": dict(exchange_arguments.get(name) or {}),
        }
        for name, kind in topo.exchanges
    ]


def _queues(topo: Topology, vhost: str) -> list[dict]:
    """The durable queues. Transient ones (the fast read queue, the lane workers'
    queue) go when their node goes, and the workers declare them again: a
    definitions file would only bring them back at its import."""
    return [
        {
            "name": queue.name,
            "vhost": vhost,
            "durable": queue.durable,
            "auto_delete": False,
            "arguments": dict(queue.arguments),
        }
        for queue in topo.queues
        if queue.durable
    ]


def _bindings(topo: Topology, vhost: str) -> list[dict]:
    """Queue bindings, then exchange-to-exchange bindings."""
    to_queues = [
        {
            "source": exchange,
            "vhost": vhost,
            "destination": queue.name,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": dict(queue.binding_arguments),
        }
        for queue in topo.queues
        if queue.durable
        for exchange, key in queue.bindings
    ]
    to_exchanges = [
        {
            "source": source,
            "vhost": vhost,
            "destination": destination,
            "destination_type": "exchange",
            "routing_key": key,
            "arguments": {},
        }
        for source, destination, key in getattr(topo, "exchange_bindings", ())
    ]
    return to_queues + to_exchanges


def _add_account(doc, account: Account, name, hashed, limit, vhost: str, topo) -> None:
    """One account's user, permissions and topic permission, added to ``doc``."""
    user = {
        "name": name,
        "password_hash": hashed,
        "hashing_algorithm": HASHING_ALGORITHM,
        "tags": account.tags,
    }
    if limit is not None:
        user["limits"] = {"max-connections": limit[0], "max-channels": limit[1]}
    doc["users"].append(user)
    doc["permissions"].append({"user": name, "vhost": vhost, **permissions(account.role, topo)})
    if account.keys != "":  # the worker: no topic permission, any routing key
        doc["topic_permissions"].append(
            {
                "user": name,
                "vhost": vhost,
                "exchange": EXCHANGE,
                "write": account.keys or NOTHING,
                "read": NOTHING,
            }
        )


def accounts_only(doc: dict) -> dict:
    """The accounts part of a document (with its vhost, so that it imports on its own)."""
    return {key: doc[key] for key in ACCOUNT_KEYS}


def main(argv: list[str] | None = None, environ: dict | None = None) -> int:
    """``python -m dataspace_worker.definitions``: the command is in definitions_cli.py
    (which imports this module, hence the import here)."""
    from . import definitions_cli

    return definitions_cli.main(argv, environ)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
