"""The I/O thread's side of an ``RpcClient``: its connection and its one channel.

The channel is in confirm mode, publishes with ``mandatory`` and consumes direct
reply-to. Here the broker's answers are sorted out: a reply goes to its call, a
return fails its call or drops its publication, an ack settles what it covers, a
nack has the channel recycled (closed, and opened again after a pause, with
everything in flight sent again). A lost connection or a channel error fails the
calls in flight (``lost``); ``ConnectionLoop`` opens the next connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pika
from pika.exceptions import ChannelClosedByBroker

from dataspace_core.amqp import patches  # noqa: F401  (one bad header must not break the connection)
from dataspace_core.amqp.addresses import BrokerAddresses
from dataspace_core.amqp.failures import describe
from dataspace_core.amqp.patches import close_select_connection
from dataspace_core.amqp.reconnect import ConnectionCallbacks, ConnectionLoop
from dataspace_core.errors import DataSpaceConnectionError, DataSpaceError
from dataspace_core.protocol import DIRECT_REPLY_TO, READ_ROUTING_PREFIX

from .batching import Batch
from .calls import Calls, ConnectionLost, ReadReturned
from .link import Link
from .publications import Publication, Publications

log = logging.getLogger("dataspace_client.rpc")

CHANNEL_REOPEN_DELAY = 1.0


class RpcChannel:
    """Opens, reopens and recycles the channel, and hands the broker's answers to
    the calls and publications they belong to (I/O thread, unless said otherwise).

    ``consuming(frame)`` is called once a new channel consumes replies: the owner
    then brings the link up (``link_up``) and sends again what is unconfirmed.
    """

    def __init__(
        self,
        link: Link,
        calls: Calls,
        publications: Publications,
        addresses: BrokerAddresses,
        consuming: Callable[[object], None],
    ):
        self.link = link
        self.calls = calls
        self.publications = publications
        self._consuming = consuming
        #: connection attempts finished (guarded by the link's lock)
        self.attempts = 0
        #: the last attempt was refused for a reason retrying cannot cure
        #: (credentials, vhost, a certificate): configuration
        self.refused = False
        self._reached = False  # the current connection got to consuming replies
        self._recycling = False  # the channel is being closed to be opened again
        link.loop = ConnectionLoop(
            addresses,
            ConnectionCallbacks(
                self._on_connection_open,
                self._on_connection_open_error,
                self._on_connection_closed,
            ),
            stopped=lambda: link.closing,
            wait=link.closed.wait,  # close() ends a pause between connections at once
            lock=link.lock,  # close() sees a new connection, or none is made
            logger=log,
        )

    def run(self) -> None:
        """The I/O thread: connections, one after another, until the client closes."""
        with self.link.io.held():
            self.link.loop.run(
                self._connection_ended,
                crashed=lambda exc: self.lost(f"I/O loop failed: {exc}"),
            )

    def link_up(self) -> None:
        """The new channel consumes replies (under the link's lock): requests can go,
        numbered from 1 again for their confirms."""
        self.link.unconfirmed.restart()
        self.link.open = True
        self._reached = True

    def lost(self, reason: str, error_cls: type[DataSpaceError] = ConnectionLost) -> None:
        """Mark the link down and fail every call in flight (any thread)."""
        with self.link.lock:
            self.link.down(reason)
            calls = self.calls.in_flight()
        for call in calls:
            call.fail(error_cls(f"{call.operation}: {reason} (broker {self.link.masked_url})"))

    def close_connection(self) -> None:
        close_select_connection(self.link.connection)

    # -- the connection --------------------------------------------------------------
    def _connection_ended(self) -> bool:
        """After a connection's loop: wake whoever waits for the first attempt;
        whether it got as far as consuming replies."""
        with self.link.lock:
            self.attempts += 1
            self.link.lock.notify_all()
            reached, self._reached = self._reached, False
            return reached

    def _on_connection_open(self, connection) -> None:
        if self.link.closing:
            connection.close()
            return
        self.link.io.attach(connection)  # callers may publish while the loop waits
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection, error) -> None:
        problem = describe(error)  # pika says only AMQPConnectionWorkflowFailed
        self.lost(problem.text)
        self.refused = problem.configuration
        connection.ioloop.stop()

    def _on_connection_closed(self, connection, reason) -> None:
        self.lost(f"connection closed: {reason}")
        connection.ioloop.stop()

    # -- the channel -----------------------------------------------------------------
    def _on_channel_open(self, channel) -> None:
        self.link.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.basic_consume(
            DIRECT_REPLY_TO, self._on_reply, auto_ack=True, callback=self._consuming
        )

    def _on_channel_closed(self, channel, reason) -> None:
        """A channel error from the broker fails the calls in flight and reopens the
        channel after a pause; a channel closed by its connection's end is left to
        ``_on_connection_closed`` (those calls are re-sent after reconnecting); one
        recycled after a refusal (``_recycle_channel``) comes back after a pause,
        and what was in flight on it is sent again."""
        if self._recycling and not self.link.closing:
            self._recycling = False
            self.lost(f"channel reopened after a refusal: {reason}")
            self._reopen_later()
            return
        if self.link.closing or not isinstance(reason, ChannelClosedByBroker):
            self.lost(f"channel closed: {reason}")
            return
        if reason.reply_code == 403:
            with self.link.lock:
                batch_refused = self.publications.batching.refused(reason.reply_text)
            if batch_refused:  # not the calls' fault: they go again on the next channel
                self.lost(f"channel reopened after a refusal: {reason.reply_text}")
                self._reopen_later()
                return
        if reason.reply_code == 404:
            # No exchange: no worker ever declared the topology on this vhost.
            self.lost(
                f"channel closed by the broker: {reason.reply_text}; "
                "is a dataspace worker running against this vhost?",
                DataSpaceConnectionError,
            )
        else:
            self.lost(f"channel closed by the broker: {reason.reply_text}", DataSpaceError)
        self._reopen_later()

    def _reopen_later(self) -> None:
        connection = self.link.connection
        if connection is not None and connection.is_open:
            connection.ioloop.call_later(CHANNEL_REOPEN_DELAY, self._reopen_channel)

    def _reopen_channel(self) -> None:
        connection = self.link.connection
        if connection is not None and connection.is_open and not self.link.closing:
            connection.channel(on_open_callback=self._on_channel_open)

    def _recycle_channel(self, reason: str) -> None:
        """Close the channel, to open a new one after a pause."""
        channel = self.link.channel
        if self._recycling or channel is None or not channel.is_open:
            return
        log.warning("%s; opening a new channel in %.1f s", reason, CHANNEL_REOPEN_DELAY)
        self._recycling = True
        channel.close()

    # -- the broker's answers ----------------------------------------------------------
    def _on_confirm(self, frame) -> None:
        method = frame.method
        nacked = isinstance(method, pika.spec.Basic.Nack)
        with self.link.lock:
            items = self.link.unconfirmed.settle(method.delivery_tag, method.multiple)
            if not nacked:
                for item in items:
                    if isinstance(item, (Publication, Batch)):
                        self.publications.confirmed(item)
            self.link.lock.notify_all()
        if nacked:
            # The queue is full, or, measured on RabbitMQ 3.10 in a cluster, the
            # channel was opened while its quorum queue had no leader: the broker
            # then refuses every publish on that channel for good. Either way: a
            # new channel after a pause, and everything in flight sent again in
            # order (calls with their message_id, publications from pending).
            self._recycle_channel(
                f"the broker refused {len(items)} request(s) (nack): the queue is full, "
                "or its leader moved"
            )

    def _on_return(self, _channel, method, properties, _body) -> None:
        reason = (
            f"request unroutable ({method.reply_text}): no queue is "
            f"bound for '{method.routing_key}' on exchange '{method.exchange}'; "
            "is a dataspace worker running against this vhost?"
        )
        with self.link.lock:
            call = self.calls.get(properties.correlation_id)
            batch_back = call is None and self.publications.returned(
                properties.message_id or "", reason
            )
        if batch_back:
            self._recycle_channel(
                "a batch of fire-and-forget requests came back unroutable (no worker on "
                "this vhost reads batches yet): no batches for "
                f"{self.publications.batching.paused_for():.0f} s, and everything "
                "unconfirmed goes again one by one"
            )
        if call is None:
            return
        if method.routing_key.startswith(READ_ROUTING_PREFIX):
            call.fail(ReadReturned(f"{call.operation}: {reason}"))
        else:
            call.fail(DataSpaceConnectionError(f"{call.operation}: {reason}"))

    def _on_reply(self, _channel, _method, properties, body) -> None:
        with self.link.lock:
            call = self.calls.get(properties.correlation_id)
        if call is not None:
            call.answer(body)
