"""Product values as the original DataBlock stored them, and the pickle helpers.

The store keeps values as opaque bytes.  The client encodes them exactly as the
original decision engine did, so data written by either can be read by the
other: a ``dict`` is kept as a zlib-compressed Python literal (read back with
``ast.literal_eval``, which evaluates no code), any other object is pickled and
wrapped as ``{"pickled_obj": <zdumps bytes>}``.

Reading a pickled product unpickles it, which runs code chosen by whoever wrote
it.  Deployments whose writers are not trusted set
``dataspace.allow_pickle: false``; then pickled products are refused both ways.
"""

from __future__ import annotations

import ast
import pickle
import zlib
from typing import Any

from .errors import DataSpaceError

PICKLE_FIELD = "pickled_obj"


class PickleRefusedError(DataSpaceError):
    """A pickled product was met while the configuration forbids pickles."""


def zdumps(obj: Any) -> bytes:
    """Pickle and compress.

    :param obj: a python object
    :return: compressed bytes
    """
    return zlib.compress(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), 9)


def zloads(zbytes: bytes) -> Any:
    """Decompress and unpickle; an uncompressed pickle is unpickled as it is.

    :param zbytes: compressed bytes
    :return: the python object
    """
    try:
        raw = zlib.decompress(zbytes)
    except zlib.error:
        raw = zbytes
    return pickle.loads(raw)  # noqa: S301 - documented: callers opt in to pickles


def compress(obj: Any) -> bytes:
    """Compress the ``str()`` of a python object.

    :param obj: python object
    :return: compressed bytes
    """
    return zlib.compress(str(obj).encode("utf-8"), 9)


def decompress(zbytes: bytes) -> str:
    """Decompress a zipped byte stream and convert it to a string.

    :param zbytes: byte stream
    :return: uncompressed string
    """
    return zlib.decompress(zbytes).decode("utf-8")


def encode_value(value: Any, allow_pickle: bool = True) -> bytes:
    """Turn a DataBlock value into the bytes the store keeps.

    A dict must survive ``ast.literal_eval(repr(d))``; one that holds other
    objects is refused now, with a TypeError, rather than stored unreadable.
    """
    if isinstance(value, dict):
        text = repr(value)
        try:
            ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise TypeError(
                "a dict product must hold only Python literals (str, bytes, numbers, "
                "tuples, lists, dicts, sets, bool, None); wrap other objects in a "
                f"non-dict value to have them pickled ({exc})"
            ) from None
        return zlib.compress(text.encode("utf-8"), 9)
    if not allow_pickle:
        raise PickleRefusedError(
            f"refusing to pickle a {type(value).__name__}: allow_pickle is false"
        )
    return compress({PICKLE_FIELD: zdumps(value)})


def decode_value(stored: bytes, allow_pickle: bool = True) -> Any:
    """Turn stored bytes back into the DataBlock value ``encode_value`` was given."""
    try:
        value = ast.literal_eval(decompress(stored))
    except (zlib.error, UnicodeDecodeError, ValueError, SyntaxError) as exc:
        raise DataSpaceError(f"stored product is not in DataBlock format: {exc}") from None
    if isinstance(value, dict) and set(value) == {PICKLE_FIELD}:
        if not allow_pickle:
            raise PickleRefusedError("refusing to unpickle a product: allow_pickle is false")
        return zloads(value[PICKLE_FIELD])
    return value
