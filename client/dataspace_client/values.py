"""Product values in the decision engine's own format, and the pickle helpers.

The store keeps values as opaque bytes; the DataBlock encodes them exactly as the
decision engine's DataBlock does, so either side reads what the other wrote:

    compress({"pickled": False, "value": a_dict})
    compress({"pickled": True, "value": pickle.dumps(anything_else, HIGHEST_PROTOCOL)})

where ``compress`` is zlib (level 9) of the latin-1 encoding of ``str()``. Reading
is ``ast.literal_eval`` of the latin-1 decompressed text (which evaluates no
code), then unpickling when ``pickled`` is true.

One extension, readable by the engine: a dict holding text outside latin-1 (the
engine's ``compress`` raises ``UnicodeEncodeError`` on it) is written with such
characters as ``\\uXXXX`` escapes inside its string literals, which
``ast.literal_eval`` turns back into the same text.

Earlier releases of this package wrote a bare dict literal (UTF-8), or
``{"pickled_obj": <zdumps bytes>}`` for other objects; ``decode_value`` still
reads both, so databases written by them stay readable.

Reading a pickled product unpickles it, which runs code chosen by whoever wrote
it. Deployments whose writers are not trusted set
``dataspace.allow_pickle: false``; then pickled products are refused both ways.

Reading is bounded, whoever wrote the bytes: decompression stops at
``max_value_bytes()`` (64 MiB, as the worker's ``max_body``, or env
``DATASPACE_MAX_VALUE_BYTES``), and a
literal holding more than ``max_value_items()`` items (1,000,000, or env
``DATASPACE_MAX_VALUE_ITEMS``; the ``,`` and ``:`` outside string literals are
counted before evaluating) is refused: ``ast.literal_eval`` takes about 1 KB of
memory per item, so reading one product stays near 1 GB at worst. Both raise
``ValueTooLargeError`` (a DataSpaceError) naming the limit to raise; a literal
nested too deeply to evaluate raises DataSpaceError too.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import zlib
from typing import Any

from dataspace_core.errors import DataSpaceError

#: the text encoding of the engine's format
ENCODING = "latin-1"
#: the wrapper's fields, as the engine writes them
PICKLED, VALUE = "pickled", "value"
#: the wrapper an earlier release of this package used for pickled values
LEGACY_PICKLE_FIELD = "pickled_obj"


#: decompressed bytes of one value, unless env DATASPACE_MAX_VALUE_BYTES says otherwise
DEFAULT_MAX_VALUE_BYTES = 64 * 1024 * 1024
#: items (separators outside strings) of one literal, unless DATASPACE_MAX_VALUE_ITEMS
DEFAULT_MAX_VALUE_ITEMS = 1_000_000
INFLATE_CHUNK = 4 * 1024 * 1024


class PickleRefusedError(DataSpaceError):
    """A pickled product was met while the configuration forbids pickles."""


class ValueTooLargeError(DataSpaceError):
    """A stored value exceeds a reading limit (decompressed bytes, or literal items)."""


def _limit(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DataSpaceError(f"{name} must be a positive integer, got {text!r}")
    return value


def max_value_bytes() -> int:
    """The most bytes one stored value may decompress to (env DATASPACE_MAX_VALUE_BYTES)."""
    return _limit("DATASPACE_MAX_VALUE_BYTES", DEFAULT_MAX_VALUE_BYTES)


def max_value_items() -> int:
    """The most items one stored literal may hold (env DATASPACE_MAX_VALUE_ITEMS)."""
    return _limit("DATASPACE_MAX_VALUE_ITEMS", DEFAULT_MAX_VALUE_ITEMS)


def _inflate(data: bytes) -> bytearray | None:
    """``zlib.decompress(data)``, stopping at ``max_value_bytes()`` (then
    ValueTooLargeError); None when ``data`` is not a whole zlib stream (then it is
    read as uncompressed, as the engine does)."""
    limit = max_value_bytes()
    inflater = zlib.decompressobj()
    # a bytearray grown in place: no second copy of the whole value on the way
    raw = bytearray()
    pending = data
    try:
        # in chunks: refusing a bomb takes the limit plus one chunk, not twice the limit
        while not inflater.eof:
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            if len(raw) + len(chunk) > limit:
                raise ValueTooLargeError(
                    f"stored value decompresses to more than {limit:,} bytes ({len(data):,} "
                    "bytes compressed): refused; set DATASPACE_MAX_VALUE_BYTES higher to read it"
                )
            raw += chunk
            if not chunk and not pending:
                return None  # truncated: zlib.decompress would have raised
    except zlib.error:
        return None
    return raw


def zdumps(obj: Any) -> bytes:
    """Pickle and compress.

    :param obj: a python object
    :return: compressed bytes
    """
    return zlib.compress(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), 9)


def zloads(zbytes: bytes | str) -> Any:
    """Decompress and unpickle; an uncompressed pickle is unpickled as it is.

    Like the engine's, it also takes a pickle as a latin-1 ``str`` (how pickles
    were passed around as text by older callers).

    :param zbytes: compressed bytes (or a pickle, as bytes or latin-1 text)
    :return: the python object
    """
    if isinstance(zbytes, str):
        return pickle.loads(zbytes.encode(ENCODING), encoding=ENCODING)  # noqa: S301
    raw = _inflate(zbytes)
    if raw is None:
        raw = zbytes
    return pickle.loads(raw)  # noqa: S301 - documented: callers opt in to pickles


def compress(obj: Any) -> bytes:
    """Compress the ``str()`` of a python object, latin-1 encoded, as the engine does.

    Text outside latin-1 is written as backslash escapes (see the module docstring).

    :param obj: python object
    :return: compressed bytes
    """
    return zlib.compress(str(obj).encode(ENCODING, "backslashreplace"), 9)


def decompress(zbytes: bytes) -> str:
    """Decompress a zipped byte stream and convert it to a string (latin-1).

    Bytes that are not compressed are decoded as they are, as the engine does.

    :param zbytes: byte stream
    :return: uncompressed string
    """
    raw = _inflate(zbytes)
    if raw is None:
        raw = bytes(zbytes)
    return raw.decode(ENCODING)


def _literal_dict(value: dict) -> str:
    """``str(value)``, after checking it reads back: the engine would store a dict
    holding other objects as text nobody can read; refuse it at once instead."""
    text = str(value)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise TypeError(
            "a dict product must hold only Python literals (str, bytes, numbers, "
            "tuples, lists, dicts, sets, bool, None); wrap other objects in a "
            f"non-dict value to have them pickled ({exc})"
        ) from None
    return text


def encode_value(value: Any, allow_pickle: bool = True) -> bytes:
    """Turn a DataBlock value into the bytes the engine's DataBlock would store."""
    if isinstance(value, dict):
        _literal_dict(value)
        return compress({PICKLED: False, VALUE: value})
    if not allow_pickle:
        raise PickleRefusedError(
            f"refusing to pickle a {type(value).__name__}: allow_pickle is false"
        )
    return compress({PICKLED: True, VALUE: pickle.dumps(value, pickle.HIGHEST_PROTOCOL)})


# What Python's tokenizer reads as one string literal (any prefix, triple-quoted first)
# or as a comment: separators in there are not items.
_NOT_ITEMS = re.compile(
    rb"(?:"
    rb"'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''"
    rb'|"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""'
    rb"|'[^'\\\n]*(?:\\.[^'\\\n]*)*'"
    rb'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"'
    rb")|#[^\n]*",
    re.DOTALL,
)


_QUOTE_OR_COMMENT = re.compile(rb"['\"#]")


def _count_items(raw: bytes, limit: int) -> int:
    """The ``,`` and ``:`` outside string literals and comments (what the memory
    ``ast.literal_eval`` takes grows with), counted until past ``limit``."""
    items = raw.count(b",") + raw.count(b":")
    if items <= limit:
        return items  # the usual case: no need to tell strings apart
    items = start = 0
    while True:
        found = _QUOTE_OR_COMMENT.search(raw, start)
        end = found.start() if found else len(raw)
        items += raw.count(b",", start, end) + raw.count(b":", start, end)
        if items > limit or found is None:
            return items
        literal = _NOT_ITEMS.match(raw, end)
        start = literal.end() if literal else end + 1  # unterminated: literal_eval refuses it


def _evaluate(raw: bytes, encoding: str) -> Any:
    limit = max_value_items()
    if _count_items(raw, limit) > limit:
        raise ValueTooLargeError(
            f"stored product holds more than {limit:,} items ({len(raw):,} bytes): refused, "
            "as reading it takes about 1 KB of memory per item; set DATASPACE_MAX_VALUE_ITEMS "
            "higher to read it"
        )
    try:
        return ast.literal_eval(raw.decode(encoding))
    except (MemoryError, RecursionError) as exc:
        raise DataSpaceError(
            "stored product is not in DataBlock format: its literal is nested too deeply "
            f"to read ({type(exc).__name__})"
        ) from None
    except (UnicodeDecodeError, ValueError, SyntaxError) as exc:
        raise DataSpaceError(
            f"stored product is not in DataBlock format: {type(exc).__name__}: {exc}"
        ) from None


def _is_engine_wrapper(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 2
        and isinstance(value.get(PICKLED), bool)
        and VALUE in value
    )


def _unpickle(data: Any, allow_pickle: bool) -> Any:
    if not allow_pickle:
        raise PickleRefusedError("refusing to unpickle a product: allow_pickle is false")
    return zloads(data)


def decode_value(stored: bytes, allow_pickle: bool = True) -> Any:
    """Turn stored bytes back into the DataBlock value: the engine's format, or
    either format of earlier releases of this package."""
    raw = _inflate(stored)
    if raw is None:
        raw = bytes(stored)  # the engine reads uncompressed text too
    value = _evaluate(raw, ENCODING)
    if _is_engine_wrapper(value):
        return _unpickle(value[VALUE], allow_pickle) if value[PICKLED] else value[VALUE]
    if not raw.isascii():
        value = _evaluate(raw, "utf-8")  # an earlier release wrote UTF-8
    if isinstance(value, dict) and set(value) == {LEGACY_PICKLE_FIELD}:
        return _unpickle(value[LEGACY_PICKLE_FIELD], allow_pickle)
    return value
