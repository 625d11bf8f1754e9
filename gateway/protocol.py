"""Client protocol v1: the frames a client may send, the frames the server sends, and their encoding.

Server frames are encoded once into complete WebSocket frames (wsproto's sans-I/O frame encoder), so
an event going to many clients is serialized and framed exactly once; what each connection does on
fan-out is append bytes. Client frames are parsed with pydantic into a closed set of operations:
this socket is read-only, so anything that is not subscribe/unsubscribe/refresh/ping is refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from wsproto.frame_protocol import FrameProtocol

from gateway.events import SCOPE_BODY

WILDCARD = "*"
# A subscription scope: `<kind>:<id>` or the wildcard.
_SCOPE_ALTERNATIVES = rf"\*|{SCOPE_BODY}"
# Ends with `\Z`, not `$` (Python's `$` also matches before a trailing newline); `is_scope` is the check.
SCOPE_RE = re.compile(rf"(?:{_SCOPE_ALTERNATIVES})\Z")
# The same rule for pydantic fields, which search a pattern: anchored at both ends, and pydantic's Rust
# regex reads `$` as the end of the text, so "conversation:c1\n" is refused there too.
_SCOPE_FIELD_PATTERN = rf"^(?:{_SCOPE_ALTERNATIVES})$"


def is_scope(text: str) -> bool:
    """Whether `text` is a subscription scope (`<kind>:<id>` or `*`), all of it (no trailing newline)."""
    return SCOPE_RE.fullmatch(text) is not None


# Close codes (documented in docs/protocol.md).
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002  # a client frame broke RFC 6455 (sent by edge/transport.py from wsproto's verdict)
CLOSE_INVALID_DATA = 1007  # a text frame (or close reason) that is not UTF-8 (ditto)
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOKEN_EXPIRED = 4408
CLOSE_TOO_SLOW = 4429

# Error codes carried by `error` frames.
ERR_BAD_REQUEST = "bad_request"
ERR_READ_ONLY = "read_only"
ERR_FORBIDDEN = "forbidden"
ERR_LIMIT = "limit"
ERR_UNAUTHORIZED = "unauthorized"
ERR_UNAVAILABLE = "unavailable"

# Operations that try to write through the socket: refused with `read_only`.
WRITE_OPS = frozenset({"publish", "pub", "send", "emit", "broadcast", "event", "message", "post", "put"})

RequestId = Annotated[str | int, Field(union_mode="left_to_right")]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subscribe(_Frame):
    op: Literal["subscribe"]
    id: RequestId | None = None
    scope: Annotated[str, Field(pattern=_SCOPE_FIELD_PATTERN)]
    since: Annotated[int, Field(ge=0)] | None = None
    compact: Annotated[bool, Strict()] = False  # JSON true/false only: merge the replayed range's deltas


class Unsubscribe(_Frame):
    op: Literal["unsubscribe"]
    id: RequestId | None = None
    scope: Annotated[str, Field(pattern=_SCOPE_FIELD_PATTERN)]


class Refresh(_Frame):
    op: Literal["refresh"]
    id: RequestId | None = None
    token: Annotated[str, Field(min_length=1, max_length=16384)]


class Ping(_Frame):
    op: Literal["ping"]
    id: RequestId | None = None


ClientFrame = Annotated[Subscribe | Unsubscribe | Refresh | Ping, Field(discriminator="op")]
_client_frame: TypeAdapter[Subscribe | Unsubscribe | Refresh | Ping] = TypeAdapter(ClientFrame)


class FrameError(Exception):
    """A client frame that is refused; `code` goes into the `error` frame."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def parse_client_frame(text: str | bytes) -> Subscribe | Unsubscribe | Refresh | Ping:
    """Parse one client frame or raise FrameError with `bad_request` or `read_only`."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError(ERR_BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(ERR_BAD_REQUEST, "frame must be a JSON object")
    op = obj.get("op")
    rid = obj.get("id") if isinstance(obj.get("id"), str | int) else None
    if not isinstance(op, str):
        raise FrameError(ERR_BAD_REQUEST, 'frame needs an "op": subscribe, unsubscribe, refresh or ping', rid)
    if op in WRITE_OPS or op not in ("subscribe", "unsubscribe", "refresh", "ping"):
        code = ERR_READ_ONLY if op in WRITE_OPS else ERR_BAD_REQUEST
        raise FrameError(
            code, f'unknown op "{op[:32]}": this socket is read-only (subscribe, unsubscribe, refresh, ping)', rid
        )
    try:
        return _client_frame.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or op
        raise FrameError(ERR_BAD_REQUEST, f"{where}: {first['msg']}", rid) from None


_DIGITS_RE = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() also accepts "²" and other digits
MAX_SEQ = 2**63 - 1  # JetStream sequences are uint64; larger is no position of ours


def parse_int(text: str, name: str, lo: int, hi: int) -> int:
    """A query or header parameter that must be an integer in [lo, hi]: ASCII digits, at most 19 of them.

    The one validation of every numeric parameter (URL `since`, `Last-Event-ID`, `after`, `limit`);
    raises FrameError(bad_request) with a message naming the parameter."""
    if not _DIGITS_RE.fullmatch(text) or not lo <= int(text) <= hi:
        raise FrameError(ERR_BAD_REQUEST, f"{name} must be an integer from {lo} to {hi}")
    return int(text)


def parse_seq(text: str, name: str) -> int:
    """A stream sequence parameter (a cursor): a non-negative integer."""
    if not _DIGITS_RE.fullmatch(text) or int(text) > MAX_SEQ:
        raise FrameError(ERR_BAD_REQUEST, f"{name} must be a stream sequence (a non-negative integer)")
    return int(text)


_BOOL_RE = re.compile(r"true|false")


def parse_bool(text: str, name: str) -> bool:
    """A query parameter that is a flag: exactly `true` or `false` (URL `compact`)."""
    if not _BOOL_RE.fullmatch(text):
        raise FrameError(ERR_BAD_REQUEST, f"{name} must be true or false")
    return text == "true"


# --- server frames -----------------------------------------------------------------------------

_encoder = FrameProtocol(client=False, extensions=[])


def ws_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked WebSocket text frame around a UTF-8 payload (wsproto does the framing)."""
    return bytes(_encoder.send_data(payload.decode("utf-8"), fin=True))


def server_payload(kind: str, **fields: Any) -> bytes:
    """The JSON of a control frame (welcome, subscribed, error, ...); None fields are left out."""
    return orjson.dumps({"type": kind, **{k: v for k, v in fields.items() if v is not None}})


def event_payload(seq: int, raw_event: bytes, coalesced: int = 0) -> bytes:
    """The JSON of an `event` frame: the publisher's envelope is forwarded byte for byte.

    `coalesced` (only on frames merged for a slow client) says how many published events it stands for.
    """
    if coalesced:
        return b'{"type":"event","seq":%d,"coalesced":%d,"event":%s}' % (seq, coalesced, raw_event)
    return b'{"type":"event","seq":%d,"event":%s}' % (seq, raw_event)
