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
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, TypeAdapter, ValidationError, model_validator

from gateway.events import SCOPE_BODY, Envelope

WILDCARD = "*"
INBOX = "inbox"  # the caller's requests for input across processes (gateway/core/inbox.py)
# A subscription scope: `<kind>:<id>`, the wildcard or the inbox.
_SCOPE_ALTERNATIVES = rf"\*|{INBOX}|{SCOPE_BODY}"
# Ends with `\Z`, not `$` (Python's `$` also matches before a trailing newline); `is_scope` is the check.
SCOPE_RE = re.compile(rf"(?:{_SCOPE_ALTERNATIVES})\Z")
# The same rule for pydantic fields, which search a pattern: anchored at both ends, and pydantic's Rust
# regex reads `$` as the end of the text, so "conversation:c1\n" is refused there too.
_SCOPE_FIELD_PATTERN = rf"^(?:{_SCOPE_ALTERNATIVES})$"


def is_scope(text: str) -> bool:
    """Whether `text` is a subscription scope (`<kind>:<id>`, `*` or `inbox`), all of it (no trailing newline)."""
    return SCOPE_RE.fullmatch(text) is not None


def is_resource_scope(text: str) -> bool:
    """Whether `text` is one resource's scope (`<kind>:<id>`): not `*`, not `inbox` (history, presence)."""
    return text not in (WILDCARD, INBOX) and is_scope(text)


# Close codes (documented in docs/protocol.md).
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002  # a client frame broke RFC 6455 (sent by edge/transport.py from wsproto's verdict)
CLOSE_INVALID_DATA = 1007  # a text frame (or close reason) that is not UTF-8 (ditto)
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013  # the instance is starting (ACLs, stream position not loaded yet): retry
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
    presence: StrictBool = False  # also receive the scope's `presence` frames (docs/protocol.md, Presence)
    listed: StrictBool = True  # false: watch without appearing in the scope's presence

    compact: Annotated[bool, Strict()] = False  # JSON true/false only: merge the replayed range's deltas

    @model_validator(mode="after")
    def _presence_of_a_scope(self) -> Subscribe:
        if self.presence and self.scope in (WILDCARD, INBOX):
            raise ValueError(f"presence is per resource scope: subscribe to the scope itself, not to {self.scope}")
        return self


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


_FLAG_RE = re.compile(r"true|false")


def parse_flag(text: str | None, name: str, default: bool) -> bool:
    """A flag query parameter (`compact`, `presence`, `listed`): exactly `true` or `false` (absent: `default`)."""
    if text is None:
        return default
    if not _FLAG_RE.fullmatch(text):
        raise FrameError(ERR_BAD_REQUEST, f"{name} must be true or false")
    return text == "true"


# --- server frames -----------------------------------------------------------------------------

# The server frames as models: the contract that scripts/gen_schemas.py publishes (JSON Schema, the
# TypeScript SDK's types, docs/asyncapi.yaml) and tests/test_schemas.py checks real frames against.
# The hot path does not build them: `server_payload` and `event_payload` below write the same JSON.
# Fields without a value are left out of the wire frame (never `null`); clients ignore unknown fields.


class _ServerFrame(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


ScopeField = Annotated[str, Field(pattern=_SCOPE_FIELD_PATTERN)]
Seq = Annotated[int, Field(ge=0, le=2**63 - 1)]


class PrincipalInfo(_ServerFrame):
    """Who the connection is: `user:<sub>`, the token's subject, tenant and groups."""

    id: str
    subject: str
    tenant: str
    groups: list[str]


class Welcome(_ServerFrame):
    """First frame of every connection."""

    type: Literal["welcome"]
    connection_id: str
    principal: PrincipalInfo
    expires_at: int
    heartbeat_s: float | None = None


class Subscribed(_ServerFrame):
    """A subscription started (an answer, a URL scope, or access granted later); `since`, `recovered` and
    `earliest` only on a resume."""

    type: Literal["subscribed"]
    id: RequestId | None = None
    scope: ScopeField
    seq: Seq
    since: Seq | None = None
    recovered: bool | None = None
    earliest: Seq | None = None


class Unsubscribed(_ServerFrame):
    """Answer to `unsubscribe`."""

    type: Literal["unsubscribed"]
    id: RequestId | None = None
    scope: ScopeField


class Revoked(_ServerFrame):
    """Access to a scope was lost; nothing more is delivered for it."""

    type: Literal["revoked"]
    scope: ScopeField


class ErrorFrame(_ServerFrame):
    """A request was refused; `scope` for `forbidden` and `limit`."""

    type: Literal["error"]
    id: RequestId | None = None
    code: Literal["bad_request", "read_only", "forbidden", "limit", "unauthorized", "unavailable"]
    message: str
    scope: ScopeField | None = None


class Pong(_ServerFrame):
    """Answer to `ping`."""

    type: Literal["pong"]
    id: RequestId | None = None


class Refreshed(_ServerFrame):
    """Answer to a successful `refresh`: the connection now expires at the new token's `exp`."""

    type: Literal["refreshed"]
    id: RequestId | None = None
    expires_at: int


class EventFrame(_ServerFrame):
    """An event: `seq` is its JetStream stream sequence, `event` the publisher's envelope byte for byte;
    `coalesced` (only on frames merged for a slow client) the number of published events it stands for."""

    type: Literal["event"]
    seq: Seq
    event: Envelope
    coalesced: Annotated[int, Field(ge=2)] | None = None


class CloseFrame(_ServerFrame):
    """Server-Sent Events only: the last frame of a stream, with the close code a WebSocket would get."""

    type: Literal["close"]
    code: int
    reason: str


class PresenceMember(_ServerFrame):
    """One listed watcher of a scope."""

    id: str = Field(description="The watcher's principal id, `user:<sub>`")
    name: str | None = Field(None, description="The token's `name` claim, when it had a valid one")
    picture: str | None = Field(None, description="The token's `picture` claim (an https URL), when valid")


class PresenceAgent(_ServerFrame):
    """One agent run active in a scope (from its `run.started` to its `run.finished`)."""

    run_id: str
    agent_id: str | None = Field(None, description="`data.agent_id` of run.started, when given")
    since: str = Field(description="The `time` of run.started (RFC 3339)")


class PresenceFrame(_ServerFrame):
    """Who watches a scope and which agents run in it (subscribe with `presence: true`): a snapshot
    (`snapshot: true`, `members`, `agents`) after `subscribed`, then deltas relative to it."""

    type: Literal["presence"]
    scope: ScopeField
    count: int = Field(ge=0, description="Distinct members of the scope now, listed or not")
    snapshot: bool | None = Field(None, description="true on the snapshot; absent on deltas")
    members: list[PresenceMember] | None = Field(None, description="snapshot: the listed members (capped)")
    agents: list[PresenceAgent] | None = Field(None, description="snapshot: active runs, oldest first (capped)")
    joined: list[PresenceMember] | None = Field(None, description="delta: members now listed")
    left: list[str] | None = Field(None, description="delta: ids no longer listed")
    agents_started: list[PresenceAgent] | None = Field(None, description="delta: runs that started")
    agents_finished: list[str] | None = Field(None, description="delta: run ids that finished")


SERVER_FRAMES: tuple[type[BaseModel], ...] = (
    Welcome, Subscribed, Unsubscribed, Revoked, ErrorFrame, Pong, Refreshed, EventFrame, CloseFrame, PresenceFrame,
)
CLIENT_FRAMES: tuple[type[BaseModel], ...] = (Subscribe, Unsubscribe, Refresh, Ping)
ServerFrame = Annotated[
    Welcome | Subscribed | Unsubscribed | Revoked | ErrorFrame | Pong | Refreshed | EventFrame | CloseFrame
    | PresenceFrame,
    Field(discriminator="type"),
]


def ws_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked WebSocket text frame around a UTF-8 payload (RFC 6455 5.2: FIN and opcode 1,
    the 7-, 16- or 64-bit length, no mask), byte for byte what wsproto's framing makes (a tenth of its
    time; tests/test_uvicorn_seam.py compares them). A payload that is not UTF-8 raises, as there."""
    payload.decode("utf-8")
    n = len(payload)
    if n < 126:
        return b"\x81%c%b" % (n, payload)
    if n < 65536:
        return b"\x81\x7e%b%b" % (n.to_bytes(2, "big"), payload)
    return b"\x81\x7f%b%b" % (n.to_bytes(8, "big"), payload)


def kept_json(obj: Any) -> bytes:
    """`orjson.dumps(obj)` for bytes that are kept (queued, remembered): orjson's result holds the 4 KiB
    buffer it wrote into, whatever its length (tracemalloc: 4,098 bytes for a 55-byte result), so what
    outlives the call is copied to its own size (tests/test_rules.py)."""
    return bytes(memoryview(orjson.dumps(obj)))


def server_payload(kind: str, **fields: Any) -> bytes:
    """The JSON of a control frame (welcome, subscribed, error, ...); None fields are left out."""
    return kept_json({"type": kind, **{k: v for k, v in fields.items() if v is not None}})


def event_payload(seq: int, raw_event: bytes, coalesced: int = 0) -> bytes:
    """The JSON of an `event` frame: the publisher's envelope is forwarded byte for byte.

    `coalesced` (only on frames merged for a slow client) says how many published events it stands for.
    """
    if coalesced:
        return b'{"type":"event","seq":%d,"coalesced":%d,"event":%s}' % (seq, coalesced, raw_event)
    return b'{"type":"event","seq":%d,"event":%s}' % (seq, raw_event)
