"""What went wrong reaching the broker, in words an operator can act on.

pika reports a refused port as ``AMQPConnectionError`` wrapping an
``AMQPConnectorSocketConnectError`` wrapping ``ConnectionRefusedError``, a bad
password as ``ProbableAuthenticationError`` with the broker's reply in a string,
and so on: the class name alone says nothing useful at 3 a.m. ``describe`` digs
the cause out and says it in one phrase, with whether retrying can help.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pika.exceptions import (
    ConnectionClosedByBroker,
    IncompatibleProtocolError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
    StreamLostError,
)

from ..urls import causes, tls_failure


@dataclass(frozen=True)
class ConnectionProblem:
    """One line saying what happened, and whether it is configuration (retrying
    cannot cure it: a wrong password, a missing vhost, a certificate refused)."""

    text: str
    configuration: bool = False

    def __str__(self) -> str:
        return self.text


def describe(exc: BaseException) -> ConnectionProblem:
    """The cause of a failed broker connection (or of its loss) as one phrase."""
    if isinstance(exc, ProbableAuthenticationError):
        return ConnectionProblem(
            "authentication refused (check the user name and password in the URL)", True
        )
    if isinstance(exc, ProbableAccessDeniedError):
        return ConnectionProblem(
            f"vhost refused: {_reply_text(exc)} (check the vhost in the URL and the user's "
            "permissions on it)",
            True,
        )
    tls = tls_failure(exc)
    if tls is not None:
        return ConnectionProblem(tls[0], tls[1])
    for cause in causes(exc):
        problem = _one(cause)
        if problem is not None:
            return problem
    return ConnectionProblem(str(exc).strip() or type(exc).__name__)


def _one(cause: BaseException) -> ConnectionProblem | None:
    if isinstance(cause, ConnectionRefusedError):
        return ConnectionProblem("connection refused (is RabbitMQ running on that host and port?)")
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return ConnectionProblem("timed out (host down, or a firewall dropping the port?)")
    if isinstance(cause, socket.gaierror):
        return ConnectionProblem(f"host name not resolved: {cause.strerror or cause}")
    if isinstance(cause, ConnectionResetError):
        return ConnectionProblem("connection reset by the broker or the network")
    if isinstance(cause, ConnectionClosedByBroker):
        text = f"closed by the broker: {cause.reply_code} {cause.reply_text}"
        if cause.reply_code == 403:
            return ConnectionProblem(text + " (check the user's permissions)", True)
        if "unknown exchange type" in (cause.reply_text or ""):
            return ConnectionProblem(
                text + " (enable the plugin: rabbitmq-plugins enable "
                "rabbitmq_consistent_hash_exchange)",
                True,
            )
        return ConnectionProblem(text)
    if isinstance(cause, (IncompatibleProtocolError, StreamLostError)):
        return ConnectionProblem(
            "connection closed during the handshake (not an AMQP port, or the broker "
            "is starting or refused this client: see its log)"
        )
    if isinstance(cause, OSError) and cause.strerror:
        return ConnectionProblem(cause.strerror)
    if "Timeout during AMQP handshake" in str(cause):
        return ConnectionProblem(
            "timed out in the AMQP handshake (not an AMQP port, or the broker is overloaded)"
        )
    return None


def _reply_text(exc: BaseException) -> str:
    """The broker's words inside a pika 'probable ...' error (kept in a string arg)."""
    text = " ".join(str(a) for a in exc.args)
    start = text.find("'")
    end = text.rfind("'")
    return text[start + 1 : end] if 0 <= start < end else text
