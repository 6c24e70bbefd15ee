"""The broker, as every ``dataspace`` command reaches it: the AMQP connection each
opens first (so that one cause gets one message and one exit code whatever the
command), the client library's ``RemoteDataSource``, the management API, and
the timeouts."""

from __future__ import annotations

import os
import socket
from urllib.parse import unquote, urlsplit

import pika
from pika.exceptions import (
    AMQPError,
    IncompatibleProtocolError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
    StreamLostError,
)

from dataspace_core.amqp import patches  # noqa: F401  (one bad header must not break the connection)
from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.errors import DataSpaceConfigurationError, DataSpaceConnectionError
from dataspace_core.urls import causes, mask_password, split_urls, tls_failure

from ..management import ManagementClient, vhost_of
from ..remote import RemoteDataSource
from .output import _reason

REAP_TIMEOUT = 600.0
DEFAULT_TIMEOUT = 30.0
MANAGEMENT_TIMEOUT = 10.0
#: at most this long to open an AMQP connection (and for its handshake)
CONNECT_TIMEOUT = 10.0
CREATOR = "dataspace-cli"


def _timeout(args, default: float = DEFAULT_TIMEOUT) -> float:
    return args.timeout if args.timeout is not None else default


def _source(args, default_timeout: float = DEFAULT_TIMEOUT) -> RemoteDataSource:
    timeout = _timeout(args, default_timeout)
    return RemoteDataSource(
        {
            "url": args.url,
            "timeout": timeout,
            "connect_timeout": min(timeout, CONNECT_TIMEOUT),
            "app_id": CREATOR,
        }
    )


def _vhost(args) -> str:
    """The vhost the commands work on: that of the (first) broker URL."""
    return vhost_of(split_urls(args.url)[0])


def _management(args) -> ManagementClient:
    return ManagementClient.for_broker(
        args.url, args.management_url, timeout=_timeout(args, MANAGEMENT_TIMEOUT)
    )


def _connection_problem(exc: BaseException, url: str, seconds: float) -> tuple[str, bool]:
    """``(one line saying what happened and what to do, is it configuration)`` for a
    failed AMQP connection to ``url``. The same cause gets the same words in every
    command; "cannot reach" is kept for a port refused or silent."""
    masked = mask_password(url)
    parts = urlsplit(url)
    vhost = vhost_of(url)
    if isinstance(exc, ProbableAuthenticationError):
        return (
            f"authentication refused by the broker at {masked} (check the user and password)",
            True,
        )
    if isinstance(exc, ProbableAccessDeniedError):
        if "not found" in str(exc):
            return (
                f"no vhost {vhost!r} on the broker at {masked} (check the vhost at the end "
                "of the URL)",
                True,
            )
        user = unquote(parts.username or "guest")
        return (
            f"user {user!r} may not use vhost {vhost!r} on the broker at {masked} (grant it "
            "permissions there, e.g. rabbitmqctl set_permissions)",
            True,
        )
    tls = tls_failure(exc)
    if tls is not None:
        return f"cannot connect to the broker at {masked}: {tls[0]}", tls[1]
    port = parts.port or (5671 if parts.scheme.lower() == "amqps" else 5672)
    for cause in causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return (
                f"cannot reach the broker at {masked}: connection refused (is RabbitMQ "
                f"running and listening on port {port}?)",
                False,
            )
        if isinstance(cause, (TimeoutError, socket.timeout)) or "Timeout during AMQP" in str(cause):
            return (
                f"cannot reach the broker at {masked}: no answer within {seconds:g} s (check "
                "the host, the port and firewalls; -t to wait longer)",
                False,
            )
        if isinstance(cause, socket.gaierror):
            return (
                f"the broker host {parts.hostname!r} of {masked} is not known (check the "
                "host name)",
                True,
            )
        if isinstance(cause, (IncompatibleProtocolError, StreamLostError)):
            return (
                f"the broker at {masked} closed the connection during the AMQP handshake "
                f"(is port {port} RabbitMQ's AMQP port? is it starting? see its log)",
                False,
            )
    return f"connecting to the broker at {masked} failed: {_reason(exc)}", False


def _connect(
    args, purpose: str, default_timeout: float = DEFAULT_TIMEOUT
) -> tuple[pika.BlockingConnection, list[str]]:
    """A connection to the first of the broker URLs that takes one, and a line for each
    URL before it that did not. Raises DataSpaceConfigurationError (exit 2) for a
    refusal retrying cannot cure (credentials, vhost, certificate), else
    DataSpaceConnectionError (exit 3) when none could be reached."""
    timeout = _timeout(args, default_timeout)
    seconds = min(timeout, CONNECT_TIMEOUT)

    addresses = broker_addresses(  # checked by main
        args.url,
        name=f"{CREATOR} {purpose} on {socket.gethostname()} pid {os.getpid()}",
        connect_timeout=seconds,
        stack_timeout=seconds,
        blocked_timeout=timeout,
    )
    failures: list[str] = []
    for url, params in zip(addresses.urls, addresses.params):
        try:
            return pika.BlockingConnection(params), failures
        except Exception as exc:  # pika raises errors of no common base here
            text, configuration = _connection_problem(exc, url, seconds)
            if configuration:
                raise DataSpaceConfigurationError(text) from None
            failures.append(text)
    raise DataSpaceConnectionError("; ".join(failures))


def _check_broker(args, default_timeout: float = DEFAULT_TIMEOUT) -> None:
    """Open and close an AMQP connection: a wrong password or a closed port is then
    said the same way by every command, before the client library tries."""
    connection, _ = _connect(args, "check", default_timeout)
    _close(connection)


def _close(connection) -> None:
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except AMQPError:
            pass
