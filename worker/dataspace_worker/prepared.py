"""Server-side prepared statements for the hot path: each planned once a session.

PostgreSQL parses and plans every statement psycopg2 sends as text. For the
insert with its idempotency claim (five common table expressions) that was about
190 µs of the 430 µs the server spent on one insert; a point select pays the
same way on a smaller scale (docs/performance.md, "What was done"). A
statement prepared once in a session is only executed after that; PostgreSQL
plans it again by itself when a table under it changes, as long as the columns
it returns keep their types (their types are fixed by casts in ``sql.py``).

A ``Statement`` is written as the rest of ``sql.py``, with ``%(name)s``
parameters: it is prepared (``PREPARE``) the first time a connection runs it and
executed by name (``EXECUTE``) from then on. Which sessions have which statement
is kept per connection object: a connection opened again (after an error, or in
a forked child) is a new object and prepares again. Prepared statements outlive
the transaction that made them, rolled back or not.

A session whose statements went bad under it (a result type changed by a
migration: "cached plan must not change result type"; or gone: a pooler in
transaction mode handing the session's statements to another server session,
which this service does not support) is recovered: its statements are
deallocated and prepared again, at once when the connection runs without a
transaction, else at its next use (the error rolls the transaction back first).

A parameter's type is inferred once, at ``PREPARE``: cast a parameter whose
context leaves it open (``%(key)s::text IS NULL``), and cast ids to bigint
(``%(generation_id)s::bigint``) so that a database adopted from the engine,
whose generation_id is an integer column, compares a value beyond its range
(finding nothing) instead of refusing it.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Mapping

import psycopg2.errors

_PARAMETER = re.compile(r"%\((\w+)\)s")


class Statement:
    """One prepared statement: its session-wide name and its text."""

    def __init__(self, name: str, text: str):
        """``text`` with ``%(name)s`` parameters, each becoming ``$n`` in the
        order they first appear."""
        self.name = name
        self.parameters: list[str] = []

        def positional(match: re.Match) -> str:
            if match.group(1) not in self.parameters:
                self.parameters.append(match.group(1))
            return f"${self.parameters.index(match.group(1)) + 1}"

        self.prepare = f"PREPARE {name} AS {_PARAMETER.sub(positional, text)}"
        placeholders = ", ".join("%s" for _ in self.parameters)
        self.execute = f"EXECUTE {name} ({placeholders})" if self.parameters else f"EXECUTE {name}"

    def __repr__(self) -> str:
        return f"Statement({self.name!r})"


_lock = threading.Lock()
#: connection -> names of the statements prepared in its session; None: unknown
#: (deallocate every one before preparing again)
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _new_lock_in_child() -> None:
    """A lock held by a parent's thread at a fork would stay held in the child."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)

#: what EXECUTE raises when the session's statement went bad or is not there
_STALE = (psycopg2.errors.FeatureNotSupported, psycopg2.errors.InvalidSqlStatementName)


def execute(cur, statement: Statement, params: Mapping) -> None:
    """Run ``statement`` with ``params`` on ``cur``, preparing it first in a
    session that has not seen it. Results are read from ``cur`` as usual."""
    values = [params[name] for name in statement.parameters]
    _ensure(cur, statement)
    try:
        cur.execute(statement.execute, values)
    except _STALE:
        with _lock:
            _prepared[cur.connection] = None
        if not cur.connection.autocommit:
            raise  # the transaction is aborted: recovered at the next use
        _ensure(cur, statement)
        cur.execute(statement.execute, values)


def _ensure(cur, statement: Statement) -> None:
    """Prepare ``statement`` in ``cur``'s session unless it is there already."""
    conn = cur.connection
    with _lock:
        names = _prepared.get(conn, set())
    if names is None:  # statements gone bad: start the session's set afresh
        cur.execute("DEALLOCATE ALL")
        names = set()
    if statement.name not in names:
        cur.execute(statement.prepare)
        names = names | {statement.name}
    with _lock:
        _prepared[conn] = names
