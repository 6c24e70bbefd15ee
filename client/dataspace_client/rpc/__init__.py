"""An RPC client over RabbitMQ that many threads can share.

pika is not thread-safe, so one I/O thread owns the connection and its channel;
caller threads hand it requests through ``add_callback_threadsafe`` and wait on
an event for the reply. This keeps heartbeats flowing while callers wait,
tracks publisher confirms asynchronously (a nack makes a new channel, and the
calls in flight go again on it), and
publishes with ``mandatory`` so a request nobody can receive fails at once
instead of timing out. Replies come over direct reply-to: nothing to declare or
clean up, and measured as fast as a private reply queue here.

Each request carries the rest of its call's time budget as its AMQP
``expiration``: a request whose caller has given up is never run later.

When the connection drops, the I/O thread reconnects with bounded backoff, and
each call in flight is sent again, with the same message_id (so the worker
applies a write once), until the call's timeout; calls made while disconnected
wait for the reconnection up to their own timeout.

A client belongs to the process that made it: in a child forked from that
process its I/O thread does not exist, and its socket is the parent's. There
``call``, ``publish`` and ``flush`` raise DataSpaceConnectionError at once, and
``close`` forgets the client without a word on the wire (``RemoteDataSource``
makes a new client in the child instead).

``publish`` is the fire-and-forget path for decoupled producers: the request
goes out without ``reply_to`` and the caller goes on at once. The client keeps
each such request until the broker confirms it (on a quorum queue: stored on a
quorum of nodes), sends the unconfirmed ones again, in order and with the same
message_id, after a reconnection, and sends a nacked one again after a pause.
A window (``max_pending`` requests, ``max_pending_bytes``) bounds what it
holds: ``publish`` waits while the window is full. ``flush`` waits until
everything published was confirmed.

The parts, one job each: ``client`` (``RpcClient``, what callers use, and what
ties the rest together), ``link`` (the state every thread shares, under one
lock), ``calls`` (calls waiting for their reply, and the no-worker check),
``publications`` (the fire-and-forget window), ``channel`` (the I/O thread's
connection and channel, and the broker's answers), ``messages`` (a request's
properties and headers, the same for both kinds).
"""

from .calls import NO_WORKER_CHECK, NO_WORKER_PROBE_TIMEOUT
from .channel import CHANNEL_REOPEN_DELAY
from .client import RpcClient
from .publications import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_BYTES

__all__ = [
    "CHANNEL_REOPEN_DELAY",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_BYTES",
    "NO_WORKER_CHECK",
    "NO_WORKER_PROBE_TIMEOUT",
    "RpcClient",
]
