"""Replies that may crash the channel that publishes them, published apart.

RabbitMQ 3.10 (3.10.8 here) crashes a channel that publishes to a direct
reply-to address it cannot decode, or of a node that is not running
(``case_clause`` in ``rabbit_channel:deliver_reply``), and a crashed channel
takes its whole connection down with 541 INTERNAL_ERROR. A request whose client
was connected to a cluster node that went down therefore took the worker's
consumer connection with it, again on every redelivery, until the delivery limit
dead-lettered it: seconds in which the worker served nothing and a lane stood
still (docs/reliability.md, guarantee 17). A forged ``reply_to`` did the same, on
every first delivery: 10 forged requests a second cost 106 reconnections in 30 s.

So no address a client can write is published on a consumer's connection unless
it is known to be safe there:

- ``reply_addresses.parse`` refuses, from the string alone, whatever is not a
  direct reply-to address as the broker writes it (the consumer refuses such a
  request before it runs, dead-lettered as ``bad_reply_to``);
- ``GuardedReplies.route`` sends a reply on the consumer's channel (as fast as
  ever) only when its node is known to run and the request is a first delivery;
  it drops it at once when its node (or client channel) was found dead within
  ``DEAD_FOR``; anything else goes through the guard: a thread with a connection
  of its own that publishes one reply at a time and waits for the broker's
  confirm. When the broker closes that connection with 541 on a reply, the
  reply's address is dead (no client can receive it): the reply is dropped, its
  request settled, its node remembered as dead. The worker's consumers never
  notice.

Nodes known to run: the guard's own (its own direct reply-to address, learnt on
each connection it opens, and when the consumer connection opens), and the
nodes of replies it published and had confirmed, for ``ALIVE_FOR``; a node seen
running before is tried again through the guard when that runs out, and when the
consumer connection opens again. A node never seen running costs the guard its
connection when it is not running: after such a failure no other unknown node is
tried for ``PROBE_PAUSE`` seconds, and replies to unknown nodes are dropped
meanwhile (a WARNING every ``WARN_EVERY`` seconds at most), so a flood of forged
addresses costs the guard at most one reconnection per ``PROBE_PAUSE`` and the
consumers none. Everything remembered is bounded (``MAX_REMEMBERED`` entries;
reply_nodes.py holds that memory and the learning of the guard's own node).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pika
from pika.exceptions import (
    AMQPError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
)
from pika.spec import INTERNAL_ERROR, PRECONDITION_FAILED  # 541, 406

from dataspace_core.errors import DataSpaceTooLargeError
from dataspace_core.protocol import CONTENT_TYPE, OUTCOME_HEADER, encode_error

from . import metrics
from .reply_addresses import PREFIX, ReplyAddress, check
from .reply_nodes import (
    ALIVE_FOR,
    DEAD_FOR,
    PROBE_PAUSE,
    DropWarnings,
    Remembered,
    learn_own_address,
)

log = logging.getLogger(__name__)

DIRECT_REPLY_TO_PREFIX = PREFIX
#: seconds between attempts at one reply when the connection fails for another
#: reason, doubling up to the maximum; attempts go on while the reply is wanted
ATTEMPT_PAUSE = 0.2
ATTEMPT_PAUSE_MAX = 2.0
#: the guard's connection: a broker that stops answering is noticed in seconds
#: (its replies' requests are held meanwhile)
HEARTBEAT = 10
SOCKET_TIMEOUT = 5.0
BLOCKED_TIMEOUT = 10.0
#: seconds without a reply after which the connection is closed (and opened
#: again when needed: no heartbeats to keep up on a blocking connection)
IDLE_CLOSE = 10.0
#: what became of a guarded reply: published and confirmed; dropped because its
#: address is dead (or its node unknown while unknown ones are not tried); not
#: published because the worker is stopping (the request should be tried again);
#: or no longer wanted (its request went back to the queue meanwhile)
Result = Literal["sent", "dropped", "failed", "abandoned"]
#: how a reply goes out: on the consumer's channel, through the guard, or not at all
Route = Literal["direct", "guard", "drop"]
_LEARN = object()  # in the inbox: learn the guard's own node


@dataclass
class GuardedReply:
    reply_to: str
    body: bytes
    properties: pika.BasicProperties
    #: called on the guard's thread with the result; must not block
    done: Callable[[Result], None]
    #: False once the reply is of no use (its request was requeued): not sent
    wanted: Callable[[], bool] = lambda: True
    #: ``reply_to`` decoded (``reply_addresses.parse``), or None to decode it here
    address: ReplyAddress | None = None


class GuardedReplies:
    """One thread publishing replies one at a time on a connection of its own, and
    what it learnt about which nodes run."""

    def __init__(
        self,
        parameters: Callable[[], pika.ConnectionParameters],
        stopping: threading.Event,
        name: str = "guarded replies",
    ):
        """``parameters()``: the broker address to use now (the pool's current one)."""
        self._parameters = parameters
        self._stopping = stopping
        self._name = name
        self._inbox: queue.Queue = queue.Queue()
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._lock = threading.Lock()
        self._pending = 0
        #: node keys (``ReplyAddress.node_key``) that run; that failed; client
        #: channels that failed (guarded by ``_lock``: the I/O thread reads them)
        self._alive = Remembered()
        self._dead = Remembered()
        self._dead_channels = Remembered()
        #: the node of the guard's current connection, once learnt
        self._own: tuple | None = None
        #: no node never seen running is tried before this (monotonic seconds)
        self._probe_after = 0.0
        #: connections the guard opened, and how many a 541 closed
        self.connections_opened = 0
        self.crashes = 0
        self._warnings = DropWarnings()
        self._heartbeat = HEARTBEAT
        self._thread = threading.Thread(
            target=self._run, name="dataspace-guarded-replies", daemon=True
        )

    @property
    def pending(self) -> int:
        """Replies handed over whose ``done`` has not returned yet."""
        with self._lock:
            return self._pending

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def route(self, address: ReplyAddress, redelivered: bool) -> Route:
        """How the reply to ``address`` goes out (any thread; the pool's I/O thread).

        On the consumer's channel only for a first delivery whose node is known to
        run: a redelivered request may be from a client of a node that went down
        meanwhile. Dropped at once when its node or client channel was found dead,
        or its node was never seen running while unknown nodes are not tried."""
        with self._lock:
            kind = self._unsendable(address)
            if kind is None:
                known = address.node_key in self._alive and not redelivered
                return "direct" if known else "guard"
        self._warnings.dropped(kind, address)
        metrics.GUARDED_REPLIES.labels("dropped").inc()
        return "drop"

    def _unsendable(self, address: ReplyAddress) -> str | None:
        """Why a reply to ``address`` is not to be tried now (under ``_lock``): its node
        or client channel is ``"dead"``, or its node was never seen running while no
        unknown node is tried (``"unprobed"``); None to try it."""
        if address.node_key in self._dead or address.client_channel in self._dead_channels:
            return "dead"
        if self._alive.seen(address.node_key):
            return None
        return "unprobed" if time.monotonic() < self._probe_after else None

    def connected(self) -> None:
        """The consumer connection opened (again): nodes known to run are tried
        through the guard again before their replies go out directly (one of them
        may be why it had to), and the guard learns its own node."""
        with self._lock:
            self._alive.expire_all()
        self._inbox.put(_LEARN)

    def put(self, reply: GuardedReply) -> None:
        with self._lock:
            self._pending += 1
        self._inbox.put(reply)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was handed over (while wanted), then close."""
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout)

    # -- the guard's thread --------------------------------------------------------
    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            try:
                reply = self._inbox.get(timeout=self._tick())
            except queue.Empty:
                if time.monotonic() - idle_since >= IDLE_CLOSE:
                    self._close()
                else:
                    self._keep_alive()
                continue
            idle_since = time.monotonic()
            if reply is None:
                break
            if reply is _LEARN:
                self._learn_now()
                continue
            try:
                result = self._deliver(reply)
            except Exception:  # never let the thread die with replies waiting
                log.exception("guarded reply to %r failed", reply.reply_to)
                self._close()
                result = "failed"
            metrics.GUARDED_REPLIES.labels(result).inc()
            reply.done(result)  # first: whoever waits for pending == 0 then sees its effect
            with self._lock:
                self._pending -= 1
        self._close()

    def _tick(self) -> float:
        """How long to wait for a reply: up to IDLE_CLOSE, but while the connection is
        open at most half its heartbeat, so that heartbeats are answered (a blocking
        connection does nothing between calls) and the broker keeps it, and drops it
        within two heartbeats when its host's link is cut."""
        connection = self._connection
        if connection is None or not connection.is_open:
            return IDLE_CLOSE
        return max(0.2, min(IDLE_CLOSE, self._heartbeat / 2))

    def _keep_alive(self) -> None:
        connection = self._connection
        if connection is None or not connection.is_open:
            return
        try:
            connection.process_data_events(0)
        except (AMQPError, OSError):
            self._close()

    def _deliver(self, reply: GuardedReply) -> Result:
        """Publish until confirmed, dropped, no longer wanted, or the worker stops:
        a reply given up while its request stays held would only be redone."""
        address = reply.address or check(reply.reply_to)
        if address is None:  # the consumer refuses these before they run
            self._warnings.dropped("malformed", None, reply.reply_to)
            return "dropped"
        pause = ATTEMPT_PAUSE
        attempt = 0
        while True:
            if not reply.wanted():
                return "abandoned"
            if attempt and self._stopping.is_set():
                return "failed"
            with self._lock:  # again at each attempt: a reconnection learns the own node
                kind = self._unsendable(address)
            if kind is not None:
                self._warnings.dropped(kind, address)
                return "dropped"
            attempt += 1
            try:
                self._open().basic_publish("", reply.reply_to, reply.body, reply.properties)
                with self._lock:
                    self._alive.put(address.node_key, ALIVE_FOR)
                return "sent"
            except ConnectionClosedByBroker as exc:
                own = self._own  # the node of the connection that just closed
                self._close()
                if exc.reply_code == INTERNAL_ERROR:
                    self._remember_dead(address, own)
                    return "dropped"
                error: BaseException = exc
            except ChannelClosedByBroker as exc:
                self._close()
                if exc.reply_code == PRECONDITION_FAILED and _too_large_instead(reply):
                    continue  # refused for its size: the same every time; answer that
                error = exc
            except (AMQPError, OSError) as exc:
                self._close()
                error = exc
            log.warning(
                "guarded reply not published (%s), attempt %d; again in %.1f s",
                str(error) or type(error).__name__,
                attempt,
                pause,
            )
            self._stopping.wait(pause)
            pause = min(pause * 2, ATTEMPT_PAUSE_MAX)

    def _remember_dead(self, address: ReplyAddress, own_node: tuple | None) -> None:
        """The broker failed on ``address``: its client channel is dead, and its node
        is (unless it is ``own_node``, the node the guard was connected to, which ran
        a moment ago); no unknown node is tried for ``PROBE_PAUSE`` seconds."""
        self.crashes += 1
        own = address.node_key == own_node
        with self._lock:
            self._dead_channels.put(address.client_channel, DEAD_FOR)
            if not own:
                self._dead.put(address.node_key, DEAD_FOR)
                self._alive.expire(address.node_key)
            self._probe_after = time.monotonic() + PROBE_PAUSE
        log.warning(
            "reply dropped: the broker fails on its address %r (node %r: its client's "
            "connection was on a node that is not running, or the address is forged); "
            "request settled, and replies to that %s dropped for %.0f s",
            address.address,
            address.node,
            "client channel" if own else "node",
            DEAD_FOR,
        )

    def _learn_now(self) -> None:
        try:
            if self._channel is not None and self._channel.is_open:
                self._learn(self._connection)
            else:
                self._open()
        except (AMQPError, OSError) as exc:
            log.warning("guard could not connect to learn its node (%s)", exc)
            self._close()

    def _learn(self, connection) -> None:
        """Learn the node of the guard's connection: it runs."""
        address = learn_own_address(connection, SOCKET_TIMEOUT)
        if address is None:
            return
        with self._lock:
            self._own = address.node_key
            self._alive.put(address.node_key, ALIVE_FOR)
            self._dead.expire(address.node_key)

    def _open(self):
        """The guard's channel, in confirm mode, opened on first use."""
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._close()
        parameters = _guard_parameters(self._parameters(), self._name)
        self._heartbeat = parameters.heartbeat
        self._connection = pika.BlockingConnection(parameters)
        self.connections_opened += 1
        try:
            self._learn(self._connection)
        except ConnectionClosedByBroker as exc:  # not the fault of the reply to publish
            raise pika.exceptions.AMQPConnectionError(f"closed while learning: {exc}") from None
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        return self._channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._own = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (AMQPError, OSError):
                pass


def _guard_parameters(
    pool_parameters: pika.ConnectionParameters, name: str
) -> pika.ConnectionParameters:
    """The guard's connection parameters: the pool's current broker address under
    the guard's own name, with short timeouts, and the pool's heartbeat when it is
    shorter (a cut link is noticed as soon on this connection as on the
    consumers'), else ``HEARTBEAT``."""
    parameters = copy.copy(pool_parameters)
    parameters.client_properties = {
        **(parameters.client_properties or {}),
        "connection_name": name,
    }
    configured = parameters.heartbeat
    if not (isinstance(configured, int) and 0 < configured < HEARTBEAT):
        configured = HEARTBEAT
    parameters.heartbeat = configured
    parameters.socket_timeout = SOCKET_TIMEOUT
    parameters.blocked_connection_timeout = BLOCKED_TIMEOUT
    return parameters


def _too_large_instead(reply: GuardedReply) -> bool:
    """Put a ``too_large`` error in place of a reply the broker refused (406, over
    its max_message_size, set lower than the worker's ``max_message_size``):
    retried as it was, it would be refused for as long as it is wanted. False if
    the reply is that error already (the 406 had another cause)."""
    if reply.body[:1] == b"{" and b'"too_large"' in reply.body[:200]:
        return False
    size = len(reply.body)
    message = (
        f"the reply of {size} bytes was refused by the broker (over its max_message_size); "
        "read the products one at a time: get_dataproduct(taskmanager_id, generation_id, "
        "key) for each key, and set the worker's max_message_size to the broker's"
    )
    log.warning("guarded reply to %r: %s", reply.reply_to, message)
    reply.body = encode_error(DataSpaceTooLargeError(message))
    reply.properties = copy.copy(reply.properties)
    reply.properties.content_type = CONTENT_TYPE
    if reply.properties.headers:
        reply.properties.headers = {**reply.properties.headers, OUTCOME_HEADER: "too_large"}
    return True
