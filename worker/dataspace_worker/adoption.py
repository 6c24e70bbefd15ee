"""Taking a decision engine's database over in place (``schema.migrate`` calls
``adopt`` when it finds the engine's four tables and no version table).

The engine's tables are checked against what this package's SQL needs (columns,
types, defaults, the cascading foreign keys, no duplicate product triple), locked
in SHARE mode, and given what migration 0001 would have given them
(``migrations/adopt_engine.sql``: indexes, the datestamp check) without
rewriting a row. What cannot be taken over raises SchemaAdoptionError, one line
saying what was found and what to do, and the caller's transaction rolls back.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg2.errors

from dataspace_core import validate
from dataspace_core.errors import DataSpaceConfigurationError

log = logging.getLogger("dataspace_worker.schema")


class SchemaAdoptionError(DataSpaceConfigurationError):
    """The database holds tables this package cannot take over as they are.

    The message is one line: what was found, and what to do about it. Nothing
    was changed (the migration's transaction rolled back).
    """


#: the name migration 1 is recorded under when the engine's tables were adopted
ADOPTED_NAME = "initial_adopted"
#: the tables of the engine's schema this package uses (the engine's "schema" table it does not)
ENGINE_TABLES = ("taskmanager", "dataproduct", "header", "metadata")
#: how long adopting waits for each of its table locks before giving up (see adopt)
ADOPT_LOCK_TIMEOUT = "60s"

_INTEGER = ("bigint", "integer")
_TEXT = ("text", "character varying")
_TIMESTAMP = ("timestamp with time zone", "timestamp without time zone")
_ID = (_INTEGER, "default")  # filled by the table itself: this package never writes it

#: what this package's SQL (sql.py) needs of each table: column -> (accepted types,
#: "default" when it must fill itself in, "nullable" when this package writes NULL there)
NEEDED_COLUMNS: dict[str, dict[str, tuple[tuple[str, ...], str | None]]] = {
    "taskmanager": {
        "sequence_id": _ID,
        "taskmanager_id": (_TEXT, None),
        "name": (_TEXT, None),
        "datestamp": (_TIMESTAMP, None),
    },
    "dataproduct": {
        "id": _ID,
        "taskmanager_id": (_INTEGER, None),
        "generation_id": (_INTEGER, None),
        "key": (_TEXT, None),
        "value": (("bytea",), None),
    },
    "header": {
        "id": _ID,
        "taskmanager_id": (_INTEGER, None),
        "generation_id": (_INTEGER, None),
        "key": (_TEXT, None),
        "create_time": (("bigint",), None),
        "expiration_time": (("bigint",), None),
        "scheduled_create_time": (("bigint",), None),
        "creator": (_TEXT, None),
        "schema_id": (_INTEGER, "nullable"),
    },
    "metadata": {
        "id": _ID,
        "taskmanager_id": (_INTEGER, None),
        "generation_id": (_INTEGER, None),
        "key": (_TEXT, None),
        "state": (_TEXT, None),
        "generation_time": (("bigint",), None),
        "missed_update_count": (_INTEGER, None),
    },
}

_TABLES_PRESENT = """
SELECT table_name FROM information_schema.tables
WHERE table_schema = current_schema() AND table_name = ANY(%s)
"""

_COLUMNS = """
SELECT table_name, column_name, data_type, character_maximum_length, is_nullable = 'YES',
       column_default IS NOT NULL OR is_identity = 'YES' OR is_generated <> 'NEVER'
FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = ANY(%s)
"""

# The tables whose taskmanager_id references taskmanager (sequence_id) ON DELETE
# CASCADE: deleting a task manager (retention) relies on it to take its rows along.
_CASCADING = """
SELECT child.relname
FROM pg_constraint c
JOIN pg_class child ON child.oid = c.conrelid
JOIN pg_class parent ON parent.oid = c.confrelid
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
JOIN pg_attribute r ON r.attrelid = c.confrelid AND r.attnum = c.confkey[1]
WHERE c.contype = 'f' AND c.confdeltype = 'c' AND cardinality(c.conkey) = 1
  AND child.relnamespace = current_schema()::regnamespace
  AND parent.relnamespace = current_schema()::regnamespace
  AND parent.relname = 'taskmanager' AND r.attname = 'sequence_id'
  AND a.attname = 'taskmanager_id' AND child.relname = ANY(%s)
"""

PRODUCT_TABLES = ("dataproduct", "header", "metadata")


def _refusing(cur) -> str:
    cur.execute("SELECT current_database()")
    return f"refusing to adopt the decision engine's tables in database {cur.fetchone()[0]!r}"


def _duplicates_query(table: str) -> str:
    return (
        f"SELECT taskmanager_id, generation_id, key, count(*) FROM {table}"
        " GROUP BY taskmanager_id, generation_id, key HAVING count(*) > 1"
    )


def is_engine_database(cur, version_table: str) -> bool:
    """Whether this is a decision engine's database, not yet adopted.

    True when the engine's four tables are there and this package's version
    table is not; False for a database this package made, or one without any of
    them. Some of the four without the others is refused.
    """
    cur.execute(_TABLES_PRESENT, ([version_table, *ENGINE_TABLES],))
    present = {row[0] for row in cur.fetchall()}
    if version_table in present or not present:
        return False
    missing = [t for t in ENGINE_TABLES if t not in present]
    if missing:
        found = ", ".join(t for t in ENGINE_TABLES if t in present)
        raise SchemaAdoptionError(
            f"{_refusing(cur)}: found table(s) {found}"
            f" but not {', '.join(missing)}; point the worker at a database holding all four"
            " of the decision engine's tables, or at an empty one"
        )
    return True


def check_adoptable(cur) -> None:
    """Raise SchemaAdoptionError unless the engine's tables have what this package
    needs: every column it reads or writes, of a type it can use, filled in by
    the table where this package leaves it out, and the cascading foreign keys.
    Reads the catalog only; takes no lock on the tables."""
    cur.execute(_COLUMNS, (list(ENGINE_TABLES),))
    columns = {(r[0], r[1]): r[2:] for r in cur.fetchall()}
    problems = []
    for table, needed in NEEDED_COLUMNS.items():
        for column, (types, need) in needed.items():
            if (table, column) not in columns:
                problems.append(
                    f"column {table}.{column} is missing (this worker needs it, {types[0]});"
                    " add it, or point the worker at another database"
                )
                continue
            data_type, length, nullable, fills_itself = columns[table, column]
            shortest = (
                validate.MAX_UUID_CHARS if column == "taskmanager_id" else validate.MAX_TEXT_BYTES
            )
            if data_type not in types or length is not None and length < shortest:
                kind = f"{data_type}({length})" if length is not None else data_type
                wanted = " or ".join(types)
                if "character varying" in types:
                    wanted += f" (at least {shortest} characters)"
                problems.append(
                    f"column {table}.{column} is {kind}, this worker needs {wanted}; it never"
                    " rewrites existing tables: alter the column yourself, or point the worker"
                    " at another database"
                )
            elif need == "default" and not fills_itself:
                problems.append(
                    f"column {table}.{column} has no default; this worker inserts rows without"
                    " it: give it a sequence (as serial columns have) or make it an identity"
                )
            elif need == "nullable" and not nullable:
                problems.append(
                    f"column {table}.{column} is NOT NULL but this worker stores NULL there;"
                    f" ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL"
                )
    for (table, column), (_type, _length, nullable, fills_itself) in sorted(columns.items()):
        if column not in NEEDED_COLUMNS[table] and not nullable and not fills_itself:
            problems.append(
                f"column {table}.{column} is NOT NULL without a default and this worker's"
                " inserts do not set it: give it a default or drop NOT NULL"
            )
    if problems:  # the columns first: a foreign key can only follow them
        raise SchemaAdoptionError(f"{_refusing(cur)}: {'; '.join(problems)}")
    cur.execute(_CASCADING, (list(PRODUCT_TABLES),))
    cascading = {row[0] for row in cur.fetchall()}
    for table in PRODUCT_TABLES:
        if table not in cascading:
            problems.append(
                f"{table}.taskmanager_id has no foreign key to taskmanager (sequence_id)"
                " ON DELETE CASCADE, which deleting old task managers relies on:"
                f" ALTER TABLE {table} ADD FOREIGN KEY (taskmanager_id)"
                " REFERENCES taskmanager (sequence_id) ON DELETE CASCADE"
            )
    if problems:
        raise SchemaAdoptionError(f"{_refusing(cur)}: {'; '.join(problems)}")


def check_unique_triples(cur) -> None:
    """Raise SchemaAdoptionError if a (taskmanager_id, generation_id, key) triple
    occurs more than once in dataproduct, header or metadata: the unique indexes
    this package needs could not be built."""
    found = []
    for table in PRODUCT_TABLES:
        cur.execute(f"SELECT count(*) FROM ({_duplicates_query(table)}) d")
        (count,) = cur.fetchone()
        if count:
            found.append((table, count))
    if found:
        table, count = found[0]
        others = "".join(f", {n} in {t}" for t, n in found[1:])
        raise SchemaAdoptionError(
            f"{_refusing(cur)}: {count} (taskmanager_id, generation_id, key) triple(s) occur more"
            f" than once in {table}{others}, which blocks the unique index this worker needs;"
            f" list them with: {_duplicates_query(table)}; keep one row of each (the engine"
            " wrote the one with the highest id last), delete the others in all three tables,"
            " and start the worker again (docs/migrating.md)"
        )


def adopt(cur) -> None:
    """Take the decision engine's tables over in place, in the caller's transaction.

    Checks them (SchemaAdoptionError if they will not do), locks the four tables
    in SHARE mode (the engine keeps reading; its writes wait for the commit, and
    no duplicate can slip in between the check and the unique indexes), then
    runs ``migrations/adopt_engine.sql``. Each lock is waited for at most
    ``ADOPT_LOCK_TIMEOUT``: a session left idle in a transaction that wrote to
    these tables would otherwise stall the worker, and the engine's writes queued
    behind it, for as long as it stays.
    """
    log.info(
        "found the decision engine's tables (%s) and no dataspace_schema_version:"
        " adopting them in place",
        ", ".join(ENGINE_TABLES),
    )
    check_adoptable(cur)
    cur.execute(f"SET LOCAL lock_timeout = '{ADOPT_LOCK_TIMEOUT}'")
    try:
        # The engine's order: a task manager first, then its products' rows.
        cur.execute("LOCK TABLE taskmanager, dataproduct, header, metadata IN SHARE MODE")
        check_unique_triples(cur)
        cur.execute(_read_migration("adopt_engine.sql"))
    except psycopg2.errors.LockNotAvailable:
        raise SchemaAdoptionError(
            f"could not lock the decision engine's tables within {ADOPT_LOCK_TIMEOUT} to adopt"
            " them: other sessions hold them (look for ones idle in transaction: SELECT pid,"
            " state, xact_start, query FROM pg_stat_activity WHERE datname ="
            " current_database()); nothing was changed, start the worker again"
        ) from None
    cur.execute("SET LOCAL lock_timeout TO DEFAULT")
    _validate_datestamp_range(cur)


def _validate_datestamp_range(cur) -> None:
    """Validate the datestamp check added NOT VALID, unless an old row breaks it.

    The engine writes now() or datetime.now(), always in range, and taskmanager
    has a row per task manager start: validating is a short scan of a small
    table, under the lock already held, and leaves the constraint as 0001 makes
    it. An out-of-range row (written by hand?) must not block the adoption: the
    check then stays NOT VALID (new rows are checked all the same) and a warning
    says how to find the rows.
    """
    cur.execute("SAVEPOINT dataspace_validate")
    try:
        cur.execute("ALTER TABLE taskmanager VALIDATE CONSTRAINT taskmanager_datestamp_range")
    except psycopg2.errors.CheckViolation:
        cur.execute("ROLLBACK TO SAVEPOINT dataspace_validate")
        log.warning(
            "taskmanager holds datestamps outside what Python can read; the check"
            " taskmanager_datestamp_range stays NOT VALID (new rows are checked). Find them"
            " with: SELECT * FROM taskmanager WHERE NOT (datestamp >= '0001-01-02' AND"
            " datestamp < '9999-12-31'); fix them, then ALTER TABLE taskmanager VALIDATE"
            " CONSTRAINT taskmanager_datestamp_range"
        )
    cur.execute("RELEASE SAVEPOINT dataspace_validate")


def _read_migration(name: str) -> str:
    return resources.files("dataspace_worker").joinpath("migrations", name).read_text("utf-8")
