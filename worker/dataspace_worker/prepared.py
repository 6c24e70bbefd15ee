"""Server-side prepared statements for the hot path: each planned once a session.

PostgreSQL parses and plans every statement psycopg2 sends as text. For the
insert with its idempotency claim (five common table expressions) that was about
190 µs of the 430 µs the server spent on one insert; a point select pays the
same way on a smaller scale (docs/performance.md, "Prepared statements"). A
statement prepared once in a session is only executed after that; PostgreSQL
plans it again by itself when the schema under it changes (a migration).

A ``Statement`` is written as the rest of ``sql.py``, with ``%(name)s``
parameters: it is prepared (``PREPARE``) the first time a connection runs it and
executed by name (``EXECUTE``) from then on. Which sessions have which statement
is kept per connection object: a connection opened again (after an error, or in
a forked child) is a new object and prepares again. Prepared statements outlive
the transaction that made them, rolled back or not.

A parameter's type is inferred once, at ``PREPARE``: cast a parameter whose
context leaves it open (``%(key)s::text IS NULL``), and cast ids to bigint
(``%(generation_id)s::bigint``) so that a database adopted from the engine,
whose generation_id is an integer column, compares a value beyond its range
(finding nothing) instead of refusing it.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Mapping

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
#: connection -> names of the statements prepared in its session
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execute(cur, statement: Statement, params: Mapping) -> None:
    """Run ``statement`` with ``params`` on ``cur``, preparing it first in a
    session that has not seen it. Results are read from ``cur`` as usual."""
    conn = cur.connection
    with _lock:
        names = _prepared.setdefault(conn, set())
        known = statement.name in names
    if not known:
        cur.execute(statement.prepare)
        with _lock:
            names.add(statement.name)
    cur.execute(statement.execute, [params[name] for name in statement.parameters])
