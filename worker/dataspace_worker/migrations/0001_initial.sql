-- The DataSpace tables.  Products, headers and metadata are keyed by
-- (taskmanager_id, generation_id, key), where taskmanager_id is the task
-- manager's sequence_id, and go when their task manager row goes.
CREATE TABLE taskmanager (
    sequence_id    BIGSERIAL PRIMARY KEY,
    taskmanager_id VARCHAR(36) NOT NULL,
    name           TEXT NOT NULL,
    datestamp      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Readers are Python: keep datestamps within what datetime can represent.
    CONSTRAINT taskmanager_datestamp_range
        CHECK (datestamp >= '0001-01-02 00:00:00+00' AND datestamp < '9999-12-31 00:00:00+00')
);
CREATE INDEX taskmanager_name_idx ON taskmanager (name, taskmanager_id, sequence_id);
CREATE INDEX taskmanager_datestamp_idx ON taskmanager (datestamp);

CREATE TABLE dataproduct (
    id             BIGSERIAL PRIMARY KEY,  -- insertion order
    taskmanager_id BIGINT NOT NULL REFERENCES taskmanager (sequence_id) ON DELETE CASCADE,
    generation_id  BIGINT NOT NULL,
    key            TEXT NOT NULL,
    value          BYTEA NOT NULL,
    UNIQUE (taskmanager_id, generation_id, key)
);
-- Values arrive compressed (zlib) or opaque: do not spend CPU recompressing them.
ALTER TABLE dataproduct ALTER COLUMN value SET STORAGE EXTERNAL;

CREATE TABLE header (
    id                    BIGSERIAL PRIMARY KEY,
    taskmanager_id        BIGINT NOT NULL REFERENCES taskmanager (sequence_id) ON DELETE CASCADE,
    generation_id         BIGINT NOT NULL,
    key                   TEXT NOT NULL,
    create_time           BIGINT NOT NULL,
    expiration_time       BIGINT NOT NULL,
    scheduled_create_time BIGINT NOT NULL,
    creator               TEXT NOT NULL,
    schema_id             BIGINT,
    UNIQUE (taskmanager_id, generation_id, key)
);

CREATE TABLE metadata (
    id                  BIGSERIAL PRIMARY KEY,
    taskmanager_id      BIGINT NOT NULL REFERENCES taskmanager (sequence_id) ON DELETE CASCADE,
    generation_id       BIGINT NOT NULL,
    key                 TEXT NOT NULL,
    state               TEXT NOT NULL,
    generation_time     BIGINT NOT NULL,
    missed_update_count INTEGER NOT NULL DEFAULT 0,
    UNIQUE (taskmanager_id, generation_id, key)
);
