"""Which fire-and-forget requests go out together as one batch message
(``dataspace_core.batches``), and when not to batch.

What one turn of the I/O thread publishes from the outbox is grouped: runs of
consecutive small requests of one operation, without a lane, become batches of
up to ``CLIENT_ITEMS`` requests and ``CLIENT_BYTES`` encoded; the rest go alone, and
the order of the outbox is kept. A batch is confirmed by the broker as one
message, and each request in it leaves the window then.

A batch can come back: unroutable (``batch.<op>`` is bound by no queue: the
workers on the vhost are older than batches), then batching pauses (for
``PAUSE_AFTER_RETURN`` seconds, twice as long after each pause that ends in
another return, up to an hour) and the client opens a new channel, on which
everything unconfirmed goes again in order, one by one; or refused by the
broker's topic permissions (an account whose definitions predate batches: 403
closes the channel), then the requests go one by one for the rest of the
client's life, and a WARNING says what to change.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from dataspace_core import batches
from dataspace_core.protocol import OPERATIONS

log = logging.getLogger("dataspace_client.rpc")

#: seconds without batches after one came back unroutable (older workers), doubled
#: at each return that follows a pause, up to PAUSE_MAX; back to this once a
#: batch is confirmed
PAUSE_AFTER_RETURN = 60.0
PAUSE_MAX = 3600.0


@dataclass(eq=False)
class Batch:
    """Fire-and-forget requests published as one message."""

    operation: str
    items: list  # of publications.Publication, in publish order
    exchange: str
    message_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: came back unroutable: its confirm confirms nothing (the items go again alone)
    returned: bool = False

    @property
    def routing_key(self) -> str:
        return batches.routing_key(self.operation)

    def body(self) -> bytes:
        return batches.encode([(p.message_id, p.body) for p in self.items])


def _batchable(publication) -> bool:
    op = OPERATIONS.get(publication.operation)
    return (
        op is not None
        and op.fire_and_forget
        and publication.lane is None
        and publication.routing_key == op.routing_key
        and len(publication.body) <= batches.CLIENT_ITEM_BYTES
    )


class Batching:
    """Whether batches are sent now, and the grouping (I/O thread, under the
    link's lock where the client says so)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._paused_until = 0.0
        self.pause = PAUSE_AFTER_RETURN
        #: published and not yet confirmed, by message_id (for a return)
        self.in_flight: dict[str, Batch] = {}

    @property
    def on(self) -> bool:
        return self.enabled and time.monotonic() >= self._paused_until

    def grouped(self, publications) -> list:
        """``publications`` in order, runs of batchable ones as ``Batch``es."""
        if not self.on or len(publications) < 2:
            return list(publications)
        out: list = []
        run: list = []
        start = size = len(batches.BATCH_MAGIC)

        def close_run() -> None:
            if len(run) > 1:
                out.append(Batch(run[0].operation, list(run), run[0].exchange))
            else:
                out.extend(run)

        for publication in publications:
            more = batches.item_size(publication.message_id, publication.body)
            fits = (
                run
                and publication.operation == run[0].operation
                and publication.exchange == run[0].exchange
                and len(run) < batches.CLIENT_ITEMS
                and size + more <= batches.CLIENT_BYTES
            )
            if fits and _batchable(publication):
                run.append(publication)
                size += more
                continue
            close_run()
            run, size = [], start
            if _batchable(publication):
                run, size = [publication], start + more
            else:
                out.append(publication)
        close_run()
        return out

    def returned(self, batch: Batch) -> bool:
        """``batch`` came back unroutable: no batches for a while. True the first
        time (the caller then sends everything unconfirmed again, in order, on a new
        channel: later requests may have gone alone before the return came)."""
        first = not batch.returned and self.on
        batch.returned = True
        if first:
            self._paused_until = time.monotonic() + self.pause
            self.pause = min(self.pause * 2, PAUSE_MAX)
        return first

    def paused_for(self) -> float:
        """Seconds left of the pause (0 when batches go)."""
        return max(0.0, self._paused_until - time.monotonic())

    def confirmed(self, batch: Batch) -> None:
        """``batch`` got through: a later return pauses batches for the shortest time."""
        if not batch.returned:
            self.pause = PAUSE_AFTER_RETURN

    def refused(self, reply_text: str) -> bool:
        """The broker closed the channel with ``reply_text`` (a 403): True if it
        refused a batch's routing key, and batches are then off for good."""
        # RabbitMQ: "ACCESS_REFUSED - write access to topic 'batch.insert' in exchange ..."
        if f"topic '{batches.BATCH_ROUTING_PREFIX}" not in reply_text or not self.enabled:
            return False
        self.enabled = False
        log.warning(
            "the broker refused a batch of fire-and-forget requests (%s): sending "
            "them one by one from now on; let this account publish batch.<op> "
            "(regenerate the broker definitions, docs/security.md) or set "
            "'batches': false",
            reply_text,
        )
        return True
