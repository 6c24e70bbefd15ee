"""``dataspace dead replay``: dead letters back to the workers.

``dead replay`` publishes each dead letter again to exchange ``dataspace`` with
its original routing key and properties (message_id kept, so a write that did
get applied is not applied twice), without the dead-letter headers and without
``reply_to`` (its sender is gone; a request that fails again is dead-lettered
again rather than answered to nobody).
"""

from __future__ import annotations

import sys

import pika
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    ChannelClosedByBroker,
    NackError,
    UnroutableError,
)

from dataspace_core.delivery_headers import without_delivery_headers
from dataspace_core.errors import DataSpaceConnectionError
from dataspace_core.protocol import (
    DEAD_BODY_SIZE_HEADER,
    DEAD_LETTER_OWN_HEADERS,
    EXCHANGE,
)
from dataspace_core.urls import mask_password

from .broker import _close, _vhost
from .dead_letters import (
    MAX_WINDOW,
    _dead_connection,
    _dead_entry,
    _DeadLetters,
    _described,
    _filtering,
    _looked_at,
    _original_routing_key,
    _selected,
)
from .output import (
    EXIT_FAILED,
    EXIT_OK,
    _ask,
    _emit,
    _error,
    _note,
    _progress,
    _reason,
    _safe,
    _terminal,
)


def _dead_replay(args) -> int:
    connection, present = _dead_connection(args, "replay")
    tally = {"replayed": 0, "skipped": 0, "left": 0, "seen": 0}
    failed = None
    try:
        if present == 0:
            _emit("replayed 0, skipped 0 (no dead letters)")
            return EXIT_OK
        if not _agreed(args, connection, present):
            _error("not replayed: answered no")
            return EXIT_FAILED
        failed = _replay_all(args, connection, present, tally)
    except AMQPConnectionError as exc:
        _summary_of_replay(tally, present)
        raise DataSpaceConnectionError(
            f"lost the broker at {mask_password(args.url)}: {_reason(exc)}; the dead letters "
            "not replayed stay"
        ) from None
    except AMQPChannelError as exc:
        _summary_of_replay(tally, present)
        _error(f"the broker closed the channel: {exc}; the dead letters not replayed stay")
        return EXIT_FAILED
    finally:
        _close(connection)
    _summary_of_replay(tally, present)
    if failed:
        _error(failed)
        return EXIT_FAILED
    return EXIT_OK


def _agreed(args, connection, present: int) -> bool:
    """Told -y, no terminal to ask on, or the operator said yes."""
    if args.yes or not _terminal(sys.stdin):
        return True
    which = f"those with {_described(args)} among " if _filtering(args) else ""
    most = f"at most {args.limit} of " if args.limit else ""
    return _ask(
        f"replay {most}{which}the {present} dead letter(s) of vhost {_vhost(args)!r} to "
        f"exchange {EXCHANGE!r}?",
        connection,
    )


def _replay_all(args, connection, present: int, tally: dict) -> str | None:
    """Replay the dead letters chosen (filters, -n), counting in ``tally``; None, or
    why the broker refused one (then the rest stay, in order)."""
    send = connection.channel()
    send.confirm_delivery()
    # Every dead letter there when it started is looked at (those not replayed are
    # given back in order); one that fails again and comes back behind them is not
    # replayed twice in one run.
    letters = _DeadLetters(connection, present)
    failed = None
    try:
        with _progress(total=min(present, MAX_WINDOW), unit="msg", desc="replaying") as bar:
            for method, props, body in letters:
                tally["seen"] += 1
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
    return failed


def _replay_one(send, letters: _DeadLetters, method, props, body: bytes, tally: dict) -> str | None:
    """Publish one dead letter again and remove it once confirmed; None, or why the
    broker refused it (then the replay stops: it stays, as do those after it)."""
    headers = props.headers or {}
    name = _safe(props.message_id or "-")
    if DEAD_BODY_SIZE_HEADER in headers:  # kept cut: not the request any more
        _note(
            f"skipped {name}: its body was cut to {len(body)} of "
            f"{_safe(headers[DEAD_BODY_SIZE_HEADER])} bytes when it was dead-lettered; "
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


def _summary_of_replay(tally: dict, present: int) -> None:
    line = f"replayed {tally['replayed']}, skipped {tally['skipped']}"
    if tally["left"]:
        line += f", {tally['left']} left in place"
    _emit(line + _looked_at(tally["seen"], present))


def _replay_properties(props) -> pika.BasicProperties:
    # what the dead letter gained on its way to dataspace.dead: dropped
    headers = without_delivery_headers(props.headers, DEAD_LETTER_OWN_HEADERS)
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
