"""The original decision engine's in-process DataSpace, as the baseline of the
remote path's ratios (issue 15: "remote / original, > 1 is faster").

Used by ``bench/run.py`` when ``decisionengine`` is importable (its
``SQLAlchemyDS`` on a scratch database of its own on the same PostgreSQL): the
same rows as this package's, in the same run. When it is not, ``run.py`` says so
in one line and gives the ratios against this package's own in-process store.
"""

from __future__ import annotations

import importlib

from psycopg2.extensions import parse_dsn

ENGINE_DATASPACE = "decisionengine.framework.dataspace.dataspace"
ENGINE_DATASOURCE = "decisionengine.framework.dataspace.datasources.sqlalchemy_ds"

#: (row, what the ratio compares): the rows of the issue's table
RATIO_ROWS = (
    ("insert_1", "ops"),
    ("insert_8", "ops"),
    ("duplicate", "ops"),
    ("insert_1mib", "mibs"),
    ("get_1mib", "mibs"),
    ("get_1", "ops"),
    ("get_8", "ops"),
    ("get_datablock", "ops"),
)


def sqlalchemy_url(dsn: str) -> str:
    """``postgresql://user[:password]@host:port/dbname`` for a libpq DSN."""
    parts = parse_dsn(dsn)
    auth = parts.get("user", "postgres")
    if parts.get("password"):
        auth += f":{parts['password']}"
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", "5432")
    return f"postgresql://{auth}@{host}:{port}/{parts.get('dbname', 'postgres')}"


def original_space(dsn: str):
    """``(the engine's DataSpace, "")``, or ``(None, why not)``."""
    try:
        module = importlib.import_module(ENGINE_DATASPACE)
    except Exception as exc:  # not installed, or broken: say which
        return None, f"not importable here ({type(exc).__name__}: {exc})"
    config = {
        "dataspace": {
            "datasource": {
                "module": ENGINE_DATASOURCE,
                "name": "SQLAlchemyDS",
                "config": {"url": sqlalchemy_url(dsn)},
            }
        }
    }
    try:
        return module.DataSpace(config), ""
    except Exception as exc:  # e.g. a SQLAlchemy it does not work with
        return None, f"could not start ({type(exc).__name__}: {exc})"


def ratio_lines(remote: dict, baseline: dict, label: str) -> list[str]:
    """A table of remote / ``baseline`` for each row of RATIO_ROWS both have."""
    lines = [f"| workload | remote / {label} (> 1: remote is faster) |", "|---|---|"]
    for row, measure in RATIO_ROWS:
        if row in remote and row in baseline and baseline[row][measure]:
            ratio = remote[row][measure] / baseline[row][measure]
            lines.append(f"| {remote[row]['name'].split(': ', 1)[1]} | {ratio:.2f} |")
    return lines
