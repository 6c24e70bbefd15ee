"""Request body bytes the worker holds delivered and not yet settled: what
``max_bytes_in_hand`` bounds (docs/security.md)."""

from __future__ import annotations


class Ledger:
    """Request body bytes delivered and not yet settled, by channel and delivery tag
    (I/O thread only)."""

    def __init__(self):
        self.total = 0
        self._channels: dict[object, dict[int, int]] = {}

    def add(self, channel, tag: int, size: int) -> None:
        self._channels.setdefault(channel, {})[tag] = size
        self.total += size

    def settle(self, channel, tag: int, multiple: bool) -> None:
        """An ack, nack or reject of ``tag`` (and, with ``multiple``, every earlier
        tag of the channel; tag 0 with ``multiple``: all of them)."""
        tags = self._channels.get(channel)
        if not tags:
            return
        if not multiple:
            self.total -= tags.pop(tag, 0)
            return
        if tag == 0:
            settled = list(tags)
        else:
            settled = [t for t in tags if t <= tag]
        for t in settled:
            self.total -= tags.pop(t)

    def drop(self, channel) -> None:
        """The channel closed: the broker took back what it had not settled."""
        self.total -= sum(self._channels.pop(channel, {}).values())

    def clear(self) -> None:
        self._channels.clear()
        self.total = 0
