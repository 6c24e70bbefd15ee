"""The body of every DataSpace operation, run on a cursor inside a transaction.

Each function takes a cursor and the operation's checked arguments (see
``dataspace_core.catalog``) and returns the result; ``BODIES`` names each one
for its operation. None commits: the caller owns the transaction, so a
request's effect and its idempotency record commit together
(``PostgresDataSource.execute_many``, ``idempotency.apply_many``). A missing
row raises KeyError, which rolls the transaction back. The SQL text is in ``sql.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2.extras import execute_values

from dataspace_core import catalog, checks

from . import prepared, schema, sql
from .copy_rows import CHUNK, ProductRowStream, ValueSink

Args = dict[str, Any]


def _product_missing(args: Args) -> str:
    return (
        f"no product {args['key']!r:.200} in generation {args['generation_id']} "
        f"of task manager {args['taskmanager_id']}"
    )


def _named(args: Args) -> str:
    suffix = f" and id {args['taskmanager_id']!r}" if args["taskmanager_id"] is not None else ""
    return f"{args['taskmanager_name']!r:.200}{suffix}"


def one_row(cur, query: str, params: Args):
    """The first row ``query`` returns, or None."""
    cur.execute(query, params)
    return cur.fetchone()


def _taskmanager(row) -> dict:
    return {"sequence_id": row[0], "taskmanager_id": row[1], "name": row[2], "datestamp": row[3]}


def _write_params(args: Args) -> dict:
    return {
        "taskmanager_id": args["taskmanager_id"],
        "generation_id": args["generation_id"],
        "key": args["key"],
        "value": psycopg2.Binary(args["value"]),
        **args["header"],
        **args["metadata"],
    }


def _newest_generation(cur, args: Args) -> int | None:
    return one_row(cur, sql.NEWEST_GENERATION, args)[0]


# -- task managers ------------------------------------------------------------------
def store_taskmanager(cur, args: Args) -> int:
    return one_row(cur, sql.STORE_TASKMANAGER, args)[0]


def get_taskmanager(cur, args: Args) -> dict:
    row = one_row(cur, sql.GET_TASKMANAGER, args)
    if row is None:
        raise KeyError(f"no task manager named {_named(args)}")
    return _taskmanager(row)


def get_taskmanagers(cur, args: Args) -> list[dict]:
    cur.execute(sql.GET_TASKMANAGERS, args)
    return [_taskmanager(r) for r in cur.fetchall()]


def get_last_generation_id(cur, args: Args) -> int:
    (generation,) = one_row(cur, sql.GET_LAST_GENERATION_ID, args)
    if generation is None:
        raise KeyError(f"no products for task manager {_named(args)}")
    return generation


# -- products -----------------------------------------------------------------------
#: values from this size on go in through binary COPY (see copy_rows.py)
COPY_FROM_BYTES = 256 * 1024


def insert(cur, args: Args) -> None:
    if not inline_value(args):
        stream = ProductRowStream(
            args["taskmanager_id"],
            args["generation_id"],
            args["key"],
            args["value"],
            widths=_id_column_widths(cur),
        )
        cur.copy_expert(sql.COPY_PRODUCT, stream, size=CHUNK)
        cur.execute(sql.INSERT_HEADER_METADATA, {**args, **args["header"], **args["metadata"]})
        return
    cur.execute(sql.INSERT, _write_params(args))


def _id_column_widths(cur) -> tuple[int, int]:
    """The byte widths of dataproduct's id columns, asked for each large insert:
    one catalogue read is nothing beside a value of 256 KiB or more, and a cache
    would have to know when a migration changes them."""
    cur.execute(sql.ID_COLUMN_WIDTHS)
    widths = dict(cur.fetchall())
    return widths["taskmanager_id"], widths["generation_id"]


def insert_many(cur, many: list[Args]) -> None:
    """Several inserts in as few statements as it takes, in order: all go in, or none
    (then each runs alone). Small ones together in one statement; large ones by COPY."""
    small: list[Args] = []
    for args in many:
        if inline_value(args):
            small.append(args)
            continue
        _insert_small(cur, small)
        insert(cur, args)
    _insert_small(cur, small)


def _insert_small(cur, many: list[Args]) -> None:
    if many:
        rows = [_write_params(args) for args in many]
        many.clear()
        execute_values(
            cur, sql.INSERT_MANY, rows, template=sql.INSERT_MANY_ROW, page_size=len(rows)
        )


def inline_value(args: Args) -> bool:
    """Whether an insert's value goes in with its statement (not by COPY)."""
    return len(args["value"]) < COPY_FROM_BYTES


_CLAIMED_INSERTS = prepared.Statement("dataspace_claimed_inserts", sql.CLAIMED_INSERTS)
_GET_SMALL_DATAPRODUCT = prepared.Statement("dataspace_get_dataproduct", sql.GET_SMALL_DATAPRODUCT)
_GET_DATABLOCK = prepared.Statement("dataspace_get_datablock", sql.GET_DATABLOCK)
_GET_SMALL_DATABLOCK = prepared.Statement("dataspace_get_small_datablock", sql.GET_SMALL_DATABLOCK)


def insert_claimed(cur, claims: list[tuple[str, bytes, Args]]) -> set[str]:
    """Small inserts, each with its idempotency claim ``(message_id, reply, args)``,
    in one statement (``sql.CLAIMED_INSERTS``); returns the message_ids it claimed.
    An insert whose id was claimed before writes nothing."""
    columns: dict[str, list] = {name: [] for name, _ in sql.CLAIMED_INSERTS_COLUMNS}
    for n, (message_id, reply, args) in enumerate(claims):
        row = {
            **_write_params(args),
            "n": n,
            "message_id": message_id,
            "operation": "insert",
            "reply": psycopg2.Binary(reply),
        }
        for name, values in columns.items():
            values.append(row[name])
    prepared.execute(cur, _CLAIMED_INSERTS, columns)
    return {row[0] for row in cur.fetchall()}


def update(cur, args: Args) -> None:
    if one_row(cur, sql.UPDATE, _write_params(args)) != (1, 1, 1):
        raise KeyError(_product_missing(args))


#: what ``small_dataproduct`` returns for a value too large to come in its row
LARGE = object()


def small_dataproduct(args: Args, rows: list) -> bytes | object:
    """A get_dataproduct's value from ``_GET_SMALL_DATAPRODUCT``'s rows; ``LARGE``
    when it must be read by COPY; KeyError when there is none."""
    if not rows:
        raise KeyError(_product_missing(args))
    return LARGE if rows[0][0] is None else bytes(rows[0][0])


def small_datablock(_args: Args, rows: list) -> dict[str, bytes] | object:
    """A get_datablock's result from ``_GET_SMALL_DATABLOCK``'s rows; ``LARGE``
    when its values are too many bytes to come that way."""
    if rows and rows[0][1] is None:
        return LARGE
    return datablock(_args, rows)


def datablock(_args: Args, rows: list) -> dict[str, bytes]:
    """A get_datablock's result from ``_GET_DATABLOCK``'s rows."""
    return {key: bytes(value) for key, value in rows}


@dataclass(frozen=True)
class SingleStatementRead:
    """A read that is one prepared statement and a function of its rows: what can
    run on an asynchronous connection (inline_reads.py) as well as on a cursor."""

    statement: prepared.Statement
    #: the statement's parameters from the checked arguments
    params: Callable[[Args], Args]
    #: (checked arguments, rows) -> the result, ``LARGE``, or raises KeyError
    result: Callable[[Args, list], Any]


SINGLE_STATEMENT_READS = {
    "get_dataproduct": SingleStatementRead(
        _GET_SMALL_DATAPRODUCT,
        lambda args: {**args, "copy_from": COPY_FROM_BYTES},
        small_dataproduct,
    ),
    "get_datablock": SingleStatementRead(_GET_DATABLOCK, lambda args: args, datablock),
}
#: the reads the worker's I/O thread runs (inline_reads.py): results of at most
#: ``COPY_FROM_BYTES`` of values, quick to decode; a larger one comes back ``LARGE``
INLINE_READS = {
    "get_dataproduct": SINGLE_STATEMENT_READS["get_dataproduct"],
    "get_datablock": SingleStatementRead(
        _GET_SMALL_DATABLOCK, lambda args: {**args, "within": COPY_FROM_BYTES}, small_datablock
    ),
}


def _single_statement(cur, operation: str, args: Args):
    read = SINGLE_STATEMENT_READS[operation]
    prepared.execute(cur, read.statement, read.params(args))
    return read.result(args, cur.fetchall())


def get_dataproduct(cur, args: Args) -> bytes:
    value = _single_statement(cur, "get_dataproduct", args)
    if value is not LARGE:
        return value
    sink = ValueSink()  # a large value: binary COPY, not hex text
    cur.copy_expert(cur.mogrify(sql.COPY_VALUE_OUT, args).decode(), sink, size=CHUNK)
    value = sink.value()
    if value is None:  # deleted between the two statements (no lock is held)
        raise KeyError(_product_missing(args))
    return value


def get_dataproducts(cur, args: Args) -> list[dict]:
    cur.execute(sql.GET_DATAPRODUCTS, args)
    return [
        {"taskmanager_id": r[0], "generation_id": r[1], "key": r[2], "value": bytes(r[3])}
        for r in cur.fetchall()
    ]


def get_datablock(cur, args: Args) -> dict[str, bytes]:
    return _single_statement(cur, "get_datablock", args)


def get_header(cur, args: Args) -> tuple:
    row = one_row(cur, sql.GET_HEADER, args)
    if row is None:
        raise KeyError(_product_missing(args))
    return tuple(row)


def get_metadata(cur, args: Args) -> tuple:
    row = one_row(cur, sql.GET_METADATA, args)
    if row is None:
        raise KeyError(_product_missing(args))
    return tuple(row)


def duplicate_datablock(cur, args: Args) -> None:
    cur.execute(sql.DUPLICATE_DATABLOCK, args)


def delete_data_older_than(cur, args: Args) -> dict[str, int]:
    (products,) = one_row(cur, sql.COUNT_PRODUCTS_OLDER_THAN, args)
    cur.execute(sql.DELETE_OLDER_THAN, args)
    return {"taskmanagers": cur.rowcount, "dataproducts": products}


def delete(cur, args: Args) -> int:
    generation = None
    if not args["all_generations"]:
        generation = _newest_generation(cur, args)
        if generation is None:
            return 0
    return one_row(cur, sql.DELETE_GENERATIONS, {**args, "generation_id": generation})[0]


def mark_expired(cur, args: Args) -> None:
    cur.execute(sql.MARK_EXPIRED, args)
    if cur.rowcount != 1:
        raise KeyError(_product_missing(args))


def mark_demented(cur, args: Args) -> int:
    generation = args["generation_id"]
    if generation is None:
        generation = _newest_generation(cur, args)
        if generation is None:
            raise KeyError(f"task manager {args['taskmanager_id']} has no products")
    wanted = set(args["keys"])
    cur.execute(
        sql.MARK_DEMENTED,
        {**args, "generation_id": generation, "keys": sorted(wanted), "now": int(time.time())},
    )
    missing = wanted - {row[0] for row in cur.fetchall()}
    if missing:
        raise KeyError(
            f"no product(s) {sorted(missing)!r:.400} in generation {generation} "
            f"of task manager {args['taskmanager_id']}"
        )
    return len(wanted)


def get_schema(cur, args: Args):
    table = args["table"]
    tables = [table] if table else list(checks.TABLES)
    described: dict[str, list[dict]] = {t: [] for t in tables}
    cur.execute(sql.GET_SCHEMA, {"tables": tables})
    for table_name, column, data_type, nullable, default in cur.fetchall():
        described[table_name].append(
            {"name": column, "type": data_type, "nullable": nullable, "default": default}
        )
    return described[table] if table else described


def create_tables(cur, args: Args) -> list[int]:
    return schema.migrate(cur)


#: operations whose result is None: their reply is known before they run
RETURN_NOTHING = catalog.RETURN_NOTHING

#: operation -> its body, for every operation that runs in one transaction (a reap
#: runs in many: reaping.py)
BODIES: dict[str, Callable[[Any, Args], Any]] = {
    "store_taskmanager": store_taskmanager,
    "get_taskmanager": get_taskmanager,
    "get_taskmanagers": get_taskmanagers,
    "get_last_generation_id": get_last_generation_id,
    "insert": insert,
    "update": update,
    "get_dataproduct": get_dataproduct,
    "get_dataproducts": get_dataproducts,
    "get_datablock": get_datablock,
    "get_header": get_header,
    "get_metadata": get_metadata,
    "duplicate_datablock": duplicate_datablock,
    "delete_data_older_than": delete_data_older_than,
    "delete": delete,
    "mark_expired": mark_expired,
    "mark_demented": mark_demented,
    "get_schema": get_schema,
    "create_tables": create_tables,
}
