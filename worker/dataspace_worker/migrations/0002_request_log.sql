-- Idempotency: the message_id of every applied write request, with the reply it
-- got, recorded in the write's own transaction. A redelivered or re-sent request
-- finds its row and gets the same reply without writing again. Rows older than
-- the worker's idempotency_ttl are swept.
CREATE TABLE dataspace_request (
    message_id TEXT PRIMARY KEY,
    operation  TEXT NOT NULL,
    reply      BYTEA,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX dataspace_request_applied_at_idx ON dataspace_request (applied_at);
