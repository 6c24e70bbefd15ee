"""What the tests of the DataSpace contract build their calls from: fresh names,
headers and metadata, direct SQL (to see what the API hides), extra DataSpaces of
a backend, and DataSources a configuration can name by module path
(``tests.support.contract``)."""

from __future__ import annotations

import uuid

import psycopg2

from dataspace_client import DataSource, DataSpace
from tests.support.configs import inprocess_config, remote_config

#: Header/metadata times used where a test wants fixed, recognisable values.
T0 = 1_700_000_000


def fresh(prefix: str = "tm") -> str:
    """A task manager name no other test (nor run) uses."""
    return f"{prefix}-{uuid.uuid4()}"


def new_uuid() -> str:
    return str(uuid.uuid4()).upper()


def header(
    create_time: int = T0,
    expiration_time: int = T0 + 1800,
    scheduled_create_time: int = T0 - 10,
    creator: str = "module",
    schema_id: int | None = None,
) -> dict:
    return {
        "create_time": create_time,
        "expiration_time": expiration_time,
        "scheduled_create_time": scheduled_create_time,
        "creator": creator,
        "schema_id": schema_id,
    }


def metadata(state: str = "NEW", generation_time: int = T0, missed_update_count: int = 0) -> dict:
    return {
        "state": state,
        "generation_time": generation_time,
        "missed_update_count": missed_update_count,
    }


def new_taskmanager(space: DataSpace, prefix: str = "tm", **kw) -> tuple[str, str, int]:
    """Store a fresh task manager; return (name, uuid, sequence_id)."""
    name, tm_uuid = fresh(prefix), new_uuid()
    return name, tm_uuid, space.store_taskmanager(name, tm_uuid, **kw)


def sql_rows(pg_dsn: str, query: str, params=()) -> list[tuple]:
    """Read the database directly (to see rows the API hides, e.g. orphans)."""
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def sql_execute(pg_dsn: str, query: str, params=()) -> int:
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.rowcount
    finally:
        conn.close()


def space_factory(backend: str, request, pg_dsn: str):
    """Generator behind the ``space_factory`` fixtures: extra DataSpaces of ``backend``
    built with extra ``dataspace`` settings, closed afterwards."""
    made: list[DataSpace] = []

    def make(**extra) -> DataSpace:
        if backend == "inprocess":
            config = inprocess_config(pg_dsn, **extra)
        else:
            request.getfixturevalue("worker_pool")
            config = remote_config(request.getfixturevalue("amqp_url"), **extra)
        space = DataSpace(config)
        made.append(space)
        return space

    yield make
    for space in made:
        space.close()


class RecordingSource(DataSource):
    """A DataSource that records how it was built and what it was asked."""

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[tuple] = []
        self.closed = False

    def connect(self):
        pass

    def close(self):
        self.closed = True

    def reset_connections(self):
        pass

    def create_tables(self):
        pass

    def get_schema(self, table=None):
        self.calls.append(("get_schema", table))
        return ["schema", table]

    def store_taskmanager(self, taskmanager_name, taskmanager_id, datestamp=None):
        self.calls.append(("store_taskmanager", taskmanager_name, taskmanager_id, datestamp))
        return 4242

    def get_taskmanager(self, taskmanager_name, taskmanager_id=None):
        self.calls.append(("get_taskmanager", taskmanager_name, taskmanager_id))
        return {"name": taskmanager_name}

    def get_taskmanagers(self, taskmanager_name=None, start_time=None, end_time=None):
        return []

    def get_last_generation_id(self, taskmanager_name, taskmanager_id=None):
        return 1

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata):
        pass

    def update(self, taskmanager_id, generation_id, key, value, header, metadata):
        pass

    def get_dataproduct(self, taskmanager_id, generation_id, key):
        return b""

    def get_dataproducts(self, taskmanager_id, key=None):
        return []

    def get_datablock(self, taskmanager_id, generation_id):
        return {}

    def get_header(self, taskmanager_id, generation_id, key):
        return ()

    def get_metadata(self, taskmanager_id, generation_id, key):
        return ()

    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id):
        pass

    def delete_data_older_than(self, days):
        return {"taskmanagers": 0, "dataproducts": 0}


class NotADataSource:
    def __init__(self, config):
        self.config = config
