-- One row per reap: when, with which retention, and what it removed. Ops read
-- it to see that the schedule runs; tests count it.
CREATE TABLE dataspace_reap (
    id             BIGSERIAL PRIMARY KEY,
    started_at     TIMESTAMPTZ NOT NULL,
    finished_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    retention_days DOUBLE PRECISION NOT NULL,
    taskmanagers   BIGINT NOT NULL,
    dataproducts   BIGINT NOT NULL,
    batches        INTEGER NOT NULL
);
