-- Taking over a decision engine's own database in place: what 0001_initial.sql
-- would have given its tables, added to the tables the engine's SQLAlchemy
-- datasource made, without rewriting a row. schema.py runs this instead of
-- 0001 once it has checked the tables (columns, types, foreign keys, no
-- duplicate triples) and holds SHARE locks on all four (the engine's reads go
-- on, its writes wait until the migration commits); it then records migration
-- 1 as "initial_adopted" and runs 0002 onwards as on any database.
--
-- Left as the engine made them, on purpose:
--   * taskmanager.datestamp stays TIMESTAMP WITHOUT TIME ZONE (naive local time
--     written by the engine): sql.py reads it as datestamp::timestamptz, and
--     compares it with timestamptz values, both in the session's TimeZone;
--   * generation_id (three tables) and header.schema_id stay INTEGER: a larger
--     value is refused by PostgreSQL ("integer out of range", a ValueError);
--   * metadata.missed_update_count stays nullable, without a default;
--   * every index and constraint of the engine's stays.
-- Nothing here takes a lock stronger than SHARE until the last block.

-- The (taskmanager_id, generation_id, key) triple names one product: this
-- package's reads expect one row per triple and its writes rely on the
-- database refusing a second one (DataSpaceExistsError). Unique indexes, named
-- as 0001's UNIQUE constraints name theirs, rather than constraints: ADD
-- CONSTRAINT would hold an ACCESS EXCLUSIVE lock (blocking the engine's reads
-- too) for the whole index build. A later migration must treat them as indexes.
CREATE UNIQUE INDEX dataproduct_taskmanager_id_generation_id_key_key
    ON dataproduct (taskmanager_id, generation_id, key);
CREATE UNIQUE INDEX header_taskmanager_id_generation_id_key_key
    ON header (taskmanager_id, generation_id, key);
CREATE UNIQUE INDEX metadata_taskmanager_id_generation_id_key_key
    ON metadata (taskmanager_id, generation_id, key);

-- The task manager look-ups (by name, newest first) and the retention scans
-- (by datestamp) of 0001. The engine's hash and BRIN indexes stay beside them.
CREATE INDEX taskmanager_name_idx ON taskmanager (name, taskmanager_id, sequence_id);
CREATE INDEX taskmanager_datestamp_idx ON taskmanager (datestamp);

-- Last, so that the ACCESS EXCLUSIVE locks these two need are held only for
-- the few milliseconds left before the commit. Taken explicitly, both in one
-- statement, under schema.py's lock_timeout.
LOCK TABLE taskmanager, dataproduct IN ACCESS EXCLUSIVE MODE;

-- 0001's range check: readers are Python, keep datestamps within what datetime
-- can represent (on a timestamp column the literals' "+00" is ignored; the
-- one-day margins cover any time zone). Added NOT VALID: no scan here, and new
-- rows are checked from now on; schema.py then validates it under a savepoint,
-- and leaves it NOT VALID, with a warning, if an old row is out of range.
ALTER TABLE taskmanager ADD CONSTRAINT taskmanager_datestamp_range
    CHECK (datestamp >= '0001-01-02 00:00:00+00' AND datestamp < '9999-12-31 00:00:00+00')
    NOT VALID;

-- Values arrive compressed (zlib) or opaque: do not spend CPU recompressing
-- them. Applies to rows written from now on; rewrites nothing.
ALTER TABLE dataproduct ALTER COLUMN value SET STORAGE EXTERNAL;
