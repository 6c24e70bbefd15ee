"""Retention: the reaper consumer and the schedule that lives in the broker.

The schedule is one message waiting in ``dataspace.reaper.schedule``, a queue no
one consumes. Its per-message TTL is the run interval; when it expires the
broker dead-letters it, with routing key ``admin.reap``, into the reaper queue.
The queue holds at most one message (``x-max-length: 1`` with
``reject-publish``), so however many workers try to arm it, one run is pending;
after an outage at most one overdue reap is waiting, never a burst. The
schedule survives restarts of every worker: it is a persistent message in a
durable queue, and its expiry time is visible in the management UI (message
properties ``timestamp`` + ``expiration``, header ``x-dataspace-next-reap-at``).

The reaper queue has a single active consumer, so one reap runs at a time
across all workers. The consumer that runs a scheduled reap arms the next one;
every worker also tries to arm it at start and every minute, which heals a
schedule lost with a broker node.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid

import pika
from pika.exceptions import AMQPError, NackError, UnroutableError

from dataspace_client.protocol import (
    CONTENT_TYPE,
    OPERATIONS,
    PROTOCOL_VERSION,
    SCHEDULE_QUEUE,
    VERSION_HEADER,
    encode_request,
)

from .dispatch import Dispatcher, Outcome

log = logging.getLogger(__name__)

#: Floors that user configuration cannot go below (the seed's Reaper minimums).
#: Tests lower them in-process; no setting, flag or variable reaches them.
MIN_RETENTION_DAYS = 7
MIN_INTERVAL = 2 * 60 * 59

SCHEDULED_HEADER = "x-dataspace-scheduled"
NEXT_REAP_HEADER = "x-dataspace-next-reap-at"


class Schedule:
    """Arms the next scheduled reap: publishes the pending message if none is."""

    def __init__(self, params: pika.URLParameters, retention_days: float, interval: float):
        self.params = params
        self.retention_days = retention_days
        self.interval = interval

    def arm(self) -> bool:
        """Publish the next run; False when one is pending already (the broker refuses)."""
        now = time.time()
        body = encode_request(OPERATIONS["reap"], {"days": self.retention_days})
        next_at = dt.datetime.fromtimestamp(now + self.interval, dt.timezone.utc)
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=uuid.uuid4().hex,
            type="reap",
            app_id="dataspace-worker schedule",
            timestamp=int(now),
            expiration=str(int(self.interval * 1000)),
            headers={
                VERSION_HEADER: PROTOCOL_VERSION,
                SCHEDULED_HEADER: True,
                NEXT_REAP_HEADER: next_at.isoformat(timespec="seconds"),
            },
        )
        connection = pika.BlockingConnection(self.params)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", SCHEDULE_QUEUE, body, properties, mandatory=True)
        except NackError:
            return False
        except UnroutableError:
            log.error("queue %s is missing: cannot schedule reaps", SCHEDULE_QUEUE)
            return False
        finally:
            if connection.is_open:
                connection.close()
        log.info("next reap scheduled at %s", next_at.isoformat(timespec="seconds"))
        return True

    def try_arm(self) -> None:
        try:
            self.arm()
        except (AMQPError, OSError) as exc:
            log.warning("could not arm the reap schedule: %s", str(exc) or type(exc).__name__)


class ReaperDispatcher:
    """Handles retention messages: a batched reap, then, if it was scheduled, the next one."""

    def __init__(self, datasource, schedule: Schedule | None, max_body: int):
        self.dispatcher = Dispatcher(datasource, max_body, operations=["reap"])
        self.schedule = schedule

    def handle(self, body, message_id=None, content_type=None, headers=None) -> Outcome:
        outcome = self.dispatcher.handle(body, message_id, content_type)
        scheduled = bool((headers or {}).get(SCHEDULED_HEADER))
        if scheduled and not outcome.retry and self.schedule is not None:
            self.schedule.try_arm()
        return outcome
