"""``dataspace status``: the broker, each dataspace.* queue of the vhost, its
consumers, the next scheduled reap, and a verdict with its exit code.

It counts each queue's ready messages and consumers over AMQP (a passive
queue.declare: exact at that moment) and takes the rest from the RabbitMQ
management API (plugin ``rabbitmq_management``): the queues' type and state, the
unacknowledged counts (statistics, up to 5 s old) and who the consumers are
(about a second behind). ``status_text`` prints what this module collects.
"""

from __future__ import annotations

from typing import Any

import orjson
from pika.exceptions import AMQPError, ChannelClosedByBroker

from dataspace_core.errors import DataSpaceConfigurationError, DataSpaceConnectionError
from dataspace_core.protocol import DEAD_LETTER_QUEUE, REAPER_QUEUE, REQUEST_QUEUE, SCHEDULE_QUEUE
from dataspace_core.urls import mask_password

from ..management import (
    ManagementAuthError,
    ManagementClient,
    ManagementError,
    ManagementNotFoundError,
    ManagementUnreachableError,
)
from .broker import MANAGEMENT_TIMEOUT, _close, _connect, _management
from .output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_WARNINGS,
    _emit,
    _error,
    _iso,
)
from .status_text import _print_status

#: the queues of the service, in the order ``status`` shows them
SERVICE_QUEUES = (REQUEST_QUEUE, DEAD_LETTER_QUEUE, REAPER_QUEUE, SCHEDULE_QUEUE)
NEXT_REAP_HEADER = "x-dataspace-next-reap-at"


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
        queues.append(_queue_entry(name, queue, figures, consumers.get(name, [])))
    by_name = {q["name"]: q for q in queues}
    dead = by_name.get(DEAD_LETTER_QUEUE, {}).get("messages_ready")
    return {
        "vhost": api.vhost,
        "management_url": api.url,
        "queues": queues,
        "next_reap": _schedule(api) if SCHEDULE_QUEUE in by_name else None,
        "dead_letters": dead,
        "problems": _problems(queues, by_name),
        "warnings": _warnings(dead),
    }


def _queue_entry(
    name: str, queue: dict, figures: tuple[int, int] | None, details: list[dict]
) -> dict:
    """One queue as ``status`` shows it: ready and consumers asked now (``figures``)
    when it could, else the management API's; the rest from the API (``queue``)."""
    ready, count = figures if figures else (queue.get("messages_ready"), queue.get("consumers"))
    active = next((c for c in details if c["activity_status"] == "single_active"), None)
    return {
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


def _problems(queues: list[dict], by_name: dict[str, dict]) -> list[str]:
    """What makes the service unhealthy: a queue missing or not running, no consumer
    where a worker must be."""
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
    return problems


def _warnings(dead: int | None) -> list[str]:
    if not dead:
        return []
    return [
        f"{dead} dead letter(s) wait in {DEAD_LETTER_QUEUE}: look at them with "
        "'dataspace dead list', then replay, purge or drop them"
    ]


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
