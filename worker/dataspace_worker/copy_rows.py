"""Large values through PostgreSQL's binary COPY, in and out, instead of hex text.

psycopg2 sends parameters as text: a bytea value goes out hex-escaped, which
doubles it on the wire, and on the way it exists as escaped bytes, as SQL
text and in libpq's send buffer (kept at its largest size for the
connection's life). For a 16 MiB product that was about 10 copies of the value
at once. ``COPY ... FROM STDIN (FORMAT binary)`` takes the raw bytes instead,
read from a file-like object in chunks: the value is never copied whole.
Reading one back the same way (``COPY (SELECT ...) TO STDOUT``) spares the
hex text (twice the value) and its unescaping.
"""

from __future__ import annotations

import struct

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)  # flags, no header extension
TRAILER = struct.pack("!h", -1)
CHUNK = 1024 * 1024


#: struct formats of the integer widths a binary COPY field may have (typlen)
_INTEGER_FORMATS = {2: "h", 4: "i", 8: "q"}


def integer_field(value: int, width: int) -> bytes:
    """One integer field of a binary COPY row, at its column's width.

    Binary COPY does no conversion: an 8-byte value for an ``integer`` column is
    refused ("incorrect binary data format"), so the width comes from the
    catalogue. A value outside the column's range raises the ValueError
    PostgreSQL would ("integer out of range"), not a struct.error.
    """
    code = _INTEGER_FORMATS[width]
    try:
        return struct.pack(f"!i{code}", width, int(value))
    except struct.error:
        raise ValueError(f"integer out of range: {value} for a {width * 8}-bit column") from None


class ProductRowStream:
    """The binary COPY stream of one ``(taskmanager_id, generation_id, key, value)`` row.

    ``widths`` gives the byte widths of the two id columns (``ID_COLUMN_WIDTHS``
    in sql.py reads them); the default is this package's own BIGINT schema.
    """

    def __init__(
        self,
        taskmanager_id: int,
        generation_id: int,
        key: str,
        value: bytes,
        widths: tuple[int, int] = (8, 8),
    ):
        key_bytes = key.encode("utf-8")
        head = struct.pack("!h", 4)
        head += integer_field(taskmanager_id, widths[0])
        head += integer_field(generation_id, widths[1])
        head += struct.pack("!i", len(key_bytes)) + key_bytes
        head += struct.pack("!i", len(value))
        self._parts = [memoryview(SIGNATURE + head), memoryview(value), memoryview(TRAILER)]
        self._offset = 0

    def read(self, size: int = CHUNK) -> bytes:
        """Up to ``size`` bytes of the stream; b"" at its end (what copy_expert calls)."""
        size = size if size and size > 0 else CHUNK
        while self._parts:
            part = self._parts[0]
            if self._offset < len(part):
                chunk = bytes(part[self._offset : self._offset + size])
                self._offset += len(chunk)
                return chunk
            self._parts.pop(0)
            self._offset = 0
        return b""


class ValueSink:
    """Collects a one-column binary COPY output and returns the value of its one row."""

    def __init__(self):
        self._buffer = bytearray()

    def write(self, chunk) -> None:
        """What copy_expert calls with each piece of the output."""
        self._buffer += chunk

    def value(self) -> bytes | None:
        """The row's value; None when the query matched no row."""
        view = memoryview(self._buffer)
        offset = len(SIGNATURE)
        (fields,) = struct.unpack_from("!h", view, offset)
        if fields == -1:
            return None
        (length,) = struct.unpack_from("!i", view, offset + 2)
        start = offset + 6
        return bytes(view[start : start + length])
