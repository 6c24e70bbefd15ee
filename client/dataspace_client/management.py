"""A small client of the RabbitMQ management HTTP API (plugin ``rabbitmq_management``).

Only what ``dataspace status`` needs: the queues of one vhost, their consumers and
the connections they come from, and a look at the first message of a queue that
leaves it in place ("Get messages" with ``ack_requeue_true``; the ``dead`` commands
use AMQP instead, see ``cli.py``). Standard library only (``urllib``).

The management URL is derived from the broker URL unless given: same host and
credentials, port 15672 (15671 for ``amqps``), the vhost of the broker URL::

    amqp://ops:secret@mq:5672/prod  ->  http://mq:15672/, user ops, vhost "prod"

A given management URL may carry its own credentials (``http://user:pw@host:15672/``)
and a path prefix (a management UI behind a reverse proxy); without credentials,
those of the broker URL are used. Over https the API's certificate is checked as
the broker's is: against the broker URL's ``tls_ca_file`` (see ``urls.py``), else
the system's CAs, with its hostname.

The figures the API reports are statistics the broker emits every few seconds
(``collect_statistics_interval``, 5 s by default): a queue declared a moment ago
may have none yet (``None`` here), and counts lag by up to that interval (measured
on 3.10.8: a new quorum queue's ``consumers`` stayed ``None`` for more than 5 s,
and ``disable_stats=true`` counted it 0 messages when it held 3). Consumers and
connections are events, not statistics: they show up about a second after the
fact. ``dataspace status`` therefore asks each queue for its counts over AMQP.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
)
from dataspace_core.urls import _userinfo, split_urls, tls_context_of, url_problem

DEFAULT_PORT = 15672
DEFAULT_TLS_PORT = 15671
DEFAULT_TIMEOUT = 10.0
HINT = "enable the rabbitmq_management plugin or pass --management-url"


class ManagementError(DataSpaceError):
    """The management API answered with an error."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class ManagementUnreachableError(ManagementError, DataSpaceConnectionError):
    """Nothing that looks like the management API answered at the URL in time."""


class ManagementAuthError(ManagementError, DataSpaceConfigurationError):
    """The management API refused the credentials (401) or the user's rights (403)."""


class ManagementNotFoundError(ManagementError):
    """The vhost, queue or connection asked for does not exist (404)."""


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL, as pika reads it (no path or ``/`` is ``/``)."""
    path = urlsplit(amqp_url).path
    if path in ("", "/"):
        return "/"
    return unquote(path[1:])


def management_url_for(amqp_url: str) -> str:
    """``amqp://u:p@host:5672/vh`` -> ``http://u:p@host:15672/`` (``amqps`` -> https, 15671)."""
    parts = urlsplit(amqp_url)
    tls = parts.scheme == "amqps"
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    userinfo = ""
    if parts.username is not None:
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@"
    port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    return urlunsplit(("https" if tls else "http", f"{userinfo}{host}:{port}", "/", "", ""))


def _display(url: str) -> str:
    """The URL without its userinfo: what messages show (whatever the password holds)."""
    start, _, rest = _userinfo(url)
    try:
        parts = urlsplit(start + rest)
    except ValueError:
        return "<unparseable url>"
    return urlunsplit(parts._replace(path=parts.path or "/", query="", fragment=""))


class ManagementClient:
    """Calls the management API of one broker, about one vhost."""

    def __init__(
        self,
        url: str,
        vhost: str = "/",
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        context: ssl.SSLContext | None = None,
    ):
        problem = url_problem(url)
        if problem:
            raise DataSpaceConfigurationError(f"invalid management URL {_display(url)}: {problem}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DataSpaceConfigurationError(
                f"management URL must be http(s)://host:port/, got {_display(url)!r}"
            )
        if parts.username is not None:
            username = unquote(parts.username)
            password = unquote(parts.password or "")
        self.url = _display(url)
        path = parts.path.rstrip("/")
        if not path.endswith("/api"):
            path += "/api"
        self._base = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], path, "", ""))
        self.vhost = vhost
        self.username = username or "guest"
        self._auth = "Basic " + base64.b64encode(
            f"{self.username}:{password if password is not None else 'guest'}".encode()
        ).decode("ascii")
        self.timeout = timeout
        self.context = context

    @classmethod
    def for_broker(
        cls, amqp_url: str, management_url: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> ManagementClient:
        """The client for the broker and vhost of ``amqp_url``; ``management_url`` overrides
        where the API is (its credentials, if any, override those of ``amqp_url``)."""
        amqp_url = split_urls(amqp_url)[0]
        parts = urlsplit(amqp_url)
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        try:
            context = tls_context_of(amqp_url)  # the broker's CA checks the API too
        except ValueError as exc:
            raise DataSpaceConfigurationError(str(exc)) from None
        return cls(
            management_url or management_url_for(amqp_url),
            vhost_of(amqp_url),
            username=username,
            password=password,
            timeout=timeout,
            context=context,
        )

    # -- HTTP ------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One call; ``path`` is relative to ``/api/``. Returns the decoded JSON."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(f"{self._base}/{path}", data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(  # noqa: S310
                req, timeout=self.timeout, context=self.context
            ) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                reason = f"no answer within {self.timeout:g} s"
            raise ManagementUnreachableError(
                f"management API not reachable at {self.url}: {HINT} ({reason})"
            ) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ManagementUnreachableError(
                f"management API not reachable at {self.url}: {HINT} "
                "(the answer there is not JSON: not the RabbitMQ management API?)"
            ) from None

    def _http_error(self, exc: urllib.error.HTTPError, path: str) -> ManagementError:
        try:
            detail = json.loads(exc.read() or b"{}").get("reason") or exc.reason
        except (ValueError, AttributeError, OSError):
            detail = exc.reason
        if exc.code in (401, 403):
            return ManagementAuthError(
                f"management API at {self.url} refused user {self.username!r} "
                f"({exc.code} {detail}): check the credentials and that the user may use "
                "the management API (tag 'monitoring' or 'management')",
                exc.code,
            )
        if exc.code == 404:
            return ManagementNotFoundError(f"not found: /api/{unquote(path)} ({detail})", 404)
        if exc.code >= 500:
            return ManagementUnreachableError(
                f"management API at {self.url} failed: {exc.code} {detail}", exc.code
            )
        return ManagementError(f"management API at {self.url}: {exc.code} {detail}", exc.code)

    def _vhost_path(self, *names: str) -> str:
        return "/".join(quote(n, safe="") for n in (self.vhost, *names))

    # -- what the commands use -----------------------------------------------------
    def overview(self) -> dict:
        return self.request("GET", "overview")

    def vhost_exists(self) -> bool:
        """Whether the broker has the vhost (an API call about a missing vhost may be
        answered 401 or 404 alike)."""
        try:
            self.request("GET", "vhosts/" + quote(self.vhost, safe=""))
        except ManagementNotFoundError:
            return False
        return True

    def queues(self) -> list[dict]:
        """Every queue of the vhost (statistics fields absent until first emitted)."""
        return self.request("GET", "queues/" + quote(self.vhost, safe=""))

    def queue(self, name: str) -> dict:
        """One queue, with ``consumer_details`` (``activity_status`` ``single_active``,
        ``waiting`` or ``up``)."""
        return self.request("GET", "queues/" + self._vhost_path(name))

    def connection(self, name: str) -> dict:
        return self.request("GET", "connections/" + quote(name, safe=""))

    def consumers(self) -> list[dict]:
        """Every consumer of the vhost: ``queue.name``, ``consumer_tag``,
        ``activity_status``, ``channel_details.connection_name`` (the broker's name of
        the connection, its peer address). An account tagged only ``management`` sees
        those on its own connections."""
        return self.request("GET", "consumers/" + quote(self.vhost, safe=""))

    def connections(self) -> list[dict]:
        """Every connection to the vhost, with ``name`` and ``client_properties`` (whose
        ``connection_name`` is the name the client gave itself)."""
        return self.request("GET", "vhosts/" + quote(self.vhost, safe="") + "/connections")

    def peek(self, queue: str, count: int, truncate: int | None = None) -> list[dict]:
        """The first ``count`` messages of ``queue``, left in it (got, then requeued).

        Each is ``{payload, payload_encoding ("string" or "base64"), payload_bytes,
        properties, exchange, routing_key, redelivered, message_count}``; ``payload``
        is cut to ``truncate`` bytes when given. While the call runs the messages
        are briefly unacknowledged; requeued, they keep their place at the head.
        """
        body: dict[str, Any] = {"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"}
        if truncate is not None:
            body["truncate"] = truncate
        return self.request("POST", "queues/" + self._vhost_path(queue, "get"), body)
