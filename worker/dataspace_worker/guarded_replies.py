"""Replies that may crash the channel that publishes them, published apart.

RabbitMQ 3.10 (3.10.8 here) crashes a channel that publishes to a direct
reply-to address of a node that is not running (``case_clause`` in
``rabbit_channel:deliver_reply``), and a crashed channel takes its whole
connection down with 541 INTERNAL_ERROR. A request whose client was connected
to a cluster node that went down therefore took the worker's consumer
connection with it, again on every redelivery, until the delivery limit
dead-lettered it: seconds in which the worker served nothing and a lane stood
still (docs/reliability.md, guarantee 17). A forged ``reply_to`` did the same.

Such an address reaches a worker in a request published before its node went
down; when that node also held the worker's connection, or a first delivery
crashed it, the request comes back *redelivered*. So replies to redelivered
requests with a direct reply-to address go through ``GuardedReplies``: a
thread with a connection of its own that publishes one reply at a time and
waits for the broker's confirm. When the broker closes that connection with
541 on a reply, the reply's address is dead (no client can receive it): the
reply is dropped and its request settled. The worker's consumers never notice.
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
from pika.exceptions import AMQPError, ConnectionClosedByBroker
from pika.spec import INTERNAL_ERROR  # 541

from . import metrics

log = logging.getLogger(__name__)

DIRECT_REPLY_TO_PREFIX = "amq.rabbitmq.reply-to."
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
#: seconds an address found dead is remembered: later replies to the same client
#: channel are dropped without costing the connection again
DEAD_FOR = 60.0

#: what became of a guarded reply: published and confirmed; dropped because its
#: address is dead; not published because the worker is stopping (the request
#: should be tried again); or no longer wanted (its request went back to the
#: queue meanwhile)
Result = Literal["sent", "dropped", "failed", "abandoned"]


def needs_guard(reply_to: str | None, redelivered: bool) -> bool:
    """Whether a reply should go through the guard rather than the consumer's channel."""
    return bool(redelivered and reply_to and reply_to.startswith(DIRECT_REPLY_TO_PREFIX))


@dataclass
class GuardedReply:
    reply_to: str
    body: bytes
    properties: pika.BasicProperties
    #: called on the guard's thread with the result; must not block
    done: Callable[[Result], None]
    #: False once the reply is of no use (its request was requeued): not sent
    wanted: Callable[[], bool] = lambda: True


class GuardedReplies:
    """One thread publishing replies one at a time on a connection of its own."""

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
        self._inbox: queue.Queue[GuardedReply | None] = queue.Queue()
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._lock = threading.Lock()
        self._pending = 0
        #: client channels found dead (address without its key) -> until when
        self._dead: dict[str, float] = {}
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
        while True:
            try:
                reply = self._inbox.get(timeout=IDLE_CLOSE)
            except queue.Empty:
                self._close()
                continue
            if reply is None:
                break
            try:
                result = self._deliver(reply)
            except Exception:  # never let the thread die with replies waiting
                log.exception("guarded reply to %s failed", reply.reply_to)
                self._close()
                result = "failed"
            metrics.GUARDED_REPLIES.labels(result).inc()
            reply.done(result)  # first: whoever waits for pending == 0 then sees its effect
            with self._lock:
                self._pending -= 1
        self._close()

    def _deliver(self, reply: GuardedReply) -> Result:
        """Publish until confirmed, dropped, no longer wanted, or the worker stops:
        a reply given up while its request stays held would only be redone."""
        channel_address = reply.reply_to.rsplit(".", 1)[0]  # the key names one call
        if self._dead.get(channel_address, 0.0) > time.monotonic():
            return "dropped"
        pause = ATTEMPT_PAUSE
        attempt = 0
        while True:
            if not reply.wanted():
                return "abandoned"
            if attempt and self._stopping.is_set():
                return "failed"
            attempt += 1
            try:
                self._open().basic_publish("", reply.reply_to, reply.body, reply.properties)
                return "sent"
            except ConnectionClosedByBroker as exc:
                self._close()
                if exc.reply_code == INTERNAL_ERROR:
                    log.warning(
                        "reply dropped: the broker fails on its address %s (its client's "
                        "connection was on a node that is not running); request settled, "
                        "and replies to that client channel dropped for %.0f s",
                        reply.reply_to,
                        DEAD_FOR,
                    )
                    self._remember_dead(channel_address)
                    return "dropped"
                error: BaseException = exc
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

    def _remember_dead(self, channel_address: str) -> None:
        now = time.monotonic()
        self._dead = {a: t for a, t in self._dead.items() if t > now}
        self._dead[channel_address] = now + DEAD_FOR

    def _open(self):
        """The guard's channel, in confirm mode, opened on first use."""
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._close()
        parameters = copy.copy(self._parameters())
        parameters.client_properties = {
            **(parameters.client_properties or {}),
            "connection_name": self._name,
        }
        parameters.heartbeat = HEARTBEAT
        parameters.socket_timeout = SOCKET_TIMEOUT
        parameters.blocked_connection_timeout = BLOCKED_TIMEOUT
        self._connection = pika.BlockingConnection(parameters)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        return self._channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (AMQPError, OSError):
                pass
