"""Broker URLs: several of them for a cluster, and how they appear in messages and
logs (with the password masked).

A broker address setting holds one URL or several (a cluster's nodes), as a
list or as one string with the URLs separated by commas (a comma inside a
password must be percent-encoded, as any reserved character there). Clients
and workers connect to the first that answers and, when a connection is lost,
go on to the next, round robin (``BrokerAddresses``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import pika


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The URLs of an address setting; ValueError if there is none."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [u.strip() for u in items if isinstance(u, str) and u.strip()]
    if not found or len(found) != len(items):
        raise ValueError(f"expected one or more broker URLs, got {mask_password(urls)!r}")
    return found


def mask_password(url: str | Sequence[str]) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh``; other URLs unchanged.
    Several URLs (a list, or separated by commas) are masked each."""
    if not isinstance(url, str):
        return ", ".join(mask_password(u) for u in url)
    if "," in url:
        return ", ".join(mask_password(u.strip()) for u in url.split(","))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


class BrokerAddresses:
    """The connection parameters of each broker URL, and which one to try now."""

    def __init__(self, urls: str | Sequence[str], configure: Callable[[object], None]):
        """``configure(params)`` sets what every connection shares (timeouts, name).
        Raises ValueError for an empty setting or a URL pika cannot parse."""
        self.urls = split_urls(urls)
        self.params = []
        for url in self.urls:
            try:
                params = pika.URLParameters(url)
            except Exception as exc:  # pika raises assorted errors for a bad URL
                raise ValueError(f"invalid broker URL {mask_password(url)}: {exc}") from None
            configure(params)
            self.params.append(params)
        self._index = 0

    @property
    def current(self):
        """The parameters to connect with next."""
        return self.params[self._index]

    @property
    def current_url(self) -> str:
        return mask_password(self.urls[self._index])

    def advance(self) -> bool:
        """Go on to the next address; True when that starts a new round."""
        self._index = (self._index + 1) % len(self.params)
        return self._index == 0

    def __len__(self) -> int:
        return len(self.params)

    @property
    def masked(self) -> str:
        return mask_password(self.urls)
