"""The data statements: every SQL statement an operation runs on the DataSpace
tables, in one place. All take parameters; none is built from caller input.

The request log's statements are in idempotency.py, the migrations' in
migrations/*.sql, adoption's checks in adoption.py, the reap's lock in reaping.py."""

STORE_TASKMANAGER = """
INSERT INTO taskmanager (name, taskmanager_id, datestamp)
VALUES (%(taskmanager_name)s, %(taskmanager_id)s, coalesce(%(datestamp)s::timestamptz, now()))
RETURNING sequence_id
"""

# datestamp is timestamptz in a database this package made, but timestamp without
# time zone (the engine's naive local time) in one adopted from the decision engine
# (migrations/adopt_engine.sql): the cast gives callers an aware datetime from both
# (read in the session's TimeZone; a no-op on timestamptz). Comparisons with
# timestamptz parameters below need no cast: PostgreSQL converts the column the same way.
_TASKMANAGER_COLUMNS = "sequence_id, taskmanager_id, name, datestamp::timestamptz AS datestamp"

GET_TASKMANAGER = f"""
SELECT {_TASKMANAGER_COLUMNS} FROM taskmanager
WHERE name = %(taskmanager_name)s
  AND (%(taskmanager_id)s::text IS NULL OR taskmanager_id = %(taskmanager_id)s)
ORDER BY sequence_id DESC
LIMIT 1
"""

GET_TASKMANAGERS = f"""
SELECT {_TASKMANAGER_COLUMNS} FROM taskmanager
WHERE (%(taskmanager_name)s::text IS NULL OR name = %(taskmanager_name)s)
  AND (%(start_time)s::timestamptz IS NULL OR datestamp >= %(start_time)s::timestamptz)
  AND (%(end_time)s::timestamptz IS NULL OR datestamp <= %(end_time)s::timestamptz)
ORDER BY datestamp, sequence_id
"""

GET_LAST_GENERATION_ID = """
SELECT max(dp.generation_id)
FROM dataproduct dp JOIN taskmanager tm ON tm.sequence_id = dp.taskmanager_id
WHERE tm.name = %(taskmanager_name)s
  AND (%(taskmanager_id)s::text IS NULL OR tm.taskmanager_id = %(taskmanager_id)s)
"""

# The header and metadata rows of one product, from the product's parameters.
_HEADER_AND_METADATA = """h AS (
    INSERT INTO header (taskmanager_id, generation_id, key, create_time, expiration_time,
                        scheduled_create_time, creator, schema_id)
    VALUES (%(taskmanager_id)s, %(generation_id)s, %(key)s, %(create_time)s,
            %(expiration_time)s, %(scheduled_create_time)s, %(creator)s, %(schema_id)s)
)
INSERT INTO metadata (taskmanager_id, generation_id, key, state, generation_time,
                      missed_update_count)
VALUES (%(taskmanager_id)s, %(generation_id)s, %(key)s, %(state)s, %(generation_time)s,
        %(missed_update_count)s)
"""

# One statement, one round trip: the three rows go in together or not at all.
INSERT = f"""
WITH p AS (
    INSERT INTO dataproduct (taskmanager_id, generation_id, key, value)
    VALUES (%(taskmanager_id)s, %(generation_id)s, %(key)s, %(value)s)
), {_HEADER_AND_METADATA}"""

# Many inserts in one statement (psycopg2.extras.execute_values fills VALUES %s with
# rows shaped by INSERT_MANY_ROW); rows keep their order, so ids stay in insertion order.
INSERT_MANY = """
WITH v (taskmanager_id, generation_id, key, value, create_time, expiration_time,
        scheduled_create_time, creator, schema_id, state, generation_time,
        missed_update_count) AS (VALUES %s),
p AS (
    INSERT INTO dataproduct (taskmanager_id, generation_id, key, value)
    SELECT taskmanager_id, generation_id, key, value FROM v
), h AS (
    INSERT INTO header (taskmanager_id, generation_id, key, create_time, expiration_time,
                        scheduled_create_time, creator, schema_id)
    SELECT taskmanager_id, generation_id, key, create_time, expiration_time,
           scheduled_create_time, creator, schema_id FROM v
)
INSERT INTO metadata (taskmanager_id, generation_id, key, state, generation_time,
                      missed_update_count)
SELECT taskmanager_id, generation_id, key, state, generation_time, missed_update_count FROM v
"""
# Numbers in parentheses before their cast: psycopg2 writes -9223372036854775808
# as it is, and "-9223372036854775808::bigint" casts before it negates (out of range).
INSERT_MANY_ROW = (
    "((%(taskmanager_id)s)::bigint, (%(generation_id)s)::bigint, %(key)s::text,"
    " %(value)s::bytea, (%(create_time)s)::bigint, (%(expiration_time)s)::bigint,"
    " (%(scheduled_create_time)s)::bigint, %(creator)s::text, (%(schema_id)s)::bigint,"
    " %(state)s::text, (%(generation_time)s)::bigint, (%(missed_update_count)s)::integer)"
)

# Inserts and their idempotency claims (idempotency.py) in one statement, run
# without a transaction around it (autocommit): one round trip where a claim, an
# insert and BEGIN and COMMIT took four. A row whose message_id is claimed already
# (a replay) writes nothing; the statement returns the ids it claimed. Every row
# is written in its batch order (n), as INSERT_MANY keeps it. Each parameter is an
# array, one element a request: one prepared statement (prepared.py) for a batch
# of any size.
CLAIMED_INSERTS_COLUMNS = (
    ("n", "integer"),
    ("message_id", "text"),
    ("operation", "text"),
    ("reply", "bytea"),
    ("taskmanager_id", "bigint"),
    ("generation_id", "bigint"),
    ("key", "text"),
    ("value", "bytea"),
    ("create_time", "bigint"),
    ("expiration_time", "bigint"),
    ("scheduled_create_time", "bigint"),
    ("creator", "text"),
    ("schema_id", "bigint"),
    ("state", "text"),
    ("generation_time", "bigint"),
    ("missed_update_count", "integer"),
)
CLAIMED_INSERTS = f"""
WITH v AS (
    SELECT * FROM unnest({", ".join(f"%({c})s::{t}[]" for c, t in CLAIMED_INSERTS_COLUMNS)})
    AS v ({", ".join(c for c, _ in CLAIMED_INSERTS_COLUMNS)})
),
c AS (
    INSERT INTO dataspace_request (message_id, operation, reply)
    SELECT message_id, operation, reply FROM v ORDER BY n
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
w AS (SELECT * FROM v WHERE message_id IN (SELECT message_id FROM c)),
p AS (
    INSERT INTO dataproduct (taskmanager_id, generation_id, key, value)
    SELECT taskmanager_id, generation_id, key, value FROM w ORDER BY n
), h AS (
    INSERT INTO header (taskmanager_id, generation_id, key, create_time, expiration_time,
                        scheduled_create_time, creator, schema_id)
    SELECT taskmanager_id, generation_id, key, create_time, expiration_time,
           scheduled_create_time, creator, schema_id FROM w ORDER BY n
), m AS (
    INSERT INTO metadata (taskmanager_id, generation_id, key, state, generation_time,
                          missed_update_count)
    SELECT taskmanager_id, generation_id, key, state, generation_time, missed_update_count
    FROM w ORDER BY n
)
SELECT message_id FROM c
"""

# A large value goes in through COPY (copy_rows.py); its header and metadata after it.
COPY_PRODUCT = (
    "COPY dataproduct (taskmanager_id, generation_id, key, value) FROM STDIN (FORMAT binary)"
)
INSERT_HEADER_METADATA = f"WITH {_HEADER_AND_METADATA}"
# Binary COPY sends each integer at its column's own width: 8 bytes for this
# schema's BIGINT, 4 for the INTEGER generation_id of an adopted engine database.
ID_COLUMN_WIDTHS = """
SELECT attname, typlen FROM pg_attribute JOIN pg_type ON pg_type.oid = atttypid
WHERE attrelid = 'dataproduct'::regclass AND attname IN ('taskmanager_id', 'generation_id')
"""

_WHERE_PRODUCT = (
    "taskmanager_id = %(taskmanager_id)s AND generation_id = %(generation_id)s AND key = %(key)s"
)

UPDATE = f"""
WITH p AS (
    UPDATE dataproduct SET value = %(value)s WHERE {_WHERE_PRODUCT} RETURNING 1
), h AS (
    UPDATE header SET create_time = %(create_time)s, expiration_time = %(expiration_time)s,
        scheduled_create_time = %(scheduled_create_time)s, creator = %(creator)s,
        schema_id = %(schema_id)s
    WHERE {_WHERE_PRODUCT} RETURNING 1
), m AS (
    UPDATE metadata SET state = %(state)s, generation_time = %(generation_time)s,
        missed_update_count = %(missed_update_count)s
    WHERE {_WHERE_PRODUCT} RETURNING 1
)
SELECT (SELECT count(*) FROM p), (SELECT count(*) FROM h), (SELECT count(*) FROM m)
"""

# The value when it is small, else only its size (known from its TOAST pointer,
# without reading it): a large one is then read by COPY_VALUE_OUT (copy_rows.py).
# Prepared (prepared.py): the ids cast to bigint, as in an adopted database's
# integer generation_id a value beyond its range is compared, not refused.
GET_SMALL_DATAPRODUCT = """
SELECT CASE WHEN octet_length(value) < %(copy_from)s::integer THEN value END, octet_length(value)
FROM dataproduct WHERE taskmanager_id = %(taskmanager_id)s::bigint
  AND generation_id = %(generation_id)s::bigint AND key = %(key)s::text
"""
COPY_VALUE_OUT = (
    f"COPY (SELECT value FROM dataproduct WHERE {_WHERE_PRODUCT}) TO STDOUT (FORMAT binary)"
)

GET_DATAPRODUCTS = """
SELECT taskmanager_id, generation_id, key, value FROM dataproduct
WHERE taskmanager_id = %(taskmanager_id)s AND (%(key)s::text IS NULL OR key = %(key)s)
ORDER BY id
"""

GET_DATABLOCK = """
SELECT key::text, value FROM dataproduct
WHERE taskmanager_id = %(taskmanager_id)s::bigint AND generation_id = %(generation_id)s::bigint
ORDER BY id
"""

# A datablock's values only when they come to at most %(within)s bytes in all (their
# sizes known from their TOAST pointers, without reading them); else every value
# NULL, and the block is read again with GET_DATABLOCK on a database thread
# (inline_reads.py: the worker's I/O thread reads only what is quick to decode).
GET_SMALL_DATABLOCK = """
WITH b AS (
    SELECT id, key::text AS key, value, octet_length(value) AS size FROM dataproduct
    WHERE taskmanager_id = %(taskmanager_id)s::bigint AND generation_id = %(generation_id)s::bigint
), t AS (SELECT coalesce(sum(size), 0) AS total FROM b)
SELECT b.key, CASE WHEN t.total <= %(within)s::bigint THEN b.value END
FROM b CROSS JOIN t ORDER BY b.id
"""

GET_HEADER = f"""
SELECT tm.taskmanager_id, h.taskmanager_id, h.generation_id, h.key, h.create_time,
       h.expiration_time, h.scheduled_create_time, h.creator, h.schema_id
FROM header h JOIN taskmanager tm ON tm.sequence_id = h.taskmanager_id
WHERE h.{_WHERE_PRODUCT.replace(" AND ", " AND h.")}
"""

GET_METADATA = f"""
SELECT tm.taskmanager_id, m.taskmanager_id, m.generation_id, m.key, m.state,
       m.generation_time, m.missed_update_count
FROM metadata m JOIN taskmanager tm ON tm.sequence_id = m.taskmanager_id
WHERE m.{_WHERE_PRODUCT.replace(" AND ", " AND m.")}
"""

_SOURCE_GENERATION = (
    "WHERE taskmanager_id = %(taskmanager_id)s AND generation_id = %(generation_id)s ORDER BY id"
)

DUPLICATE_DATABLOCK = f"""
WITH p AS (
    INSERT INTO dataproduct (taskmanager_id, generation_id, key, value)
    SELECT taskmanager_id, %(new_generation_id)s, key, value FROM dataproduct
    {_SOURCE_GENERATION}
    RETURNING 1
), h AS (
    INSERT INTO header (taskmanager_id, generation_id, key, create_time, expiration_time,
                        scheduled_create_time, creator, schema_id)
    SELECT taskmanager_id, %(new_generation_id)s, key, create_time, expiration_time,
           scheduled_create_time, creator, schema_id FROM header
    {_SOURCE_GENERATION}
), m AS (
    INSERT INTO metadata (taskmanager_id, generation_id, key, state, generation_time,
                          missed_update_count)
    SELECT taskmanager_id, %(new_generation_id)s, key, state, generation_time,
           missed_update_count FROM metadata
    {_SOURCE_GENERATION}
)
SELECT count(*) FROM p
"""

COUNT_PRODUCTS_OLDER_THAN = """
SELECT count(*) FROM dataproduct dp JOIN taskmanager tm ON tm.sequence_id = dp.taskmanager_id
WHERE tm.datestamp < now() - make_interval(secs => %(days)s * 86400.0)
"""

DELETE_OLDER_THAN = """
DELETE FROM taskmanager WHERE datestamp < now() - make_interval(secs => %(days)s * 86400.0)
"""

NEWEST_GENERATION = """
SELECT max(generation_id) FROM dataproduct WHERE taskmanager_id = %(taskmanager_id)s
"""

# Deletes a generation's (or, with generation_id NULL, every) product, header and metadata.
DELETE_GENERATIONS = """
WITH h AS (
    DELETE FROM header WHERE taskmanager_id = %(taskmanager_id)s
      AND ((%(generation_id)s)::bigint IS NULL OR generation_id = %(generation_id)s)
), m AS (
    DELETE FROM metadata WHERE taskmanager_id = %(taskmanager_id)s
      AND ((%(generation_id)s)::bigint IS NULL OR generation_id = %(generation_id)s)
), p AS (
    DELETE FROM dataproduct WHERE taskmanager_id = %(taskmanager_id)s
      AND ((%(generation_id)s)::bigint IS NULL OR generation_id = %(generation_id)s)
    RETURNING 1
)
SELECT count(*) FROM p
"""

MARK_EXPIRED = f"UPDATE header SET expiration_time = %(expiry_time)s WHERE {_WHERE_PRODUCT}"

MARK_DEMENTED = """
UPDATE header SET expiration_time = LEAST(expiration_time, %(now)s)
WHERE taskmanager_id = %(taskmanager_id)s AND generation_id = %(generation_id)s
  AND key = ANY(%(keys)s)
RETURNING key
"""

GET_SCHEMA = """
SELECT table_name, column_name, data_type, is_nullable = 'YES', column_default
FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = ANY(%(tables)s)
ORDER BY table_name, ordinal_position
"""

TASKMANAGER_EXISTS = "SELECT 1 FROM taskmanager WHERE sequence_id = %(taskmanager_id)s"

# -- reaping in bounded batches: each statement is its own short transaction ---------
REAP_CUTOFF = "SELECT now() - make_interval(secs => %(days)s * 86400.0), now()"

# Up to %(batch)s products (with their headers and metadata) of task managers
# older than the cutoff.
REAP_PRODUCTS = """
WITH doomed AS (
    SELECT dp.id, dp.taskmanager_id, dp.generation_id, dp.key
    FROM dataproduct dp JOIN taskmanager tm ON tm.sequence_id = dp.taskmanager_id
    WHERE tm.datestamp < %(cutoff)s
    LIMIT %(batch)s
), h AS (
    DELETE FROM header h USING doomed d
    WHERE h.taskmanager_id = d.taskmanager_id AND h.generation_id = d.generation_id
      AND h.key = d.key
), m AS (
    DELETE FROM metadata m USING doomed d
    WHERE m.taskmanager_id = d.taskmanager_id AND m.generation_id = d.generation_id
      AND m.key = d.key
), p AS (
    DELETE FROM dataproduct WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT count(*) FROM p
"""

# Then the task managers left without products (a product inserted into an old
# task manager during the reap keeps it for the next reap; stray header/metadata
# rows go by cascade, a handful at most).
REAP_TASKMANAGERS = """
DELETE FROM taskmanager WHERE sequence_id IN (
    SELECT tm.sequence_id FROM taskmanager tm
    WHERE tm.datestamp < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM dataproduct dp WHERE dp.taskmanager_id = tm.sequence_id)
    LIMIT %(batch)s
)
"""

# One reap at a time per database, whatever delivers it (a redelivery after the
# broker's consumer_timeout, the in-process Reaper): a session advisory lock.
REAP_LOCK_KEY = 0x6473_7265_6170  # "dsreap"
TRY_REAP_LOCK = "SELECT pg_try_advisory_lock(%s)"

LAST_REAP_AGE = """
SELECT extract(epoch FROM now() - max(finished_at)) FROM dataspace_reap
"""

RECORD_REAP = """
INSERT INTO dataspace_reap (started_at, retention_days, taskmanagers, dataproducts, batches)
VALUES (%(started_at)s, %(days)s, %(taskmanagers)s, %(dataproducts)s, %(batches)s)
"""
