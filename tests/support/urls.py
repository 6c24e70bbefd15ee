"""Broker URLs the tests make up: a user's URL on the tests' broker, and a URL on a
port nothing listens on (a cluster node that does not answer)."""

from __future__ import annotations

import os
from urllib.parse import quote, urlsplit, urlunsplit

from tests import services
from tests.faults.instances import free_port


def user_url(user: str, password: str, vhost: str) -> str:
    """The URL of ``user`` on ``vhost`` of the tests' broker (DATASPACE_TEST_AMQP_URL)."""
    base = urlsplit(os.environ.get("DATASPACE_TEST_AMQP_URL", services.DEFAULT_AMQP_URL))
    host = f"{base.hostname}:{base.port or 5672}"
    return f"amqp://{quote(user, safe='')}:{password}@{host}/{quote(vhost, safe='')}"


def dead_url(amqp_url: str) -> str:
    """The same URL on a port nothing listens on."""
    parts = urlsplit(amqp_url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{free_port()}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))
