"""Creating and migrating the schema from the versioned SQL files in ``migrations/``.

Each file ``NNNN_name.sql`` is applied once, in order, and recorded in
``dataspace_schema_version``; the pending ones apply in one transaction. A
transaction-scoped advisory lock serializes workers that start at the same
moment, so several can migrate at once safely; one that finds the work done
applies nothing.

A database made by the decision engine's own SQLAlchemy datasource (tables
taskmanager, dataproduct, header and metadata, and no ``dataspace_schema_version``)
is taken over in place (adoption.py); migration 1 is then recorded as
``initial_adopted``, and 0002 onwards apply as anywhere.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from .adoption import ADOPTED_NAME, PRODUCT_TABLES, SchemaAdoptionError, adopt, is_engine_database

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
    A decision engine's database is adopted first (see ``adopt``).
    """
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
    adopting = is_engine_database(cur, VERSION_TABLE)
    if adopting:
        adopt(cur)
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    applied = []
    if adopting:
        _record(cur, 1, ADOPTED_NAME)
        applied.append(1)
    cur.execute(f"SELECT version FROM {VERSION_TABLE}")
    done = {row[0] for row in cur.fetchall()}
    for migration in migrations():
        if migration.version in done:
            continue
        cur.execute(migration.sql)
        _record(cur, migration.version, migration.name)
        applied.append(migration.version)
    check_unique_indexes(cur)
    return applied


#: the product tables whose (taskmanager_id, generation_id, key) has no valid unique index
_WITHOUT_UNIQUE_TRIPLE = """
SELECT t.name FROM unnest(%s::text[]) AS t(name)
WHERE NOT EXISTS (
    SELECT 1 FROM pg_index i
    WHERE i.indrelid = to_regclass(t.name) AND i.indisunique AND i.indisvalid
      AND i.indnatts = 3 AND i.indpred IS NULL
      AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
           WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
          = ARRAY['generation_id', 'key', 'taskmanager_id']
)
"""


def check_unique_indexes(cur) -> None:
    """Refuse to serve tables without the unique index every write relies on.

    Migration 1 creates them, and a database that lists it has them, unless
    something removed them since: ``pg_restore --clean`` of a backup taken before
    the adoption rebuilds the engine's tables as they were and leaves the
    ``dataspace_*`` tables, so the worker would find "version 1 applied" and
    silently accept duplicate products.
    """
    cur.execute(_WITHOUT_UNIQUE_TRIPLE, (list(PRODUCT_TABLES),))
    missing = [row[0] for row in cur.fetchall()]
    if missing:
        raise SchemaAdoptionError(
            f"table(s) {', '.join(missing)} have no unique index on (taskmanager_id, "
            f"generation_id, key) although {VERSION_TABLE} lists migration 1: if a backup "
            "was restored over this database, drop the tables "
            f"{VERSION_TABLE}, dataspace_request and dataspace_reap and start the worker "
            "again to adopt it anew (docs/migrating.md, 'Roll back')"
        )


def _record(cur, version: int, name: str) -> None:
    cur.execute(
        f"INSERT INTO {VERSION_TABLE} (version, name) VALUES (%s, %s)",
        (version, name),
    )
    log.info("schema migration %04d_%s applied", version, name)


def ensure_database(dsn: str, connect_timeout: int = 5, create: bool = True) -> bool:
    """Connect once; if the DSN's database does not exist and ``create``, create it.
    Return True if created.

    Connects to the server's ``postgres`` database to do so, which needs the
    CREATEDB right; without it, or without ``create``, the original connection
    error stands (a misspelt ``dbname`` must not become a new, empty database
    unless asked).
    """
    import psycopg2
    from psycopg2 import errors, extensions, sql

    try:
        psycopg2.connect(dsn, connect_timeout=connect_timeout).close()
        return False
    except psycopg2.OperationalError as exc:
        name = extensions.parse_dsn(dsn).get("dbname")
        if not create or "does not exist" not in str(exc) or not name or name == "postgres":
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
