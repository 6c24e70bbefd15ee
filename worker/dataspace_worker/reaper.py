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
every worker also tries to arm it at start and every minute (nothing is
published while one is pending), which restores a schedule message that was
purged or lost. Arming that finds a run pending is the normal case: it logs at
DEBUG, except a worker's first attempt, which says at INFO what it found.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker, NackError, UnroutableError

from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.protocol import (
    CONTENT_TYPE,
    OPERATIONS,
    PROTOCOL_VERSION,
    SCHEDULE_QUEUE,
    VERSION_HEADER,
    ProtocolError,
    encode_request,
    encode_result,
)

from .dispatch import Dispatcher, Outcome, Request
from .logs import Throttle, printable

log = logging.getLogger(__name__)

#: Floors that user configuration cannot go below (the seed's Reaper minimums).
#: Tests lower them in-process; no setting, flag or variable reaches them.
MIN_RETENTION_DAYS = 7
MIN_INTERVAL = 2 * 60 * 59

SCHEDULED_HEADER = "x-dataspace-scheduled"
#: "claims to be the scheduled one" lines: a maintainer's flood is a few lines
CLAIM_LINES = Throttle(window=10.0, burst=5)
NEXT_REAP_HEADER = "x-dataspace-next-reap-at"


class _ScheduleMissing(Exception):
    """The schedule queue does not exist (deleted by hand, or a node lost it)."""


class _ExpectedNack(logging.Filter):
    """Drops pika's "Message was Nack'ed by broker" WARNING for a schedule publish
    made by ``Schedule`` on this very thread: that refusal means "armed already",
    the normal case, which ``Schedule`` logs itself at DEBUG. Any other nack, of any
    other publish or thread, is still logged by pika as before."""

    def __init__(self):
        super().__init__()
        self.threads: set[int] = set()  # idents of threads publishing the schedule now

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.thread in self.threads
            and isinstance(record.msg, str)
            and record.msg.startswith("Message was Nack'ed by broker")
            and isinstance(args, tuple)
            and len(args) > 3
            and args[3] == SCHEDULE_QUEUE
        )


EXPECTED_NACK = _ExpectedNack()
# pika's BlockingChannel.basic_publish logs the nack on its module's logger; a
# logger's filter sees only that logger's own records
logging.getLogger("pika.adapters.blocking_connection").addFilter(EXPECTED_NACK)


class Schedule:
    """Arms the next scheduled reap: publishes the pending message if none is.

    Each attempt first asks the broker how many messages the schedule queue holds
    (a passive declare) and publishes only when it is empty. So the steady state,
    a run pending and every worker trying every minute, publishes nothing and
    provokes no refusal (a refused publish is a nack, which pika logs as a
    WARNING). The check is not what keeps one run pending: two workers can both
    find the queue empty (at a fleet's first start, or right after a run left the
    queue) and both publish; the queue's ``x-max-length: 1`` with
    ``reject-publish`` still takes one and nacks the other, as before. That nack is
    expected too, and EXPECTED_NACK keeps pika from logging it.
    """

    def __init__(
        self,
        urls: str | list[str],
        retention_days: float,
        interval: float,
        queue_arguments: dict | None = None,
        connection_name: str = "dataspace-worker schedule",
    ):
        """``urls``: one broker's, or a cluster's nodes' (tried in order);
        ``connection_name``: how the management UI names its short connections.
        Raises ValueError for a URL that cannot be used."""
        # a broker under a resource alarm must not hold the reaper here
        addresses = broker_addresses(
            urls, name=connection_name, connect_timeout=10, blocked_timeout=30
        )
        self.params = addresses.params
        self.retention_days = retention_days
        self.interval = interval
        self.queue_arguments = queue_arguments
        #: the account the schedule message is published as (its ``user_id``, which
        #: the broker checks): what makes a scheduled reap trusted (ReaperDispatcher)
        self.user = addresses.user
        #: whether an attempt got as far as the broker's answer: the first one logs
        #: at INFO (a worker's start-up says whether it armed the schedule), the
        #: following ones, every minute and after each run, at DEBUG
        self._reported = False

    def arm(self, redeclare: bool = True) -> bool:
        """Publish the next run; False when one is pending already.

        If the schedule queue was deleted, declare it again (once) and retry.
        """
        connection = pika.BlockingConnection(self.params)
        try:
            pending = self._pending(connection)
            published = False if pending else self._publish(connection)
        except _ScheduleMissing:
            if not redeclare or self.queue_arguments is None:
                log.error("queue %s is missing: cannot schedule reaps", SCHEDULE_QUEUE)
                return False
            log.warning("queue %s was missing: declaring it again", SCHEDULE_QUEUE)
            channel = connection.channel()
            channel.queue_declare(SCHEDULE_QUEUE, durable=True, arguments=self.queue_arguments)
            return self.arm(redeclare=False)
        finally:
            if connection.is_open:
                connection.close()
        level = logging.DEBUG if self._reported else logging.INFO
        self._reported = True
        if published:
            log.log(level, "next reap scheduled at %s", published)
        else:
            log.log(level, "a reap is scheduled already (pending in %s)", SCHEDULE_QUEUE)
        return bool(published)

    @staticmethod
    def _pending(connection) -> int:
        """Messages waiting in the schedule queue (0 or 1)."""
        try:
            declared = connection.channel().queue_declare(SCHEDULE_QUEUE, passive=True)
        except ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise _ScheduleMissing from exc
            raise
        return declared.method.message_count

    def _publish(self, connection) -> str | None:
        """Publish the next run; its time (ISO), or None if the queue refused it."""
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
            user_id=self.user,
            expiration=str(int(self.interval * 1000)),
            headers={
                VERSION_HEADER: PROTOCOL_VERSION,
                SCHEDULED_HEADER: True,
                NEXT_REAP_HEADER: next_at.isoformat(timespec="seconds"),
            },
        )
        channel = connection.channel()
        channel.confirm_delivery()
        thread = threading.get_ident()
        EXPECTED_NACK.threads.add(thread)
        try:
            channel.basic_publish("", SCHEDULE_QUEUE, body, properties, mandatory=True)
        except NackError:
            return None  # another worker armed it since _pending looked
        except UnroutableError as exc:
            raise _ScheduleMissing from exc  # deleted since _pending looked
        finally:
            EXPECTED_NACK.threads.discard(thread)
        return next_at.isoformat(timespec="seconds")

    def try_arm(self) -> None:
        try:
            self.arm()
        except (AMQPError, OSError) as exc:
            log.warning("could not arm the reap schedule: %s", str(exc) or type(exc).__name__)


class ReaperDispatcher:
    """Handles retention messages: a batched reap, then, if it was scheduled, the next one.

    A scheduled message runs with *this* worker's retention (the one in its body
    is what the arming worker had: retention may have been raised or turned off
    since), and is skipped when this worker has no retention or when a reap
    finished less than half an interval ago (scheduled messages that piled up in
    the reaper queue while the reaper was blocked run once, not back to back).
    Every reap's ``days`` must be at least MIN_RETENTION_DAYS.
    """

    def __init__(
        self,
        datasource,
        schedule: Schedule | None,
        max_body: int,
        service_user: str | None = None,
    ):
        """``service_user``: the workers' broker account, the one the schedule's
        messages are published as (default: ``schedule``'s)."""
        self.datasource = datasource
        self.service_user = service_user or (schedule.user if schedule else None)
        self.dispatcher = Dispatcher(
            datasource, max_body, operations=["reap"], checks={"reap": check_days}
        )
        self.schedule = schedule

    def handle(self, body, message_id=None, content_type=None, headers=None) -> Outcome:
        return self.handle_batch([Request(body, message_id, content_type, headers)])[0]

    def handle_batch(self, requests: list[Request]) -> list[Outcome]:
        return [self.handle_request(request) for request in requests]

    def handle_request(self, request: Request) -> Outcome:
        scheduled = self._scheduled(request)
        body = request.body
        if scheduled:
            skip = self._skip_reason()
            if skip:
                # normal (retention off here, or runs that piled up): not above DEBUG
                log.debug("scheduled reap skipped: %s", skip)
                self._arm()
                result = {"taskmanagers": 0, "dataproducts": 0, "batches": 0, "seconds": 0.0}
                reply = encode_result(OPERATIONS["reap"], {**result, "skipped": True})
                return Outcome(reply, "ok", "reap")
            body = encode_request(OPERATIONS["reap"], {"days": self.schedule.retention_days})
            request = Request(body, request.message_id, CONTENT_TYPE, None, request.routing_key)
        outcome = self.dispatcher.handle_request(request)
        if scheduled and not outcome.retry:
            self._arm()
        return outcome

    def _scheduled(self, request: Request) -> bool:
        """Whether this is the schedule's message, which runs with this worker's own
        retention: flagged, published by the service's account (the broker checks
        ``user_id``) and dead-lettered by the schedule queue's expiry. A client's
        flag alone makes it an ordinary reap, its ``days`` checked as any other's."""
        headers = request.headers or {}
        if not headers.get(SCHEDULED_HEADER):
            return False
        deaths = headers.get("x-death")
        first = deaths[0] if isinstance(deaths, list) and deaths else {}
        trusted = (
            self.service_user is not None
            and request.user_id == self.service_user
            and isinstance(first, dict)
            and first.get("queue") == SCHEDULE_QUEUE
            and first.get("reason") == "expired"
        )
        if not trusted:
            allowed, left_out = CLAIM_LINES.allow()
            if allowed:
                log.warning(
                    "reap %s claims to be the scheduled one but was not published by the "
                    "schedule (user_id %s): run as a requested reap%s",
                    printable(request.message_id),
                    printable(request.user_id),
                    f" ({left_out} more not logged)" if left_out else "",
                )
        return trusted

    def _skip_reason(self) -> str | None:
        if self.schedule is None:
            return "retention_days is 0 on this worker"
        age = self.datasource.seconds_since_last_reap()
        if age is not None and age < self.schedule.interval / 2:
            return f"the last reap finished {age:.1f} s ago (interval {self.schedule.interval:g} s)"
        return None

    def _arm(self) -> None:
        if self.schedule is not None:
            self.schedule.try_arm()


def check_days(operation: str, args: dict) -> None:
    """A retention below the floor is refused here too, not only by clients: on the
    decoded arguments, so a framed body is checked as a JSON one is."""
    days = args.get("days")
    number = isinstance(days, (int, float)) and not isinstance(days, bool)
    if number and not days >= MIN_RETENTION_DAYS:  # NaN too
        raise ProtocolError(f"{operation}: days must be at least {MIN_RETENTION_DAYS}, got {days}")
