"""Which ``reply_to`` a worker answers: a well-formed direct reply-to address.

A client's request names where its reply goes. A worker publishes that reply to
the default exchange with ``reply_to`` as routing key, so an arbitrary name would
make it write into any queue the worker may write to (``dataspace.dead``,
``dataspace.reaper.schedule``, ...). Only RabbitMQ's direct reply-to addresses are
answered (docs/protocol.md); anything else is refused before the request runs.

On RabbitMQ 3.10 (3.10.8 here) a direct reply-to address reads
``amq.rabbitmq.reply-to.<pid>.<key>``:

- ``<pid>`` is the standard base64 of an Erlang pid in the external term format:
  version 131, then ``NEW_PID_EXT`` (88) or ``PID_EXT`` (103), the node as an atom
  (``ATOM_EXT`` 100, ``SMALL_ATOM_EXT`` 115, ``ATOM_UTF8_EXT`` 118 or
  ``SMALL_ATOM_UTF8_EXT`` 119), then ID (4 bytes, 15 bits significant), serial
  (4 bytes, 13 bits significant) and creation (4 bytes; 1 in ``PID_EXT``, 2 bits
  significant). Since 3.10 the node is written as ``reply@<hash of the node
  name>``, e.g. ``g1h2AA1yZXBseUA5MjQ4ODg0AABYJwAAAABrE1hc`` is
  ``NEW_PID_EXT``, ``ATOM_UTF8_EXT`` ``reply@9248884``, ID 22567, serial 0,
  creation 1796429916.
- ``<key>`` is the base64 of 16 random bytes (24 characters) that the client
  channel checks.

The broker decodes the pid when the reply is published, on the publisher's
channel, and 3.10 crashes that channel, and with it the whole connection (541
``INTERNAL_ERROR``), when it cannot: garbage, trailing bytes, an ID or serial out
of range, a node that is not running (tried on this broker: see
tests/test_reply_to.py). This module refuses, from the string alone, everything
that is not a pid as the broker writes it; which nodes run is for the guard to
learn (guarded_replies.py). ``parse`` never raises anything but ``BadReplyTo``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import struct
from dataclasses import dataclass

from dataspace_core.protocol import DIRECT_REPLY_TO

PREFIX = DIRECT_REPLY_TO + "."
#: an AMQP short string: no longer address can be published to
MAX_LENGTH = 255
#: the key is 24 characters on RabbitMQ 3.10; any base64-ish text up to this
KEY = re.compile(r"[A-Za-z0-9+/=_-]{1,64}\Z")
ENCODED_PID = re.compile(r"[A-Za-z0-9+/]+={0,2}\Z")
#: ``name@host``: printable, no white space, one ``@``
NODE = re.compile(r"[^\s@]+@[^\s@]+\Z")

VERSION = 131
PID_EXT = 103
NEW_PID_EXT = 88
ATOM_EXT = 100
SMALL_ATOM_EXT = 115
ATOM_UTF8_EXT = 118
SMALL_ATOM_UTF8_EXT = 119
#: atom tag -> (bytes of its length, encoding of its text)
ATOMS = {
    ATOM_EXT: (2, "latin-1"),
    SMALL_ATOM_EXT: (1, "latin-1"),
    ATOM_UTF8_EXT: (2, "utf-8"),
    SMALL_ATOM_UTF8_EXT: (1, "utf-8"),
}
MAX_ID = 1 << 15
MAX_SERIAL = 1 << 13
MAX_OLD_CREATION = 1 << 2


class BadReplyTo(ValueError):
    """A ``reply_to`` this worker will not publish to."""


@dataclass(frozen=True)
class ReplyAddress:
    """A well-formed direct reply-to address, decoded."""

    address: str
    #: the node the client's channel is on, as the address writes it
    node: str
    pid_tag: int
    atom_tag: int
    id: int
    serial: int
    creation: int

    @property
    def node_key(self) -> tuple[int, int, str, int]:
        """The node as the broker decodes it: its name and how the pid is encoded
        (the broker may decode one encoding of a running node and fail on another),
        and its creation, which a node restarted under the same name changes: a
        node found down is not taken for down once it is back (its clients' new
        addresses carry the new creation)."""
        return (self.pid_tag, self.atom_tag, self.node, self.creation)

    @property
    def client_channel(self) -> str:
        """The address without its key: one client channel (the key names one call)."""
        return self.address.rsplit(".", 1)[0]


def _shown(reply_to: object) -> str:
    """``reply_to`` as an error message shows it: quoted whole, at most 80 characters."""
    text = str(reply_to)
    return repr(text[:80]) + ("..." if len(text) > 80 else "")


def parse(reply_to: object) -> ReplyAddress:
    """The direct reply-to address ``reply_to`` is; ``BadReplyTo`` saying why not."""
    if not isinstance(reply_to, str):
        raise BadReplyTo(f"reply_to is a {type(reply_to).__name__}, not text")
    return _parse_text(reply_to)


#: addresses decoded lately: a client's calls all carry its channel's one address,
#: decoded once here instead of at every request (a refusal is never kept: each
#: bad address is checked again, as cheaply as before)
RECENT_ADDRESSES = 1024


@functools.lru_cache(maxsize=RECENT_ADDRESSES)
def _parse_text(reply_to: str) -> ReplyAddress:
    if len(reply_to) > MAX_LENGTH:
        raise BadReplyTo(f"reply_to of {len(reply_to)} characters (at most {MAX_LENGTH})")
    if not reply_to.startswith(PREFIX):
        raise BadReplyTo(
            f"reply_to {_shown(reply_to)} is not a direct reply-to address ({PREFIX}*)"
        )
    encoded, dot, key = reply_to[len(PREFIX) :].partition(".")
    if not dot or not KEY.match(key):
        raise BadReplyTo(f"reply_to {_shown(reply_to)}: no key, or not a key")
    if not ENCODED_PID.match(encoded):
        raise BadReplyTo(f"reply_to {_shown(reply_to)}: the pid is not base64")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadReplyTo(f"reply_to {_shown(reply_to)}: the pid is not base64") from None
    if base64.b64encode(raw).decode("ascii") != encoded:
        raise BadReplyTo(f"reply_to {_shown(reply_to)}: the pid is not canonical base64")
    node, pid_tag, atom_tag, pid_id, serial, creation = _pid(raw, reply_to)
    return ReplyAddress(reply_to, node, pid_tag, atom_tag, pid_id, serial, creation)


def check(reply_to: object) -> ReplyAddress | None:
    """``parse``, or None when ``reply_to`` is not a direct reply-to address."""
    try:
        return parse(reply_to)
    except BadReplyTo:
        return None


def _pid(raw: bytes, reply_to: str) -> tuple[str, int, int, int, int, int]:
    """Node, pid tag, atom tag, ID, serial, creation of an Erlang pid term."""

    def bad(what: str) -> BadReplyTo:
        return BadReplyTo(f"reply_to {_shown(reply_to)}: {what}")

    if len(raw) < 3 or raw[0] != VERSION:
        raise bad("not an Erlang term")
    pid_tag, atom_tag = raw[1], raw[2]
    if pid_tag not in (PID_EXT, NEW_PID_EXT):
        raise bad("not a pid")
    if atom_tag not in ATOMS:
        raise bad("the pid's node is not an atom")
    width, encoding = ATOMS[atom_tag]
    at = 3 + width
    if len(raw) < at:
        raise bad("the pid is cut short")
    length = int.from_bytes(raw[3:at], "big")
    name = raw[at : at + length]
    at += length
    tail = 9 if pid_tag == PID_EXT else 12
    if len(name) != length or len(raw) != at + tail:
        raise bad("the pid is cut short or has bytes after it")
    try:
        node = name.decode(encoding)
    except UnicodeDecodeError:
        raise bad("the pid's node is not text") from None
    if len(node) > 255 or not node.isprintable() or not NODE.match(node):
        raise bad("the pid's node is not a node name")
    if pid_tag == PID_EXT:
        pid_id, serial, creation = struct.unpack(">IIB", raw[at:])
        if creation >= MAX_OLD_CREATION:
            raise bad("the pid's creation is out of range")
    else:
        pid_id, serial, creation = struct.unpack(">III", raw[at:])
    if pid_id >= MAX_ID or serial >= MAX_SERIAL:
        raise bad("the pid's ID or serial is out of range")
    return node, pid_tag, atom_tag, pid_id, serial, creation
