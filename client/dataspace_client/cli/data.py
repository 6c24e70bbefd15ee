"""``dataspace get`` and ``dataspace put``: one product's value, read or stored
through the client library (``RemoteDataSource``) like the decision engine's."""

from __future__ import annotations

import pprint
import sys
from typing import Any

import orjson

from dataspace_core.errors import DataSpaceError, DataSpaceExistsError

from ..values import PickleRefusedError, ValueTooLargeError, decode_value, encode_value
from .broker import CREATOR, _check_broker, _source
from .output import EXIT_CONFIG, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, _emit, _error


def _is_json(value: Any) -> bool:
    """Plain JSON data: printing it as JSON loses nothing."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _get(args) -> int:
    _check_broker(args)
    source = _source(args)
    try:
        stored = source.get_dataproduct(args.tm_seq, args.generation, args.key)
    except KeyError:
        # what was asked for, in its own words (not the store's: it may be SQL)
        _error(
            f"not found: product {args.key!r} of task manager {args.tm_seq}, generation "
            f"{args.generation} (check TM_SEQ, GEN and KEY)"
        )
        return EXIT_NOT_FOUND
    finally:
        source.close()
    try:
        value = decode_value(stored, allow_pickle=args.allow_pickle)
    except PickleRefusedError:
        _error(
            "the product is pickled; pass --allow-pickle to unpickle it (which runs code "
            "chosen by whoever wrote it)"
        )
        return EXIT_FAILED
    except ValueTooLargeError as exc:  # a bomb, or a product larger than this reader allows
        _error(f"get: {exc}")
        return EXIT_FAILED
    except DataSpaceError:
        _emit(
            f"dataspace: not in DataBlock format: {len(stored)} raw bytes",
            file=sys.stderr,
        )
        _emit(stored.hex() if args.hex else repr(stored))
        return EXIT_OK
    if _is_json(value):
        _emit(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    else:
        _emit(pprint.pformat(value, sort_dicts=False))
    return EXIT_OK


def _put(args) -> int:
    from ..datablock import Header, Metadata

    text = sys.stdin.read() if args.value == "-" else args.value
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _error(f"put: VALUE is not JSON: {exc}")
        return EXIT_CONFIG
    if not isinstance(value, dict):
        _error(
            f"put: VALUE must be a JSON object, e.g. '{{\"cpus\": 4}}', not {type(value).__name__}"
        )
        return EXIT_CONFIG
    stored = encode_value(value, allow_pickle=False)
    header = Header(args.tm_seq, creator=CREATOR)
    metadata = Metadata(args.tm_seq, state="NEW", generation_id=args.generation)
    _check_broker(args)
    source = _source(args)
    try:
        try:
            source.insert(args.tm_seq, args.generation, args.key, stored, header, metadata)
            done = "inserted"
        except DataSpaceExistsError:
            source.update(args.tm_seq, args.generation, args.key, stored, header, metadata)
            done = "updated"
    except KeyError:
        _error(
            f"not found: task manager {args.tm_seq} (put stores products of a task manager "
            "that exists: check TM_SEQ)"
        )
        return EXIT_NOT_FOUND
    finally:
        source.close()
    _emit(
        f"{done} product {args.key!r} of task manager {args.tm_seq}, generation "
        f"{args.generation} ({len(stored)} bytes stored)"
    )
    return EXIT_OK
