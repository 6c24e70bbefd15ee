"""Who a worker is, as the broker's management UI and ``dataspace status`` show it.

RabbitMQ names a connection by its peer address (``127.0.0.1:52172``) and a
consumer by a random tag unless the client says otherwise: with ten workers on
four hosts, an operator cannot tell which process holds the reaper or a lane.
Every connection of a worker is named ``dataspace-worker <name> pid <pid>
(<role>)`` (with ``on <host>`` when the name is not the host's), and every
consumer tag starts with ``<name>:<pid>:``. The name is the host name unless
the ``name`` setting gives one (as Celery's ``-n``).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from dataclasses import dataclass, field

from . import __version__

#: what a worker name may hold: it goes into consumer tags and log lines as it is
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class Identity:
    name: str
    host: str
    pid: int
    _serial: itertools.count = field(default_factory=itertools.count, compare=False, repr=False)

    @classmethod
    def of_this_process(cls, name: str = "") -> Identity:
        host = socket.gethostname()
        return cls(name or host, host, os.getpid())

    @property
    def label(self) -> str:
        """``<name> pid <pid>``, with the host when the name is not the host's."""
        where = "" if self.name == self.host else f" on {self.host}"
        return f"{self.name}{where} pid {self.pid}"

    def connection_name(self, role: str) -> str:
        """The ``connection_name`` client property of this worker's ``role`` connection."""
        return f"dataspace-worker {__version__} {self.label} ({role})"

    def consumer_tag(self, queue: str) -> str:
        """A tag for one subscription to ``queue``; each call gives a new one, since a
        channel refuses a tag still in use while an earlier cancel is on its way."""
        return f"{self.name}:{self.pid}:{queue}:{next(self._serial)}"


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a worker name, or None when it can ('' is the host's)."""
    if name == "" or NAME_PATTERN.fullmatch(name):
        return None
    return (
        "must be 1 to 64 letters, digits or . _ @ - (starting with a letter or digit), "
        f"got {name!r}"
    )
