"""Database errors as the exceptions the DataSource API documents.

A connection failure is retried (``retry.py``) and, if it lasts, becomes
DataSpaceConnectionError in ``PostgresDataSource._retrying``; every other
database error is final, and comes out as what a caller of the in-process store
expects: KeyError for a missing task manager, ValueError for a value the
database refuses, DataSpaceExistsError for a duplicate.
"""

from __future__ import annotations

import re

import psycopg2
import psycopg2.errors

from dataspace_core.errors import DataSpaceError, DataSpaceExistsError

_KEY_DETAIL = re.compile(r"Key \((\w+)\)=\(([^)]*)\)")


def translate(exc: psycopg2.Error) -> BaseException:
    """The API's exception for a database error that retrying will not cure."""
    diag = getattr(exc, "diag", None)
    first_line = (diag and diag.message_primary) or str(exc).strip() or type(exc).__name__
    if isinstance(exc, psycopg2.errors.UniqueViolation):
        return DataSpaceExistsError(f"already stored: {exc.diag.message_detail or first_line}")
    if isinstance(exc, psycopg2.errors.ForeignKeyViolation):
        # the detail is PostgreSQL's sentence ("Key (taskmanager_id)=(999) is not
        # present in table ..."): a caller wants the id it named, not SQL
        found = _KEY_DETAIL.search(exc.diag.message_detail or "")
        named = f" with {found.group(1)} {found.group(2)}" if found else ""
        return KeyError(f"no such task manager{named}")
    if isinstance(exc, psycopg2.errors.CheckViolation):
        return ValueError(f"value out of range: {first_line}")
    if isinstance(exc, (psycopg2.DataError, psycopg2.errors.ProgramLimitExceeded)):
        return ValueError(first_line)
    return DataSpaceError(f"database error: {first_line}")
