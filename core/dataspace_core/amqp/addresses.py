"""Connection parameters, built in one place: every connection this project
opens (clients, the worker's pool, the reap schedule, the guarded replies, the
``dataspace`` command) takes its parameters from ``broker_addresses``, so a
cluster's comma-separated list, TLS and the timeouts mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pika

from ..urls import connection_parameters, mask_password, split_urls


class BrokerAddresses:
    """The connection parameters of each broker URL, and which one to try now."""

    def __init__(
        self, urls: str | Sequence[str], configure: Callable[[object], None] | None = None
    ):
        """``configure(params)`` sets what every connection shares (timeouts, name).
        Raises ValueError for an empty setting or a URL that cannot be used."""
        self.urls = split_urls(urls)
        self.params: list[pika.URLParameters] = []
        for url in self.urls:
            params = connection_parameters(url)
            if configure is not None:
                configure(params)
            self.params.append(params)
        self._index = 0

    @property
    def current(self) -> pika.URLParameters:
        """The parameters to connect with next."""
        return self.params[self._index]

    @property
    def current_url(self) -> str:
        return mask_password(self.urls[self._index])

    @property
    def user(self) -> str:
        """The account of the first URL (the one a scheduled message carries as
        ``user_id``)."""
        return self.params[0].credentials.username

    def advance(self) -> bool:
        """Go on to the next address; True when that starts a new round."""
        self._index = (self._index + 1) % len(self.params)
        return self._index == 0

    def __len__(self) -> int:
        return len(self.params)


def broker_addresses(
    urls: str | Sequence[str],
    *,
    name: str | None = None,
    connect_timeout: float | None = None,
    blocked_timeout: float | None = None,
    stack_timeout: float | None = None,
) -> BrokerAddresses:
    """The parameters of each of ``urls`` for this project's connections: one
    attempt per connection (the callers rotate addresses and back off themselves,
    ``reconnect.Backoff``), no pause between pika's own attempts, and

    - ``name``: the connection name the management UI shows;
    - ``connect_timeout``: seconds for the TCP connect (pika's ``socket_timeout``);
    - ``blocked_timeout``: seconds a connection blocked by a resource alarm is
      kept before pika closes it (publishers must not buffer without bound);
    - ``stack_timeout``: seconds for the whole opening handshake.

    A URL's own query parameters (``heartbeat``, ``frame_max``...) still apply.
    Raises ValueError (its text free of passwords) for a setting that cannot be
    used."""

    def configure(params: pika.URLParameters) -> None:
        params.connection_attempts = 1
        params.retry_delay = 0
        if connect_timeout is not None:
            params.socket_timeout = connect_timeout
        if stack_timeout is not None:
            params.stack_timeout = stack_timeout
        if blocked_timeout is not None:
            params.blocked_connection_timeout = blocked_timeout
        if name is not None:
            params.client_properties = {"connection_name": name}

    return BrokerAddresses(urls, configure)
