"""Publisher-confirm bookkeeping for one channel in confirm mode.

The broker numbers a confirm-mode channel's publishes 1, 2, 3... and answers
each with an ack or a nack carrying that number as its delivery tag; with
``multiple`` set, one answer settles every number up to its own. The client's
RPC channel and the worker's dead-letter channel both keep, per number, what was
published (a call, a fire-and-forget request, a request waiting for its dead
letter) and act once it is settled: this is that bookkeeping, written once.

Not thread-safe: it is used on a connection's I/O thread (or under the owner's
lock).
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ConfirmTracker(Generic[T]):
    """Delivery tag -> what was published under it, in publish order."""

    def __init__(self) -> None:
        self._items: dict[int, T] = {}
        self._last = 0

    def restart(self) -> list[T]:
        """A new channel numbers its publishes from 1 again: forget everything,
        returning what was still unconfirmed (in publish order)."""
        self._last = 0
        return self.clear()

    def clear(self) -> list[T]:
        """Forget the unconfirmed items (their confirms will never come), keeping the
        numbering (the channel goes on); returns them in publish order."""
        items = list(self._items.values())
        self._items.clear()
        return items

    def add(self, item: T) -> int:
        """Record ``item`` as the channel's next publish; returns its delivery tag.
        Call it right after ``basic_publish`` succeeded, never after one that
        raised (the broker did not count that one)."""
        self._last += 1
        self._items[self._last] = item
        return self._last

    @property
    def next_tag(self) -> int:
        """The delivery tag the channel's next publish will have."""
        return self._last + 1

    def get(self, tag: int) -> T | None:
        """The item published under ``tag`` and not yet settled, or None."""
        return self._items.get(tag)

    def settle(self, tag: int, multiple: bool) -> list[T]:
        """Remove and return what an ack or nack of ``tag`` settles: that item, or
        with ``multiple`` every item up to it (tags the tracker no longer holds,
        after a ``clear``, are skipped)."""
        if not multiple:
            item = self._items.pop(tag, None)
            return [] if item is None else [item]
        done = []
        for each in self._items:  # in publish order: stop at the first later one
            if each > tag:
                break
            done.append(each)
        return [self._items.pop(each) for each in done]

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
