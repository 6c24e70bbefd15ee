"""The wire protocol between clients and workers, in one place.

docs/protocol.md describes it for humans; this module is what both sides run.
A request is an AMQP message published to exchange ``dataspace`` with routing key
``data.<operation>``; its JSON body is ``{"v": 1, "op": ..., "args": {...}}``.  A reply
goes to the request's ``reply_to`` with the same ``correlation_id``; its body is
``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": {...}}``.
Datetimes travel as ISO 8601 strings.

Bytes (product values) travel raw, after the JSON, in a *frame*: ``FRAME_MAGIC``,
the JSON document's length (4 bytes, big-endian), the JSON document, then the
values one after the other; in the JSON each value is ``{"$blob": [offset,
length]}`` (offset from the first byte after the JSON). A body with no bytes in
it is plain JSON. Base64 text is still accepted where bytes are expected (what
the first clients sent): decoding takes either, encoding always frames, which
spares the value a third more size and two conversions on the hot path.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import fields
from typing import Any

import orjson

from .catalog import CATALOG, OperationSpec, Unpack
from .errors import (
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceExistsError,
    DataSpaceRedeliveredError,
    DataSpaceRequestError,
    DataSpaceTooLargeError,
)

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/json"
FRAME_CONTENT_TYPE = "application/vnd.dataspace.frame"
#: what a framed body starts with (no JSON text can start with a NUL byte)
FRAME_MAGIC = b"\x00dsf1"
#: a batch of fire-and-forget requests (batches.py): its content type, first bytes
#: and routing key prefix (``batch.<op>``)
BATCH_CONTENT_TYPE = "application/vnd.dataspace.batch"
BATCH_MAGIC = b"\x00dsb1"
BATCH_ROUTING_PREFIX = "batch."
_FRAME_HEAD = len(FRAME_MAGIC) + 4
EXCHANGE = "dataspace"
REQUEST_QUEUE = "dataspace.requests"
REQUEST_BINDING = "data.#"
ROUTING_PREFIX = "data."
#: reads on the fast path: a classic transient queue, messages not persisted, no
#: replication, no delivery limit (docs/protocol.md, "Reads"); ``read.<op>``
READS_QUEUE = "dataspace.reads"
READ_ROUTING_PREFIX = "read."
DEAD_LETTER_EXCHANGE = "dataspace.dead"
DEAD_LETTER_QUEUE = "dataspace.dead"
#: where dead letters are sorted: expired reads are dropped (nobody waits for them
#: and replaying one does nothing), everything else reaches dataspace.dead
DEAD_LETTER_SORT_EXCHANGE = "dataspace.dead.sort"
DEAD_READS_EXCHANGE = "dataspace.dead.reads"
DEAD_LETTER_KEPT_EXCHANGE = "dataspace.dead.kept"
DEAD_READS_DISCARD_QUEUE = "dataspace.dead.reads.discarded"
REAP_ROUTING_KEY = "admin.reap"
REAPER_QUEUE = "dataspace.reaper"
SCHEDULE_QUEUE = "dataspace.reaper.schedule"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: ordering lanes (docs/scaling.md): a client publishes a request that names a task
#: manager to exchange ``dataspace`` with routing key ``lane.<op>`` and the task
#: manager in LANE_HEADER; the topic exchange passes ``lane.#`` on to this
#: consistent-hash exchange, which hashes that header. Clients publish to
#: ``dataspace`` only, so topic permissions there cover every operation.
LANES_EXCHANGE = "dataspace.lanes.hash"
LANE_HEADER = "x-dataspace-lane"
LANE_ROUTING_PREFIX = "lane."
LANE_BINDING = "lane.#"
#: protocol 1's lanes exchange, which clients published to with the task manager as
#: routing key (no operation in it); no longer declared (docs/protocol.md)
OLD_LANES_EXCHANGE = "dataspace.lanes"
LANE_QUEUE_PREFIX = "dataspace.lane."
#: no messages: every worker with lanes consumes it, so its consumer count is theirs
LANE_WORKERS_QUEUE = "dataspace.lanes.workers"
VERSION_HEADER = "x-dataspace-protocol"
#: on a request: its sender reads framed replies (clients before frames do not)
FRAMES_HEADER = "x-dataspace-frames"
#: on a reply: "ok" or the error code, for tools that do not parse the body
OUTCOME_HEADER = "x-dataspace-outcome"
#: headers a worker sets on a dead letter (docs/protocol.md, "Dead letters"), read by
#: the ``dataspace dead`` commands; never copied from the request itself
DEAD_REASON_HEADER = "x-dataspace-reason"
DEAD_CODE_HEADER = "x-dataspace-error-code"
DEAD_EXCHANGE_HEADER = "x-original-exchange"
DEAD_ROUTING_KEY_HEADER = "x-original-routing-key"
DEAD_BY_HEADER = "x-dead-lettered-by"
DEAD_AT_HEADER = "x-dead-lettered-at"
#: on a dead letter whose body was cut: the size and SHA-256 of the whole body
DEAD_BODY_SIZE_HEADER = "x-dataspace-body-size"
DEAD_BODY_SHA256_HEADER = "x-dataspace-body-sha256"
#: on a dead letter that could not keep all of the request's headers: which not
DEAD_HEADERS_DROPPED_HEADER = "x-dataspace-headers-dropped"
#: a worker's own sequence number on a dead letter, matching its publisher confirm
PUBLISH_SEQ_HEADER = "x-dataspace-publish-seq"
#: every header a worker sets on a dead letter: never copied from the request, and
#: dropped again when a dead letter is replayed
DEAD_LETTER_OWN_HEADERS = frozenset(
    {
        DEAD_REASON_HEADER,
        DEAD_CODE_HEADER,
        DEAD_EXCHANGE_HEADER,
        DEAD_ROUTING_KEY_HEADER,
        DEAD_BY_HEADER,
        DEAD_AT_HEADER,
        DEAD_BODY_SIZE_HEADER,
        DEAD_BODY_SHA256_HEADER,
        DEAD_HEADERS_DROPPED_HEADER,
        PUBLISH_SEQ_HEADER,
    }
)
#: error code of a request whose ``reply_to`` is not a direct reply-to address: it
#: is dead-lettered without running and never answered (the name could be any queue)
BAD_REPLY_TO = "bad_reply_to"


class ProtocolError(DataSpaceRequestError):
    """A message does not follow the protocol (code ``bad_request``)."""

    def __init__(self, message: str):
        super().__init__("bad_request", message)


# -- value codecs -----------------------------------------------------------------
class _Packer:
    """Collects the values of one message, to follow its JSON in a frame."""

    def __init__(self):
        self.blobs: list[bytes] = []
        self.size = 0

    def __call__(self, value: bytes) -> dict:
        ref = {"$blob": [self.size, len(value)]}
        self.blobs.append(value)
        self.size += len(value)
        return ref

    def frame(self, message: dict) -> bytes:
        text = orjson.dumps(message)
        if not self.blobs:
            return text
        return b"".join([FRAME_MAGIC, len(text).to_bytes(4, "big"), text, *self.blobs])


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"invalid base64: {exc}") from None


def _unpacker(tail: memoryview) -> Unpack:
    def unpack(value: Any) -> bytes:
        if isinstance(value, str):
            return _unb64(value)
        ref = value.get("$blob") if isinstance(value, dict) and len(value) == 1 else None
        if (
            not isinstance(ref, list)
            or len(ref) != 2
            or not all(type(n) is int and n >= 0 for n in ref)
            or ref[0] + ref[1] > len(tail)
        ):
            raise ProtocolError(
                f"expected a value reference {{'$blob': [offset, length]}}: {value!r:.80}"
            )
        return bytes(tail[ref[0] : ref[0] + ref[1]])

    return unpack


def _unframe(body: bytes) -> tuple[Any, Unpack]:
    """The JSON document of a body, and how to get its bytes values."""
    if body[: len(FRAME_MAGIC)] != FRAME_MAGIC:
        return orjson.loads(body), _unb64
    view = memoryview(body)
    length = int.from_bytes(view[len(FRAME_MAGIC) : _FRAME_HEAD], "big")
    if len(body) < _FRAME_HEAD + length:
        raise orjson.JSONDecodeError("frame shorter than its JSON length", "", 0)
    message = orjson.loads(view[_FRAME_HEAD : _FRAME_HEAD + length])
    return message, _unpacker(view[_FRAME_HEAD + length :])


def content_type(body: bytes) -> str:
    """The content_type of a body this module (or batches.py) encoded."""
    if body[: len(FRAME_MAGIC)] == FRAME_MAGIC:
        return FRAME_CONTENT_TYPE
    return BATCH_CONTENT_TYPE if body[: len(BATCH_MAGIC)] == BATCH_MAGIC else CONTENT_TYPE


class Operation(OperationSpec):
    """One request type on the wire: its ``catalog`` description and its routing keys."""

    @property
    def routing_key(self) -> str:
        """Data operations go to the request queue, a reap to the reaper's queue."""
        return REAP_ROUTING_KEY if self.by_reaper else ROUTING_PREFIX + self.name

    @property
    def lane_routing_key(self) -> str:
        """The routing key of this operation through the ordering lanes."""
        return LANE_ROUTING_PREFIX + self.name

    @property
    def fast_read(self) -> bool:
        """A read the fast read queue serves (every data read; never a write)."""
        return not self.write and not self.by_reaper

    @property
    def read_routing_key(self) -> str:
        """The routing key of this read on the fast path (``read.<op>``)."""
        return READ_ROUTING_PREFIX + self.name


def _on_the_wire(spec: OperationSpec) -> Operation:
    return Operation(**{field.name: getattr(spec, field.name) for field in fields(spec)})


#: every operation, as ``catalog.CATALOG`` describes it, with its routing keys
OPERATIONS: dict[str, Operation] = {name: _on_the_wire(spec) for name, spec in CATALOG.items()}


def operation_named_by(routing_key: str | None) -> str | None:
    """The operation a routing key names (``data.<op>``, ``lane.<op>``, a read's
    ``read.<op>``, ``admin.reap``), or None. The routing key, which broker topic permissions
    check, decides what a request may do: a body naming another is refused."""
    if not isinstance(routing_key, str):
        return None
    if routing_key == REAP_ROUTING_KEY:
        return "reap"
    for prefix in (ROUTING_PREFIX, LANE_ROUTING_PREFIX):
        if routing_key.startswith(prefix):
            name = routing_key[len(prefix) :]
            return name if name in OPERATIONS and not OPERATIONS[name].by_reaper else None
    if routing_key.startswith(READ_ROUTING_PREFIX):
        name = routing_key[len(READ_ROUTING_PREFIX) :]
        return name if name in OPERATIONS and OPERATIONS[name].fast_read else None
    return batched_operation(routing_key)


def batched_operation(routing_key: str | None) -> str | None:
    """The operation of a batch's routing key (``batch.<op>``: a fire-and-forget
    operation), or None."""
    if not isinstance(routing_key, str) or not routing_key.startswith(BATCH_ROUTING_PREFIX):
        return None
    name = routing_key[len(BATCH_ROUTING_PREFIX) :]
    return name if name in OPERATIONS and OPERATIONS[name].fire_and_forget else None


def slow_routing_key(routing_key: str) -> str:
    """The request-queue routing key (``data.<op>``) of a fast read's (``read.<op>``);
    any other key unchanged."""
    if routing_key.startswith(READ_ROUTING_PREFIX):
        return ROUTING_PREFIX + routing_key[len(READ_ROUTING_PREFIX) :]
    return routing_key


def queue_for(routing_key: str) -> str | None:
    """The queue whose consumers serve a request published to ``dataspace`` with
    ``routing_key`` (for lanes: the queue every worker serving lanes consumes), or
    None for a key this protocol does not route."""
    if routing_key == REAP_ROUTING_KEY:
        return REAPER_QUEUE
    if routing_key.startswith(LANE_ROUTING_PREFIX):
        return LANE_WORKERS_QUEUE
    if routing_key.startswith(ROUTING_PREFIX) or routing_key.startswith(BATCH_ROUTING_PREFIX):
        return REQUEST_QUEUE
    if routing_key.startswith(READ_ROUTING_PREFIX):
        return READS_QUEUE
    return None


# -- errors -----------------------------------------------------------------------
#: error code -> exception class the client raises
ERROR_CODES: dict[str, type[BaseException]] = {
    # before "unavailable", its base class: error_code takes the first that matches
    "read_redelivered": DataSpaceRedeliveredError,
    "not_found": KeyError,
    "invalid_argument": ValueError,
    "wrong_type": TypeError,
    "exists": DataSpaceExistsError,
    "unavailable": DataSpaceConnectionError,
    "not_implemented": NotImplementedError,
    "too_large": DataSpaceTooLargeError,
    "internal": DataSpaceError,
}


def error_code(exc: BaseException) -> str:
    """The protocol's code for an exception raised while handling a request."""
    if isinstance(exc, DataSpaceRequestError):
        return exc.code
    for code, cls in ERROR_CODES.items():
        if code != "internal" and isinstance(exc, cls):
            return code
    return "internal"


def error_message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    if isinstance(exc, DataSpaceRequestError):
        return str(exc).split(": ", 1)[-1]
    return str(exc)


def exception_from(error: dict) -> BaseException:
    """Rebuild on the client the exception an error reply describes."""
    code = error.get("code", "internal")
    message = error.get("message", "")
    cls = ERROR_CODES.get(code)
    if cls is None:
        return DataSpaceRequestError(code, message)
    return cls(message)


# -- bodies -------------------------------------------------------------------------
def encode_request(op: Operation, args: dict[str, Any]) -> bytes:
    """A request body: plain JSON, or a frame when it carries bytes (see ``content_type``)."""
    wire = dict(args)
    pack = _Packer()
    for name in op.binary:
        wire[name] = pack(wire[name])
    return pack.frame({"v": PROTOCOL_VERSION, "op": op.name, "args": wire})


def decode_request(body: bytes) -> tuple[Operation, dict[str, Any]]:
    """Parse and check a request body; ProtocolError names what is wrong."""
    try:
        message, unpack = _unframe(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"body is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("body must be a JSON object")
    version = message.get("v")
    if version is None:
        raise ProtocolError(
            f'body has no protocol version ("v": {PROTOCOL_VERSION}); is it a DataSpace request?'
        )
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
        raise ProtocolError(
            f"unsupported protocol version {version!r:.40}; this worker speaks {PROTOCOL_VERSION}"
        )
    name = message.get("op")
    op = OPERATIONS.get(name) if isinstance(name, str) else None
    if op is None:
        raise ProtocolError(f"unknown operation {message.get('op')!r:.80}")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("args must be a JSON object")
    unknown = set(args) - set(op.params)
    if unknown:
        raise ProtocolError(f"{op.name}: unknown argument(s) {', '.join(sorted(unknown))[:200]}")
    for name in op.binary:
        if name in args:
            args[name] = unpack(args[name])
    return op, args


def accepts_frames(headers: dict | None) -> bool:
    """Whether a request's sender reads framed replies (its FRAMES_HEADER)."""
    return bool(headers) and bool(headers.get(FRAMES_HEADER))


def encode_result(op: Operation, result: Any, frames: bool = True) -> bytes:
    """A reply body: framed when it carries bytes, or, for a sender that does not
    read frames (``frames`` False), plain JSON with the bytes in base64."""
    message = {"v": PROTOCOL_VERSION, "ok": True}
    if not frames:
        return orjson.dumps({**message, "result": op.encode_result(result, _b64)})
    pack = _Packer()
    return pack.frame({**message, "result": op.encode_result(result, pack)})


def encode_error(exc: BaseException) -> bytes:
    error = {
        "code": error_code(exc),
        "type": type(exc).__name__,
        "message": error_message(exc)[:4000],
    }
    return orjson.dumps({"v": PROTOCOL_VERSION, "ok": False, "error": error})


def decode_reply(op: Operation, body: bytes) -> Any:
    """Return the result a reply carries, or raise the exception it describes."""
    try:
        reply, unpack = _unframe(body)
    except orjson.JSONDecodeError as exc:
        raise DataSpaceError(f"{op.name}: reply is not valid JSON: {exc}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise DataSpaceError(f"{op.name}: malformed reply")
    if reply["ok"]:
        try:
            return op.decode_result(reply.get("result"), unpack)
        except ProtocolError as exc:
            raise DataSpaceError(f"{op.name}: malformed reply: {exc}") from None
    raise exception_from(reply.get("error") or {})
