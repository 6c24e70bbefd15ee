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
"""

from __future__ import annotations

import ast
import pickle
import zlib
from typing import Any

from .errors import DataSpaceError

#: the text encoding of the engine's format
ENCODING = "latin-1"
#: the wrapper's fields, as the engine writes them
PICKLED, VALUE = "pickled", "value"
#: the wrapper an earlier release of this package used for pickled values
LEGACY_PICKLE_FIELD = "pickled_obj"


class PickleRefusedError(DataSpaceError):
    """A pickled product was met while the configuration forbids pickles."""


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
    try:
        raw = zlib.decompress(zbytes)
    except zlib.error:
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
    try:
        raw = zlib.decompress(zbytes)
    except zlib.error:
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


def _evaluate(raw: bytes, encoding: str) -> Any:
    try:
        return ast.literal_eval(raw.decode(encoding))
    except (UnicodeDecodeError, ValueError, SyntaxError, MemoryError, RecursionError) as exc:
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
    try:
        raw = zlib.decompress(stored)
    except zlib.error:
        raw = bytes(stored)  # the engine reads uncompressed text too
    value = _evaluate(raw, ENCODING)
    if _is_engine_wrapper(value):
        return _unpickle(value[VALUE], allow_pickle) if value[PICKLED] else value[VALUE]
    if not raw.isascii():
        value = _evaluate(raw, "utf-8")  # an earlier release wrote UTF-8
    if isinstance(value, dict) and set(value) == {LEGACY_PICKLE_FIELD}:
        return _unpickle(value[LEGACY_PICKLE_FIELD], allow_pickle)
    return value
