"""The retry policy for PostgreSQL connections, in one place.

A transaction that failed because its connection failed was rolled back by the
server, so running it again on a fresh connection is safe.  Backoff is
exponential with jitter and bounded (``MAX_BACKOFF``), and every retry is logged.
In process, callers give up after ``timeout`` seconds with
DataSpaceConnectionError; the worker retries until the database returns or the
worker is told to stop (its requests stay unacked and are redelivered).
"""

from __future__ import annotations

import logging
import threading

import psycopg2
import tenacity

from . import metrics

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0


#: SQLSTATEs a retry can cure: connection exceptions (class 08), the server
#: shutting down or starting (57P01-57P03), deadlocks and serialization failures.
RETRYABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01"})


#: what libpq says when the server's certificate does not verify (another CA, another
#: host name under sslmode=verify-full) or the root certificate cannot be read:
#: configuration, which retrying cannot cure
TLS_REFUSALS = (
    "certificate verify failed",
    "does not match host name",
    "root certificate file",
    "sslmode value",
)


#: what libpq or the server says when it refuses this client for good, and what to
#: fix. libpq gives no SQLSTATE for a failed connection: its words are all there is
#: (the server's are in its lc_messages language; English is the default, and an
#: unrecognised refusal is retried like an outage, as before).
REFUSALS = (
    ("password authentication failed", "check the user and password in pg_dsn"),
    ("no password supplied", "give the password in pg_dsn, PGPASSWORD or ~/.pgpass"),
    ("authentication failed", "check the user and the server's pg_hba.conf method"),
    ("does not exist", None),  # a role or a database: told apart below
    ("no pg_hba.conf entry", "allow this host, user and database in the server's pg_hba.conf"),
    ("is not permitted to log in", "grant LOGIN to the role, or use another in pg_dsn"),
    (
        "server does not support SSL",
        "the server offers no TLS: enable ssl on it, or lower sslmode in pg_dsn",
    ),
    ("permission denied for database", "GRANT CONNECT ON DATABASE to the role in pg_dsn"),
)


def refusal(exc: BaseException) -> str | None:
    """One line saying why the server refused the connection and what to fix, when
    retrying cannot help; None for an outage (refused port, timeout, starting up)."""
    if not isinstance(exc, psycopg2.OperationalError) or exc.pgcode is not None:
        return None
    text = " ".join(str(exc).split())
    said = text.split("failed: ", 1)[-1]  # after libpq's "connection to server at ..."
    if is_tls_refusal(exc):
        return f"the server's certificate was refused: {said} (check sslrootcert and the host)"
    for marker, fix in REFUSALS:
        if marker not in text:
            continue
        if fix is None:
            if "database" in text and "role" not in text:
                fix = (
                    "create it (createdb), correct dbname in pg_dsn, or start with "
                    "--create-database (DATASPACE_CREATE_DATABASE=1)"
                )
            else:
                fix = "create the role, or correct user in pg_dsn"
        return f"the database server refused the connection: {said} ({fix})"
    return None


def is_tls_refusal(exc: BaseException) -> bool:
    """A connection refused over the server's certificate (see TLS_REFUSALS)."""
    return isinstance(exc, psycopg2.OperationalError) and any(
        marker in str(exc) for marker in TLS_REFUSALS
    )


def is_connection_error(exc: BaseException) -> bool:
    """Errors after which the transaction may be retried on a fresh connection.

    A lost or refused connection comes without SQLSTATE (or in class 08);
    statement timeouts, full disks, bad passwords and the like are not
    retried: they come back the same.
    """
    if isinstance(exc, psycopg2.InterfaceError):
        return True
    if not isinstance(exc, psycopg2.OperationalError) or is_tls_refusal(exc):
        return False
    code = exc.pgcode
    return code is None or code.startswith("08") or code in RETRYABLE_SQLSTATES


def _log_retry(state: tenacity.RetryCallState) -> None:
    metrics.DB_RETRIES.inc()
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "database unavailable (attempt %d, %.1fs so far): %s; retrying in %.2fs",
        state.attempt_number,
        state.seconds_since_start or 0.0,
        str(exc).strip().splitlines()[0] if exc and str(exc).strip() else type(exc).__name__,
        state.upcoming_sleep,
    )


def connection_retry(
    timeout: float | None, stop_event: threading.Event | None = None
) -> tenacity.Retrying:
    """A tenacity.Retrying for database work: ``timeout`` None means until ``stop_event``."""
    stop = tenacity.stop_never
    if timeout is not None:
        stop = tenacity.stop_after_delay(timeout)
    if stop_event is not None:
        stop = stop | tenacity.stop_when_event_set(stop_event)
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_connection_error),
        wait=tenacity.wait_exponential(multiplier=INITIAL_BACKOFF, max=MAX_BACKOFF)
        + tenacity.wait_random(0, INITIAL_BACKOFF),
        stop=stop,
        before_sleep=_log_retry,
        sleep=stop_event.wait if stop_event is not None else tenacity.nap.sleep,
        reraise=True,
    )
