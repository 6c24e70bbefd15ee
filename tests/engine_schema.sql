-- The decision engine's own tables, as its SQLAlchemy datasource creates them
-- (HEPCloud/decisionengine, sqlalchemy_ds/db_schema.py, through create_all on
-- PostgreSQL). tests/test_adopt.py builds a database with it and lets the worker
-- take that database over in place.
CREATE TABLE schema (schema_id SERIAL NOT NULL, schema BYTEA NOT NULL, PRIMARY KEY (schema_id));
CREATE UNIQUE INDEX ix_schema_schema_id ON schema (schema_id);
CREATE TABLE taskmanager (sequence_id BIGSERIAL NOT NULL, taskmanager_id VARCHAR(36) NOT NULL, name TEXT NOT NULL, datestamp TIMESTAMP WITHOUT TIME ZONE DEFAULT now() NOT NULL, PRIMARY KEY (sequence_id));
CREATE INDEX ix_taskmanager_taskmanager_id ON taskmanager USING hash (taskmanager_id);
CREATE INDEX ix_taskmanager_name ON taskmanager USING hash (name);
CREATE INDEX ix_taskmanager_datestamp ON taskmanager USING brin (datestamp) WITH (autosummarize = ON, pages_per_range = 1024);
CREATE UNIQUE INDEX ix_taskmanager_sequence_id ON taskmanager (sequence_id);
CREATE TABLE header (taskmanager_id BIGINT NOT NULL, generation_id INTEGER NOT NULL, key TEXT NOT NULL, create_time BIGINT NOT NULL, expiration_time BIGINT NOT NULL, scheduled_create_time BIGINT NOT NULL, creator TEXT NOT NULL, schema_id INTEGER, id BIGSERIAL NOT NULL, PRIMARY KEY (id), FOREIGN KEY(taskmanager_id) REFERENCES taskmanager (sequence_id) ON DELETE CASCADE);
CREATE INDEX ix_header_taskmanager_id ON header USING hash (taskmanager_id);
CREATE INDEX ix_header_generation_id ON header (generation_id) WITH (fillfactor = 50);
CREATE INDEX ix_header_key ON header USING hash (key);
CREATE UNIQUE INDEX ix_header_id ON header (id);
CREATE TABLE metadata (taskmanager_id BIGINT NOT NULL, generation_id INTEGER NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, generation_time BIGINT NOT NULL, missed_update_count INTEGER, id BIGSERIAL NOT NULL, PRIMARY KEY (id), FOREIGN KEY(taskmanager_id) REFERENCES taskmanager (sequence_id) ON DELETE CASCADE);
CREATE INDEX ix_metadata_taskmanager_id ON metadata USING hash (taskmanager_id);
CREATE INDEX ix_metadata_generation_id ON metadata (generation_id) WITH (fillfactor = 70);
CREATE INDEX ix_metadata_key ON metadata USING hash (key);
CREATE INDEX ix_metadata_state ON metadata USING hash (state);
CREATE UNIQUE INDEX ix_metadata_id ON metadata (id);
CREATE TABLE dataproduct (taskmanager_id BIGINT NOT NULL, generation_id INTEGER NOT NULL, key TEXT NOT NULL, value BYTEA NOT NULL, id BIGSERIAL NOT NULL, PRIMARY KEY (id), FOREIGN KEY(taskmanager_id) REFERENCES taskmanager (sequence_id) ON DELETE CASCADE);
CREATE INDEX ix_dataproduct_taskmanager_id ON dataproduct USING hash (taskmanager_id);
CREATE INDEX ix_dataproduct_generation_id ON dataproduct (generation_id) WITH (fillfactor = 70);
CREATE INDEX ix_dataproduct_key ON dataproduct USING hash (key);
CREATE UNIQUE INDEX ix_dataproduct_id ON dataproduct (id);
