"""Prepared statements (dataspace_worker.prepared): planned once a session, prepared
again by a new session, and still there after a rollback."""

from __future__ import annotations

import psycopg2
import pytest

from dataspace_worker import prepared


def test_named_parameters_become_positional_in_order_of_first_use():
    statement = prepared.Statement("s", "SELECT %(b)s::int, %(a)s::text, %(b)s::int + 1")
    assert statement.parameters == ["b", "a"]
    assert statement.prepare == "PREPARE s AS SELECT $1::int, $2::text, $1::int + 1"
    assert statement.execute == "EXECUTE s (%s, %s)"
    assert prepared.Statement("t", "SELECT 1").execute == "EXECUTE t"


def _prepared_in(cur) -> list[str]:
    cur.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
    return [row[0] for row in cur.fetchall()]


@pytest.fixture
def connect(pg_dsn):
    opened = []

    def new():
        conn = psycopg2.connect(pg_dsn)
        opened.append(conn)
        return conn

    yield new
    for conn in opened:
        conn.close()


def test_a_session_prepares_a_statement_once_and_keeps_it_past_a_rollback(connect):
    statement = prepared.Statement("dataspace_test_add", "SELECT %(x)s::bigint + %(y)s::bigint")
    conn = connect()
    with conn.cursor() as cur:
        prepared.execute(cur, statement, {"x": 2, "y": 3})
        assert cur.fetchone() == (5,)
        conn.rollback()
        prepared.execute(cur, statement, {"x": -(2**63), "y": 1})  # EXECUTE, no PREPARE
        assert cur.fetchone() == (-(2**63) + 1,)
        assert cur.query.startswith(b"EXECUTE dataspace_test_add")
        assert _prepared_in(cur) == ["dataspace_test_add"]

    other = connect()  # a session of its own: prepares it there
    with other.cursor() as cur:
        assert _prepared_in(cur) == []
        prepared.execute(cur, statement, {"x": 1, "y": 1})
        assert cur.fetchone() == (2,)


def test_a_statement_whose_prepare_failed_is_prepared_at_its_next_use(connect):
    statement = prepared.Statement("dataspace_test_late", "SELECT count(*) FROM dataspace_test_t")
    conn = connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS dataspace_test_t")
        with pytest.raises(psycopg2.errors.UndefinedTable):
            prepared.execute(cur, statement, {})
        cur.execute("CREATE TABLE dataspace_test_t (x int)")
        try:
            prepared.execute(cur, statement, {})
            assert cur.fetchone() == (0,)
            cur.execute("ALTER TABLE dataspace_test_t ADD COLUMN y int")  # replanned by the server
            cur.execute("INSERT INTO dataspace_test_t VALUES (1, 2)")
            prepared.execute(cur, statement, {})
            assert cur.fetchone() == (1,)
        finally:
            cur.execute("DROP TABLE dataspace_test_t")


def test_a_statement_gone_bad_under_a_session_is_prepared_again(connect):
    """A result type changed under a prepared statement ("cached plan must not change
    result type"), or the statement gone from the session: recovered at once without
    a transaction, and at the next use after the transaction it aborted."""
    statement = prepared.Statement("dataspace_test_keys", "SELECT key FROM dataspace_test_k")
    conn = connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS dataspace_test_k")
        cur.execute("CREATE TABLE dataspace_test_k (key varchar(10))")
        try:
            cur.execute("INSERT INTO dataspace_test_k VALUES ('a')")
            prepared.execute(cur, statement, {})
            assert cur.fetchall() == [("a",)]

            cur.execute("ALTER TABLE dataspace_test_k ALTER COLUMN key TYPE text")
            prepared.execute(cur, statement, {})  # without a transaction: at once
            assert cur.fetchall() == [("a",)]

            cur.execute("DEALLOCATE ALL")  # gone, as behind a pooler in transaction mode
            prepared.execute(cur, statement, {})
            assert cur.fetchall() == [("a",)]

            cur.execute("ALTER TABLE dataspace_test_k ALTER COLUMN key TYPE varchar(20)")
            conn.autocommit = False
            with pytest.raises(psycopg2.errors.FeatureNotSupported):
                prepared.execute(cur, statement, {})  # in a transaction: it is aborted
            conn.rollback()
            prepared.execute(cur, statement, {})  # the next use prepares it again
            assert cur.fetchall() == [("a",)]
            conn.rollback()
        finally:
            conn.autocommit = True
            cur.execute("DROP TABLE dataspace_test_k")
