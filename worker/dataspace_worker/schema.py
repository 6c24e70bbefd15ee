"""Creating and migrating the schema from the versioned SQL files in ``migrations/``.

Each file ``NNNN_name.sql`` is applied once, in order, and recorded in
``dataspace_schema_version``; the pending ones apply in one transaction. A
transaction-scoped advisory lock serializes workers that start at the same
moment, so several can migrate at once safely; one that finds the work done
applies nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

log = logging.getLogger(__name__)

VERSION_TABLE = "dataspace_schema_version"
#: any constant shared by all workers; "dsp" + "schema" in ASCII
ADVISORY_LOCK_KEY = 0x6473_7073_6368_656D & 0x7FFF_FFFF_FFFF_FFFF
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("dataspace_worker").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..N without gaps, found {versions}")
    return found


def migrate(cur) -> list[int]:
    """Bring the schema up to date in the caller's transaction; return the versions applied.

    The advisory lock makes concurrent migrators wait for each other; the second
    finds the work done.  All pending migrations commit together or not at all.
    """
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    cur.execute(f"SELECT version FROM {VERSION_TABLE}")
    done = {row[0] for row in cur.fetchall()}
    applied = []
    for migration in migrations():
        if migration.version in done:
            continue
        cur.execute(migration.sql)
        cur.execute(
            f"INSERT INTO {VERSION_TABLE} (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
        log.info("schema migration %04d_%s applied", migration.version, migration.name)
        applied.append(migration.version)
    return applied


def ensure_database(dsn: str, connect_timeout: int = 5) -> bool:
    """Create the DSN's database if it does not exist yet; return True if created.

    Connects to the server's ``postgres`` database to do so, which needs the
    CREATEDB right; without it the original connection error stands.
    """
    import psycopg2
    from psycopg2 import errors, extensions, sql

    try:
        psycopg2.connect(dsn, connect_timeout=connect_timeout).close()
        return False
    except psycopg2.OperationalError as exc:
        name = extensions.parse_dsn(dsn).get("dbname")
        if "does not exist" not in str(exc) or not name or name == "postgres":
            raise
    admin = psycopg2.connect(
        extensions.make_dsn(dsn, dbname="postgres"), connect_timeout=connect_timeout
    )
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        log.info("created database %s", name)
        return True
    except errors.DuplicateDatabase:
        return False
    finally:
        admin.close()
