"""What the reply guard (guarded_replies.py) remembers about nodes, and how it
learns its own.

A direct reply-to address names the node of its client's connection. The guard
remembers which nodes run (a reply to them was confirmed), which do not (the
broker failed on a reply to them) and which client channels are gone, each for a
while and in bounded memory (``Remembered``); it learns the node of its own
connection from the address the broker writes into a message it returns
(``learn_own_address``); and it says why it dropped replies without flooding the
log (``DropWarnings``).
"""

from __future__ import annotations

import logging
import time
import uuid

import pika
from pika.exceptions import AMQPChannelError

from .logs import Throttle
from .reply_addresses import ReplyAddress, check

log = logging.getLogger("dataspace_worker.guarded_replies")

#: seconds a node (or client channel) found dead is remembered: later replies to
#: it are dropped without costing any connection again
DEAD_FOR = 60.0
#: seconds a node is known to run after a reply to it was confirmed: its replies
#: go out on the consumers' channels meanwhile
ALIVE_FOR = 60.0
#: seconds after a node failed the guard's connection during which no node never
#: seen running is tried (their replies are dropped)
PROBE_PAUSE = 1.0
#: nodes and client channels remembered, at most (each of dead and alive)
MAX_REMEMBERED = 4096
#: seconds between two WARNING lines about dropped replies of one kind
WARN_EVERY = 10.0
#: where the guard publishes to learn its own address: no queue has this name
LEARN_ROUTING_KEY = "dataspace.reply-address-probe"


class Remembered:
    """Keys until a time, at most ``MAX_REMEMBERED`` of them (the oldest go first)."""

    def __init__(self):
        self._until: dict = {}

    def __contains__(self, key) -> bool:
        return self._until.get(key, 0.0) > time.monotonic()

    def seen(self, key) -> bool:
        """Whether ``key`` was put, whether or not its time ran out."""
        return key in self._until

    def put(self, key, seconds: float) -> None:
        now = time.monotonic()
        self._until.pop(key, None)
        self._until[key] = now + seconds
        if len(self._until) > MAX_REMEMBERED:
            for old in [k for k, t in self._until.items() if t <= now]:
                if len(self._until) <= MAX_REMEMBERED // 2:
                    break
                del self._until[old]
            while len(self._until) > MAX_REMEMBERED:
                del self._until[next(iter(self._until))]

    def expire(self, key) -> None:
        if key in self._until:
            self._until[key] = 0.0

    def expire_all(self) -> None:
        for key in self._until:
            self._until[key] = 0.0

    def __len__(self) -> int:
        return len(self._until)


class DropWarnings:
    """Why replies were dropped: one WARNING line per kind every ``WARN_EVERY``
    seconds, saying how many were not (a ``logs.Throttle`` of one line per window
    for each kind)."""

    def __init__(self):
        self._throttles: dict[str, Throttle] = {}

    def dropped(self, kind: str, address: ReplyAddress | None, reply_to: str = "") -> None:
        """A reply was dropped: its node (or client channel) is ``"dead"``, its node
        is ``"unprobed"`` while unknown nodes are not tried, or ``reply_to`` is
        ``"malformed"``."""
        if kind == "dead":
            self.warn(
                kind,
                "reply dropped: its node %r (or client channel) was found not running "
                "within %.0f s",
                address.node,
                DEAD_FOR,
            )
        elif kind == "unprobed":
            self.warn(
                kind,
                "reply dropped: its node %r was never seen running, and no such node is "
                "tried for %.0f s after one failed (forged reply-to addresses?)",
                address.node,
                PROBE_PAUSE,
            )
        else:
            self.warn(kind, "reply dropped: %r is no reply-to address", reply_to[:80])

    def warn(self, kind: str, message: str, *args) -> None:
        throttle = self._throttles.setdefault(kind, Throttle(window=WARN_EVERY, burst=1))
        allowed, quiet = throttle.allow()
        if not allowed:
            return
        if quiet:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, quiet, WARN_EVERY)
        log.warning(message, *args)


def learn_own_address(connection, timeout: float) -> ReplyAddress | None:
    """The direct reply-to address of a channel on ``connection``, which tells its
    node: the broker writes it into a message it returns unroutable. None when the
    broker did not say within ``timeout`` or refused (no permission, say: the
    node is learnt from confirmed replies instead)."""
    returned: list[str | None] = []
    try:
        channel = connection.channel()
        channel.basic_consume("amq.rabbitmq.reply-to", lambda *_: None, auto_ack=True)
        channel.add_on_return_callback(lambda _c, _m, props, _b: returned.append(props.reply_to))
        channel.basic_publish(
            "",
            f"{LEARN_ROUTING_KEY}.{uuid.uuid4().hex}",
            b"",
            pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"),
            mandatory=True,
        )
        deadline = time.monotonic() + timeout
        while not returned and time.monotonic() < deadline and channel.is_open:
            connection.process_data_events(time_limit=0.05)
        if channel.is_open:
            channel.close()
    except AMQPChannelError as exc:
        log.warning("guard could not learn its node: %s", exc)
        return None
    own = returned[0] if returned else None
    address = check(own)
    if address is None:
        log.warning("guard could not learn its node: the broker wrote %r", own)
    return address
