"""The worker takes a decision engine's database over in place (adoption.adopt).

Each test builds the engine's own schema (tests/engine_schema.sql, as its
SQLAlchemy datasource creates it) in a scratch database of its own, fills it
the way the engine's in-process datasource does (``Engine`` below: plain SQL
with the engine's column lists and value format), and then lets this package
migrate it, as the worker does when it starts (``PostgresDataSource`` with
``create_tables``, the default).
"""

from __future__ import annotations

import ast
import datetime as dt
import decimal
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import extensions

from dataspace_client import values
from dataspace_client.remote import RemoteDataSource
from dataspace_core.errors import DataSpaceConfigurationError, DataSpaceExistsError
from dataspace_worker import adoption, schema
from dataspace_worker.postgres import PostgresDataSource
from tests import services

ENGINE_SCHEMA = Path(__file__).with_name("engine_schema.sql").read_text("utf-8")
TABLES = ("taskmanager", "dataproduct", "header", "metadata")
#: the indexes the adoption adds to the engine's tables
ADDED_INDEXES = {
    "dataproduct_taskmanager_id_generation_id_key_key",
    "header_taskmanager_id_generation_id_key_key",
    "metadata_taskmanager_id_generation_id_key_key",
    "taskmanager_name_idx",
    "taskmanager_datestamp_idx",
}
HEADER = {
    "create_time": 1_700_000_000,
    "expiration_time": 1_700_003_600,
    "scheduled_create_time": 1_700_000_300,
    "creator": "adopt_test",
    "schema_id": None,
}
METADATA = {"state": "NEW", "generation_time": 1_700_000_000, "missed_update_count": 0}


# -- the decision engine, as its in-process SQLAlchemy datasource uses the database -----
def engine_value(obj: Any) -> bytes:
    """A DataBlock value in the engine's format: a dict as a compressed literal, any
    other object pickled inside one."""
    if isinstance(obj, dict):
        wrapped = {"pickled": False, "value": obj}
    else:
        wrapped = {"pickled": True, "value": pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)}
    return zlib.compress(str(wrapped).encode("latin1"), 9)


def engine_read(stored: bytes) -> Any:
    """What the engine makes of a stored value."""
    wrapped = ast.literal_eval(zlib.decompress(bytes(stored)).decode("latin1"))
    if wrapped["pickled"]:
        return pickle.loads(wrapped["value"])  # noqa: S301 - the test's own pickles
    return wrapped["value"]


class Engine:
    """The engine's datasource in plain SQL: its own column lists (never ``id``, left
    to the serials), one transaction per call, naive datestamps."""

    def __init__(self, dsn: str):
        self.conn = psycopg2.connect(dsn, application_name="decision-engine")

    def close(self) -> None:
        self.conn.close()

    def _run(self, *statements: tuple[str, tuple]) -> list | None:
        """The statements in one transaction; the last one's rows, if it returns any."""
        try:
            with self.conn.cursor() as cur:
                for query, params in statements:
                    cur.execute(query, params)
                rows = cur.fetchall() if cur.description else None
            self.conn.commit()
            return rows
        except BaseException:
            self.conn.rollback()
            raise

    def store_taskmanager(self, name: str, datestamp: dt.datetime | None = None) -> int:
        tm_uuid = str(uuid.uuid4())
        if datestamp is None:  # the server default, now()
            query, params = (
                "INSERT INTO taskmanager (taskmanager_id, name) VALUES (%s, %s)"
                " RETURNING sequence_id",
                (tm_uuid, name),
            )
        else:
            query, params = (
                "INSERT INTO taskmanager (taskmanager_id, name, datestamp) VALUES (%s, %s, %s)"
                " RETURNING sequence_id",
                (tm_uuid, name, datestamp),
            )
        return self._run((query, params))[0][0]

    def insert(self, tm: int, gen: int, key: str, obj: Any, missed: int | None = 0) -> None:
        self._run(
            (
                "INSERT INTO dataproduct (taskmanager_id, generation_id, key, value)"
                " VALUES (%s, %s, %s, %s)",
                (tm, gen, key, psycopg2.Binary(engine_value(obj))),
            ),
            (
                "INSERT INTO header (taskmanager_id, generation_id, key, create_time,"
                " expiration_time, scheduled_create_time, creator, schema_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (tm, gen, key, 1_600_000_000, 1_600_003_600, 1_600_000_100, "engine", None),
            ),
            (
                "INSERT INTO metadata (taskmanager_id, generation_id, key, state,"
                " generation_time, missed_update_count) VALUES (%s, %s, %s, %s, %s, %s)",
                (tm, gen, key, "END_CYCLE", 1_600_000_000, missed),
            ),
        )

    def update(self, tm: int, gen: int, key: str, obj: Any) -> None:
        where = "WHERE taskmanager_id = %s AND generation_id = %s AND key = %s"
        self._run(
            (
                f"UPDATE dataproduct SET value = %s {where}",
                (psycopg2.Binary(engine_value(obj)), tm, gen, key),
            ),
            (f"UPDATE header SET expiration_time = 1600009999 {where}", (tm, gen, key)),
            (f"UPDATE metadata SET state = 'METADATA_UPDATE' {where}", (tm, gen, key)),
        )

    def value(self, tm: int, gen: int, key: str) -> bytes:
        rows = self._run(
            (
                "SELECT value FROM dataproduct"
                " WHERE taskmanager_id = %s AND generation_id = %s AND key = %s",
                (tm, gen, key),
            )
        )
        assert len(rows) == 1, rows
        return bytes(rows[0][0])

    def taskmanager_names(self) -> set[str]:
        return {r[0] for r in self._run(("SELECT name FROM taskmanager", ()))}


# -- databases --------------------------------------------------------------------------
@pytest.fixture
def admin_dsn(pg_dsn) -> str:
    return extensions.make_dsn(pg_dsn, dbname="postgres")


def _execute(dsn: str, query: str, params=()):
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


@pytest.fixture
def engine_db(admin_dsn):
    """A scratch database holding the decision engine's empty schema; dropped after."""
    with services.scratch_database(admin_dsn) as dsn:
        _execute(dsn, ENGINE_SCHEMA)
        yield dsn


@pytest.fixture
def engine(engine_db):
    engine = Engine(engine_db)
    yield engine
    engine.close()


def fill_as_the_engine(engine: Engine) -> dict:
    """Task managers and products as the engine's datasource leaves them; returns
    the sequence_ids, the naive datestamp written and the products' objects."""
    now = dt.datetime.now()  # naive local time, as the engine writes it
    old = engine.store_taskmanager("old_tm", now - dt.timedelta(days=400))
    a = engine.store_taskmanager("tm_a")  # datestamp from the server default now()
    b = engine.store_taskmanager("tm_b", now)
    products = {
        (a, 1, "resources"): {"site": "café ü", "cpus": 4, "raw": b"\x00\xff", "t": (1, 2.5)},
        (a, 1, "pickled"): [decimal.Decimal("1.25"), dt.date(2024, 1, 1), "café ü"],
        (a, 2, "resources"): {"site": "FNAL", "cpus": 8},
        (a, 2, "jobs"): {"idle": 3, "running": [1, 2, 3]},
        (b, 1, "jobs"): {"idle": 0},
        (old, 1, "stale"): {"old": True},
    }
    for (tm, gen, key), obj in products.items():
        # one metadata row with missed_update_count NULL, as old engine rows may have it
        engine.insert(tm, gen, key, obj, missed=None if key == "jobs" and tm == a else 0)
    return {"old": old, "a": a, "b": b, "now": now, "products": products}


def snapshot(dsn: str) -> dict:
    """Rows (values by md5), columns, indexes and constraints of the engine's tables."""
    rows = {
        "taskmanager": "SELECT * FROM taskmanager ORDER BY sequence_id",
        "dataproduct": "SELECT id, taskmanager_id, generation_id, key, md5(value)"
        " FROM dataproduct ORDER BY id",
        "header": "SELECT * FROM header ORDER BY id",
        "metadata": "SELECT * FROM metadata ORDER BY id",
    }
    return {
        "counts": {t: _execute(dsn, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES},
        "rows": {t: _execute(dsn, q) for t, q in rows.items()},
        "columns": _execute(
            dsn,
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name IN ('schema', 'taskmanager', 'dataproduct', 'header', 'metadata')"
            " ORDER BY table_name, column_name",
        ),
        "tables": {
            r[0]
            for r in _execute(
                dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        },
        "indexes": dict(
            _execute(
                dsn,
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()",
            )
        ),
        "constraints": dict(
            _execute(
                dsn,
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE connamespace = current_schema()::regnamespace",
            )
        ),
    }


def versions(dsn: str) -> list[tuple]:
    return _execute(dsn, f"SELECT version, name, applied_at FROM {schema.VERSION_TABLE} ORDER BY 1")


def session_zone(dsn: str) -> ZoneInfo:
    return ZoneInfo(_execute(dsn, "SHOW TimeZone")[0][0])


def adopt(dsn: str) -> PostgresDataSource:
    """What the worker does when it starts: connect, and create or migrate the schema."""
    return PostgresDataSource({"dsn": dsn, "pool_size": 2, "create_tables": True})


# -- 1. adoption in place, and both sides using the database afterwards -----------------
def test_the_worker_adopts_an_engine_database_in_place(engine, engine_db, own_vhost, caplog):
    made = fill_as_the_engine(engine)
    a, b, old = made["a"], made["b"], made["old"]
    before = snapshot(engine_db)
    print(f"\nrow counts before adoption: {before['counts']}")

    caplog.set_level("INFO", logger="dataspace_worker.schema")
    ds = adopt(engine_db)
    try:
        after = snapshot(engine_db)
        print(f"row counts after adoption:  {after['counts']}")
        assert after["counts"] == before["counts"]
        assert after["rows"] == before["rows"]  # every row, every value byte for byte
        assert after["columns"] == before["columns"]  # no type changed, nothing NOT NULL
        assert "adopting them in place" in caplog.text
        assert [(v, n) for v, n, _ in versions(engine_db)][:3] == [
            (1, "initial_adopted"),
            (2, "request_log"),
            (3, "reap_log"),
        ]
        assert set(before["indexes"].items()) <= set(after["indexes"].items())
        assert set(after["indexes"]) - set(before["indexes"]) >= ADDED_INDEXES
        for table in ("dataproduct", "header", "metadata"):
            definition = after["indexes"][f"{table}_taskmanager_id_generation_id_key_key"]
            assert definition.startswith("CREATE UNIQUE INDEX"), definition
            assert "(taskmanager_id, generation_id, key)" in definition
        assert set(before["constraints"].items()) <= set(after["constraints"].items())
        assert "taskmanager_datestamp_range" in after["constraints"]
        assert _execute(
            engine_db,
            "SELECT convalidated FROM pg_constraint WHERE conname = 'taskmanager_datestamp_range'",
        ) == [(True,)]
        assert {"dataspace_request", "dataspace_reap", schema.VERSION_TABLE} <= after["tables"]

        # -- the products, read through this package in process ----------------------
        zone = session_zone(engine_db)
        for (tm, gen, key), obj in made["products"].items():
            stored = engine.value(tm, gen, key)
            assert ds.get_dataproduct(tm, gen, key) == stored
            assert engine_read(stored) == obj
        assert engine_read(ds.get_dataproduct(a, 1, "resources"))["site"] == "café ü"
        assert ds.get_datablock(a, 2) == {
            "resources": engine.value(a, 2, "resources"),
            "jobs": engine.value(a, 2, "jobs"),
        }
        header = ds.get_header(a, 1, "resources")
        assert header[1:] == (
            a,
            1,
            "resources",
            1_600_000_000,
            1_600_003_600,
            1_600_000_100,
            "engine",
            None,
        )
        assert ds.get_metadata(a, 1, "pickled")[4:] == ("END_CYCLE", 1_600_000_000, 0)
        assert ds.get_metadata(a, 2, "jobs")[4:] == ("END_CYCLE", 1_600_000_000, None)
        row_b = ds.get_taskmanager("tm_b")
        assert row_b["sequence_id"] == b
        assert row_b["datestamp"].tzinfo is not None  # aware, from a naive column
        assert row_b["datestamp"] == made["now"].replace(tzinfo=zone)
        assert ds.get_taskmanager("tm_a")["datestamp"].tzinfo is not None
        assert ds.get_last_generation_id("tm_a") == 2
        # timestamptz bounds against the naive column
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
        assert {r["name"] for r in ds.get_taskmanagers(start_time=since)} == {"tm_a", "tm_b"}
        assert [r["name"] for r in ds.get_taskmanagers(end_time=since)] == ["old_tm"]

        # -- the same through the real worker over RabbitMQ ---------------------------
        with services.running_pool(own_vhost, engine_db, consumers=1, pool_size=3):
            remote = RemoteDataSource({"url": own_vhost, "timeout": 30, "app_id": "adopt-test"})
            try:
                for tm, gen, key in made["products"]:
                    assert remote.get_dataproduct(tm, gen, key) == engine.value(tm, gen, key)
                assert remote.get_datablock(a, 2) == ds.get_datablock(a, 2)
                assert tuple(remote.get_header(a, 1, "resources")) == header
                assert tuple(remote.get_metadata(a, 2, "jobs")) == ds.get_metadata(a, 2, "jobs")
                assert remote.get_taskmanager("tm_b") == row_b
                assert remote.get_last_generation_id("tm_a") == 2

                # -- writes: the service, then the engine, on the same database --------
                ds.insert(
                    b,
                    1,
                    "from_service",
                    engine_value({"by": "service", "s": "café"}),
                    HEADER,
                    METADATA,
                )
                remote.insert(b, 1, "from_worker", engine_value(["worker", 1]), HEADER, METADATA)
                engine.insert(b, 1, "from_engine", {"by": "engine", "s": "ü"})
                engine.update(a, 1, "resources", {"site": "café ü", "cpus": 5})
                c = engine.store_taskmanager("tm_c", dt.datetime.now())
                engine.insert(c, 1, "fresh", {"n": 1})
                # a value as this package's client encodes it (the engine's format)
                remote.insert(
                    b, 1, "from_client", values.encode_value({"by": "client"}), HEADER, METADATA
                )
                written = {
                    (b, 1, "from_service"): {"by": "service", "s": "café"},
                    (b, 1, "from_worker"): ["worker", 1],
                    (b, 1, "from_engine"): {"by": "engine", "s": "ü"},
                    (a, 1, "resources"): {"site": "café ü", "cpus": 5},
                    (c, 1, "fresh"): {"n": 1},
                    (b, 1, "from_client"): {"by": "client"},
                }
                for (tm, gen, key), obj in written.items():
                    stored = engine.value(tm, gen, key)  # the engine's view
                    assert engine_read(stored) == obj
                    assert ds.get_dataproduct(tm, gen, key) == stored  # the service's view
                    assert remote.get_dataproduct(tm, gen, key) == stored
                    assert values.decode_value(stored) == obj  # as this package's client reads it
                assert ds.get_header(b, 1, "from_worker")[7] == "adopt_test"
                assert remote.get_metadata(a, 1, "resources")[4] == "METADATA_UPDATE"
                assert remote.get_taskmanager("tm_c")["datestamp"].tzinfo is not None
                assert set(remote.get_datablock(b, 1)) == {
                    "jobs",
                    "from_client",
                    "from_service",
                    "from_worker",
                    "from_engine",
                }
                # the triples are unique now, for both sides
                with pytest.raises(DataSpaceExistsError):
                    remote.insert(b, 1, "from_engine", b"again", HEADER, METADATA)
                with pytest.raises(psycopg2.errors.UniqueViolation):
                    engine.insert(b, 1, "from_service", {"again": True})
            finally:
                remote.close()
        print(f"row counts after both sides wrote: {snapshot(engine_db)['counts']}")

        # -- retention: the old, naive-datestamp task manager goes, the others stay ---
        assert ds.delete_data_older_than(300) == {"taskmanagers": 1, "dataproducts": 1}
        assert engine.taskmanager_names() == {"tm_a", "tm_b", "tm_c"}
        assert _execute(
            engine_db, "SELECT count(*) FROM header WHERE taskmanager_id = %s", (old,)
        ) == [(0,)]
        assert ds.get_last_generation_id("tm_b") == 1
    finally:
        ds.close()


def test_a_reap_on_an_adopted_database_takes_the_old_task_managers_only(engine, engine_db):
    made = fill_as_the_engine(engine)
    ds = adopt(engine_db)
    try:
        result = ds.reap(300)
        assert (result["taskmanagers"], result["dataproducts"]) == (1, 1)
        assert engine.taskmanager_names() == {"tm_a", "tm_b"}
        assert ds.get_dataproduct(made["b"], 1, "jobs") == engine.value(made["b"], 1, "jobs")
    finally:
        ds.close()


def test_the_engine_keeps_writing_while_the_worker_adopts(engine, engine_db):
    """Engine sessions inserting, updating and reading all through the migration: none
    of their statements fails, and every row they wrote is there afterwards."""
    made = fill_as_the_engine(engine)
    tm = made["a"]
    # enough rows that the index builds take a moment
    _execute(
        engine_db,
        "WITH p AS (INSERT INTO dataproduct (taskmanager_id, generation_id, key, value)"
        "  SELECT %(tm)s, 1000 + i / 100, 'k' || i %% 100, %(v)s FROM generate_series(0, 99999) i),"
        " h AS (INSERT INTO header (taskmanager_id, generation_id, key, create_time,"
        "  expiration_time, scheduled_create_time, creator)"
        "  SELECT %(tm)s, 1000 + i / 100, 'k' || i %% 100, 1, 2, 3, 'engine'"
        "  FROM generate_series(0, 99999) i)"
        " INSERT INTO metadata (taskmanager_id, generation_id, key, state, generation_time,"
        "  missed_update_count)"
        " SELECT %(tm)s, 1000 + i / 100, 'k' || i %% 100, 'NEW', 1, 0"
        " FROM generate_series(0, 99999) i",
        {"tm": tm, "v": psycopg2.Binary(engine_value({"bulk": 1}))},
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    done: list[tuple] = []

    def writer(n: int) -> None:
        me = Engine(engine_db)
        try:
            gen = 0
            while not stop.is_set():
                gen += 1
                key = f"w{n}"
                me.insert(tm, 10 * gen + n, key, {"gen": gen})
                me.update(tm, 10 * gen + n, key, {"gen": gen, "updated": True})
                assert engine_read(me.value(tm, 10 * gen + n, key))["updated"]
                done.append((tm, 10 * gen + n, key))
                if gen % 5 == 0:
                    me.store_taskmanager(f"engine_{n}_{gen}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            me.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    ds = adopt(engine_db)
    took = time.monotonic() - started
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    try:
        print(f"\nadoption under load took {took:.2f}s; the engine wrote {len(done)} products")
        assert not errors, errors
        assert versions(engine_db)[0][1] == "initial_adopted"
        for tm_, gen, key in done:
            assert engine_read(ds.get_dataproduct(tm_, gen, key)) == {
                "gen": (gen - int(key[1:])) // 10,
                "updated": True,
            }
    finally:
        ds.close()


def test_an_old_datestamp_out_of_range_leaves_the_check_not_valid(engine, engine_db, caplog):
    engine.store_taskmanager("ancient", dt.datetime(1, 1, 1, 12, 0))
    caplog.set_level("WARNING", logger="dataspace_worker.schema")
    adopt(engine_db).close()
    assert "stays NOT VALID" in caplog.text
    assert _execute(
        engine_db,
        "SELECT convalidated FROM pg_constraint WHERE conname = 'taskmanager_datestamp_range'",
    ) == [(False,)]
    with pytest.raises(psycopg2.errors.CheckViolation):  # new rows are checked
        engine.store_taskmanager("ancient_too", dt.datetime(1, 1, 1, 12, 0))


def test_a_session_holding_the_tables_makes_the_adoption_give_up(engine, engine_db, monkeypatch):
    fill_as_the_engine(engine)
    monkeypatch.setattr(adoption, "ADOPT_LOCK_TIMEOUT", "1s")
    idle = psycopg2.connect(engine_db)
    try:
        with idle.cursor() as cur:  # written, and left idle in its transaction
            cur.execute("UPDATE header SET creator = creator WHERE false")
            cur.execute("INSERT INTO taskmanager (taskmanager_id, name) VALUES ('x', 'idle')")
        before = snapshot_tables(engine_db)
        with pytest.raises(schema.SchemaAdoptionError, match="could not lock .* within 1s"):
            adopt(engine_db)
        assert snapshot_tables(engine_db) == before
    finally:
        idle.rollback()
        idle.close()
    adopt(engine_db).close()  # once it is gone, the adoption goes through
    assert versions(engine_db)[0][1] == "initial_adopted"


# -- 2. duplicate triples: refused, nothing changed --------------------------------------
def test_duplicate_triples_are_refused_and_nothing_is_changed(engine, engine_db):
    made = fill_as_the_engine(engine)
    a = made["a"]
    for _ in range(2):  # what a racing engine, without the unique index, can leave
        engine.insert(a, 2, "resources", {"site": "again"})
    before = snapshot(engine_db)
    with pytest.raises(schema.SchemaAdoptionError) as refused:
        adopt(engine_db)
    message = str(refused.value)
    print(f"\n{message}")
    assert "\n" not in message
    assert "1 (taskmanager_id, generation_id, key) triple(s) occur more than once in" in message
    assert "dataproduct, 1 in header, 1 in metadata" in message
    assert (
        "SELECT taskmanager_id, generation_id, key, count(*) FROM dataproduct"
        " GROUP BY taskmanager_id, generation_id, key HAVING count(*) > 1" in message
    )
    assert isinstance(refused.value, DataSpaceConfigurationError)
    assert snapshot(engine_db) == before
    assert schema.VERSION_TABLE not in before["tables"]


def test_the_worker_command_refuses_in_one_line_and_exits_2(engine, engine_db, own_vhost):
    """The operator's view of a refusal: one ERROR line saying what to do, no
    traceback, exit 2 (a setting to fix, not an outage to wait out)."""
    made = fill_as_the_engine(engine)
    for _ in range(2):
        engine.insert(made["a"], 2, "resources", {"site": "again"})
    before = snapshot(engine_db)
    code, output = _run_worker(own_vhost, engine_db)
    print(f"\n{output}")
    assert code == 2
    assert "Traceback" not in output
    refusal = [line for line in output.splitlines() if "nothing was changed" in line]
    assert len(refusal) == 1, output
    assert "ERROR" in refusal[0]
    assert "occur more than once" in refusal[0]
    assert snapshot(engine_db) == before


def _run_worker(own_vhost: str, dsn: str) -> tuple[int, str]:
    worker = shutil.which("dataspace-worker", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [worker],
        env={
            **os.environ,
            "DATASPACE_AMQP_URL": own_vhost,
            "DATASPACE_PG_DSN": dsn,
            "DATASPACE_METRICS_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout + result.stderr


def test_tables_restored_from_a_backup_without_their_indexes_are_refused(engine, engine_db):
    """``pg_restore --clean`` of a pre-adoption backup rebuilds the engine's tables
    without the unique indexes and leaves dataspace_schema_version: the worker must
    not take "migration 1 applied" for granted and accept duplicate products."""
    fill_as_the_engine(engine)
    adopt(engine_db).close()
    # what the restore leaves: the engine's tables as they were, dataspace_* kept
    _execute(
        engine_db,
        f"DROP INDEX {', '.join(sorted(ADDED_INDEXES))};"
        " ALTER TABLE taskmanager DROP CONSTRAINT taskmanager_datestamp_range",
    )
    with pytest.raises(schema.SchemaAdoptionError) as refused:
        adopt(engine_db)
    message = str(refused.value)
    print(f"\n{message}")
    assert "\n" not in message
    assert "dataproduct, header, metadata have no unique index" in message
    assert "drop the tables dataspace_schema_version, dataspace_request and" in message
    # what the message says to do works: the tables are adopted anew
    _execute(engine_db, "DROP TABLE dataspace_schema_version, dataspace_request, dataspace_reap")
    adopt(engine_db).close()
    assert [n for _v, n, _ in versions(engine_db)][:1] == ["initial_adopted"]


def test_a_role_that_does_not_own_the_tables_gets_one_line_and_exit_2(engine, engine_db, own_vhost):
    fill_as_the_engine(engine)
    role = f"dataspace_test_{uuid.uuid4().hex[:8]}"
    _execute(engine_db, f"CREATE ROLE {role} LOGIN")
    try:
        _execute(
            engine_db,
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
            f" GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
            f" GRANT CREATE ON SCHEMA public TO {role}",
        )
        before = snapshot(engine_db)
        code, output = _run_worker(own_vhost, extensions.make_dsn(engine_db, user=role))
        print(f"\n{output}")
        assert code == 2
        assert "Traceback" not in output
        lines = [line for line in output.splitlines() if "refused its schema step" in line]
        assert len(lines) == 1 and "must be owner" in lines[0], output
        assert snapshot(engine_db) == before
    finally:
        _execute(engine_db, f"DROP OWNED BY {role}; DROP ROLE {role}")


# -- 3. tables this package cannot use: refused ------------------------------------------
def _without_value(ddl: str) -> str:
    return ddl.replace("value BYTEA NOT NULL, ", "")


def _text_sequence_id(ddl: str) -> str:
    ddl = ddl.replace("sequence_id BIGSERIAL NOT NULL", "sequence_id TEXT NOT NULL")
    return ddl.replace(
        ", FOREIGN KEY(taskmanager_id) REFERENCES taskmanager (sequence_id) ON DELETE CASCADE", ""
    )


def _without_metadata(ddl: str) -> str:
    return "\n".join(line for line in ddl.splitlines() if "metadata" not in line)


def _text_generation_id(ddl: str) -> str:
    return ddl.replace(
        "CREATE TABLE header (taskmanager_id BIGINT NOT NULL, generation_id INTEGER",
        "CREATE TABLE header (taskmanager_id BIGINT NOT NULL, generation_id TEXT",
    )


def _extra_required_column(ddl: str) -> str:
    return ddl.replace("value BYTEA NOT NULL,", "value BYTEA NOT NULL, owner TEXT NOT NULL,")


@pytest.mark.parametrize(
    "change, expected",
    [
        (_without_value, "column dataproduct.value is missing"),
        (_text_sequence_id, "column taskmanager.sequence_id is text, this worker needs bigint"),
        (_without_metadata, "found table(s) taskmanager, dataproduct, header but not metadata"),
        (_text_generation_id, "column header.generation_id is text"),
        (_extra_required_column, "column dataproduct.owner is NOT NULL without a default"),
    ],
)
def test_an_incompatible_schema_is_refused_clearly(admin_dsn, change, expected):
    with services.scratch_database(admin_dsn) as dsn:
        _execute(dsn, change(ENGINE_SCHEMA))
        before = snapshot_tables(dsn)
        with pytest.raises(schema.SchemaAdoptionError) as refused:
            adopt(dsn)
        message = str(refused.value)
        print(f"\n{message}")
        assert "\n" not in message
        assert message.startswith("refusing to adopt the decision engine's tables in database ")
        assert expected in message
        assert snapshot_tables(dsn) == before


def snapshot_tables(dsn: str) -> set:
    return {
        r[0]
        for r in _execute(
            dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }


# -- 4. a second migration has nothing left to do -----------------------------------------
def test_migrating_an_adopted_database_again_applies_nothing(engine, engine_db):
    fill_as_the_engine(engine)
    ds = adopt(engine_db)
    try:
        first = versions(engine_db)
        middle = snapshot(engine_db)
        assert ds.create_tables() == []
        adopt(engine_db).close()  # a second worker starting
        assert versions(engine_db) == first
        assert snapshot(engine_db) == middle
    finally:
        ds.close()


def test_migrate_reports_the_adoption_once(engine, engine_db):
    fill_as_the_engine(engine)
    conn = psycopg2.connect(engine_db)
    try:
        with conn, conn.cursor() as cur:
            applied = schema.migrate(cur)
        assert applied[:3] == [1, 2, 3]
        assert applied == list(range(1, len(schema.migrations()) + 1))
        with conn, conn.cursor() as cur:
            assert schema.migrate(cur) == []
    finally:
        conn.close()


# -- INTEGER columns of the engine --------------------------------------------------------
def test_integer_columns_take_this_packages_writes_and_refuse_overflow(engine, engine_db):
    made = fill_as_the_engine(engine)
    b = made["b"]
    ds = adopt(engine_db)

    def insert(gen: int, key: str, header=HEADER) -> tuple:
        args = {
            "taskmanager_id": b,
            "generation_id": gen,
            "key": key,
            "value": b"v",
            "header": header,
            "metadata": METADATA,
        }
        return ("insert", args, lambda _result: b"", None)

    try:
        # several inserts as one statement (INSERT_MANY's ::bigint rows into INTEGER columns)
        ds.execute_many([insert(2**31 - 1, "max"), insert(7, "seven")])
        assert ds.get_dataproduct(b, 2**31 - 1, "max") == b"v"
        assert ds.get_header(b, 7, "seven")[2] == 7
        big = 2**31
        with pytest.raises(ValueError, match="integer out of range"):
            ds.insert(b, big, "big", b"v", HEADER, METADATA)
        with pytest.raises(ValueError, match="integer out of range"):
            ds.execute_many([insert(8, "eight"), insert(big, "big")])
        with pytest.raises(ValueError, match="integer out of range"):
            ds.insert(b, 9, "schema", b"v", {**HEADER, "schema_id": big}, METADATA)
        with pytest.raises(ValueError, match="integer out of range"):
            ds.duplicate_datablock(b, 7, big)
        with pytest.raises(KeyError):
            ds.get_dataproduct(b, 8, "eight")  # the batch went in as a whole or not at all
        # the worker's inserts with their claims (one prepared statement of arrays)
        claimed = [(*insert(g, k)[:3], uuid.uuid4().hex) for g, k in ((10, "ten"), (big, "big"))]
        with pytest.raises(ValueError, match="integer out of range"):
            ds.execute_many(claimed)
        with pytest.raises(ValueError, match="integer out of range"):
            ds.execute(*claimed[1])
        assert ds.execute(*claimed[0]) == (b"", False)
        # reads compare a generation beyond the column's range, finding nothing
        with pytest.raises(KeyError):
            ds.get_dataproduct(b, big, "max")
        assert ds.get_datablock(b, big) == {}
        assert ds.get_datablock(b, 10) == {"ten": b"v"}
    finally:
        ds.close()


def test_a_large_value_goes_into_an_adopted_database(engine, engine_db):
    made = fill_as_the_engine(engine)
    ds = adopt(engine_db)
    try:
        large = b"x" * 300_000  # from 256 KiB on, a value goes in by binary COPY
        ds.insert(made["b"], 3, "large", large, HEADER, METADATA)
        assert ds.get_dataproduct(made["b"], 3, "large") == large
        # the engine's integer generation_id keeps its range on the COPY path too
        with pytest.raises(ValueError, match="integer out of range"):
            ds.insert(made["b"], 2**31, "too far", large, HEADER, METADATA)
    finally:
        ds.close()
