#!/bin/sh
# Run once by the postgres image, when it initialises an empty data directory
# (mounted into /docker-entrypoint-initdb.d by compose.yaml): the worker's own
# login role, owner of database dataspace, not a superuser. The worker needs
# nothing more: it creates its tables in the database it owns.
set -eu
: "${DATASPACE_DB_PASSWORD:?set DATASPACE_DB_PASSWORD (deploy/.env)}"
# \getenv (psql 15) keeps the password off the command line.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv password DATASPACE_DB_PASSWORD
CREATE ROLE dataspace LOGIN PASSWORD :'password';
CREATE DATABASE dataspace OWNER dataspace;
SQL
