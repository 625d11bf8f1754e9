"""One client's WebSocket session: authenticate, then answer frames until the socket closes.

The handshake runs in the connection's ASGI task; then the session becomes a callback (`ClientFrames`)
that the protocol calls with each client frame as it is parsed, and the task ends: an idle connection
keeps no task or coroutine frames alive (docs/performance.md). The session only ever *receives*;
everything it sends goes through the hub (so control frames stay ordered with events), which alone
changes connection state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from gateway import tracing
from gateway.auth import AuthError, extract_token
from gateway.core.channel import Channel
from gateway.core.connection import Connection
from gateway.core.queue import control
from gateway.edge.httpauth import STARTING
from gateway.edge.transport import EXTENSION, RawChannel
from gateway.principal import Principal
from gateway.protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    ERR_BAD_REQUEST,
    ERR_UNAUTHORIZED,
    ERR_UNAVAILABLE,
    FrameError,
    Ping,
    Refresh,
    Subscribe,
    Unsubscribe,
    is_scope,
    parse_client_frame,
    parse_flag,
    parse_seq,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)


def principal_info(p: Principal) -> dict[str, object]:
    return {"id": p.name, "subject": p.subject, "tenant": p.tenant, "groups": list(p.groups)}


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass


def _forget_credentials(scope: Scope) -> None:
    """Drop the handshake's headers and query (the token among them) once the token is verified: they
    are not needed again, and an idle connection should not carry them (and a secret) for hours."""
    scope["headers"] = []
    scope["query_string"] = b""
    scope["subprotocols"] = []


class Query:
    """The connection URL's query, read as Starlette's `QueryParams` reads it (`get`: the last value of a
    name, `getlist`: all of them, in order; tests/test_ws_protocol.py compares the two) without its cost
    (a fifteenth of a handshake): a query with no escapes is split here, one with escapes goes through
    `parse_qsl` as there."""

    __slots__ = ("_items",)

    def __init__(self, raw: bytes) -> None:
        text = raw.decode("latin-1")
        items: dict[str, list[str]] = {}
        if "%" in text or "+" in text:
            pairs = parse_qsl(text, keep_blank_values=True)
        else:
            pairs = [(name, value) for name, _, value in (p.partition("=") for p in text.split("&") if p)]
        for name, value in pairs:
            got = items.get(name)
            if got is None:
                items[name] = [value]
            else:
                got.append(value)
        self._items = items

    def get(self, name: str) -> str | None:
        values = self._items.get(name)
        return None if values is None else values[-1]

    def getlist(self, name: str) -> list[str]:
        return list(self._items.get(name, ()))


def _authorization(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The first Authorization header (as Starlette's `Headers.get` finds it), for `extract_token`."""
    for name, value in headers:
        if name == b"authorization":
            return {"authorization": value.decode("latin-1")}
    return {}


class Refused(NamedTuple):
    """A handshake that ended in a close instead of a session."""

    outcome: str  # wsgateway_connection_attempts_total label: unauthorized | rejected
    code: int  # the close code sent
    auth_failure: str | None = None  # AuthError reason, for 4401


async def serve_socket(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """The whole life of one WebSocket: handshake, authentication, then client frames until it closes."""
    channel: RawChannel | None = scope.get("extensions", {}).get(EXTENSION)
    if channel is None:
        raise RuntimeError("the gateway must run with ws=gateway.edge.transport:GatewayWSProtocol")
    if gw.tracer is None:
        conn = await _handshake(gw, channel, scope)
    else:
        # FastAPI's instrumentation never sees /v1/ws (GatewayApp dispatches it first): a span of our own,
        # current while URL subscriptions start, so a `since` replay becomes its child
        with tracing.handshake_span(gw.tracer, scope) as span:
            conn = await _handshake(gw, channel, scope)
            if isinstance(conn, Refused):
                tracing.handshake_refused(span, conn.outcome, conn.code, conn.auth_failure)
            else:
                tracing.handshake_accepted(span, conn.id)
    if isinstance(conn, Refused):
        await _until_disconnect(receive)
        return
    channel.receive_with(ClientFrames(gw, conn, channel))  # the task ends here; the connection goes on


class ClientFrames:
    """One connection's client frames, answered as the protocol parses them (`RawChannel.receive_with`).

    Frames are handled one at a time, in order: a `refresh` (which may wait for the JWKS) holds the
    socket's reading and queues what already arrived until its answer is out."""

    __slots__ = ("bad_frames", "channel", "conn", "gw", "pending", "refreshing")

    def __init__(self, gw: Gateway, conn: Connection, channel: RawChannel) -> None:
        self.gw = gw
        self.conn = conn
        self.channel = channel
        self.bad_frames = 0
        self.pending: list[dict[str, Any]] | None = None  # not None while a refresh is being verified
        self.refreshing: asyncio.Task[None] | None = None

    def __call__(self, msg: dict[str, Any]) -> None:
        if self.pending is not None:
            self.pending.append(msg)
        else:
            self.handle(msg)

    def handle(self, msg: dict[str, Any]) -> None:
        gw, conn = self.gw, self.conn
        if msg["type"] == "websocket.disconnect":
            gw.hub.remove(conn)
            return
        if msg["type"] != "websocket.receive":
            return
        text = msg.get("text")
        try:
            if text is None:
                raise FrameError(ERR_BAD_REQUEST, "binary frames are not accepted: send JSON text")
            frame = parse_client_frame(text)
        except FrameError as exc:
            self.bad_frames += 1
            _bad(gw, conn, exc, self.bad_frames)
            return
        if isinstance(frame, Subscribe):
            start_subscriptions(gw, conn, frame.id, [frame.scope], frame.since, presence=frame.presence,
                                listed=frame.listed, compact=frame.compact)
        elif isinstance(frame, Unsubscribe):
            gw.hub.unsubscribe(conn, frame.id, frame.scope)
        elif isinstance(frame, Ping):
            gw.hub.send(conn, control("pong", id=frame.id))
        elif isinstance(frame, Refresh):
            self.pending = []
            self.channel.hold_reading()
            self.refreshing = asyncio.get_running_loop().create_task(self._refresh(frame))

    async def _refresh(self, frame: Refresh) -> None:
        try:
            await _refresh(self.gw, self.conn, frame)
        finally:
            pending = self.pending or []
            self.pending = self.refreshing = None
            for i, msg in enumerate(pending):
                self.handle(msg)
                if self.pending is not None:  # another refresh: the rest waits behind it
                    self.pending.extend(pending[i + 1:])
                    break
            else:
                self.channel.release_reading()


async def _handshake(gw: Gateway, channel: RawChannel, scope: Scope) -> Connection | Refused:
    """Check capacity, verify the token and the URL parameters, then accept: a connection in the hub, or a
    close (after the 101: refusals are WebSocket close codes).

    The 101 goes out through the channel (`RawChannel.accept`), not as an ASGI message: a Starlette
    WebSocket and uvicorn's ASGI send were a twentieth of a handshake's CPU. An accepted connection's 101
    is held back until its first frames (welcome, the URL subscriptions' answers) are queued, and goes out
    with them in one write (`Hub.write_first`)."""
    metrics, hub, settings = gw.metrics, gw.hub, gw.settings
    q = Query(scope["query_string"])
    src = extract_token(
        _authorization(scope["headers"]), scope.get("subprotocols") or [], q, allow_query=settings.allow_query_token
    )
    refused: Refused
    reason = ""
    if hub.full:
        refused, reason = Refused("rejected", CLOSE_TOO_SLOW), "over connection limit: retry on another instance"
    elif not gw.bus.started:  # before the ACLs are loaded every subscription would be refused, not resumed
        refused, reason = Refused("rejected", CLOSE_TRY_AGAIN), STARTING
    else:
        try:
            principal = await gw.verifier.verify(src.token)
        except AuthError as exc:
            metrics.auth_failures.labels(exc.reason).inc()
            refused = Refused("unauthorized", CLOSE_UNAUTHORIZED, exc.reason)
            reason = f"{exc.reason}: {exc.message}"
        else:
            try:
                initial = parse_initial(q.getlist("scope"), q.get("since"), q.get("presence"), q.get("listed"),
                                        q.get("compact"))
            except FrameError as exc:
                refused, reason = Refused("rejected", CLOSE_BAD_REQUEST), exc.message
            else:
                subprotocol = src.subprotocol
                del q, src  # from here on the session only receives; the handshake objects and the token can go
                head = await channel.accept(subprotocol, hold=True)
                if channel.compresses:
                    channel.compress_with(gw.deflater)
                _forget_credentials(scope)
                channel.limit_kernel_buffer(settings.socket_send_buffer)
                try:
                    conn = open_connection(gw, channel, principal, initial)
                except BaseException:
                    channel.write(head)  # the 101 is owed, whatever happens next (run_asgi's verdict)
                    raise
                hub.write_first(conn, head)
                return conn
    await channel.accept(src.subprotocol)
    if channel.compresses:
        channel.compress_with(gw.deflater)
    metrics.connection_attempts.labels(refused.outcome).inc()
    channel.close(refused.code, reason)
    return refused


def open_connection(gw: Gateway, channel: Channel, principal: Principal, initial: Initial) -> Connection:
    """An authenticated client joins the hub: counted, welcomed, its expiry armed, its URL subscriptions
    started. Shared by the WebSocket session and the SSE endpoint."""
    conn = gw.hub.open(channel, principal, secrets.token_hex(16), cursor=initial.since)
    gw.metrics.connections_accepted.inc()
    heartbeat = gw.settings.heartbeat_s if channel.kind == "websocket" else None  # SSE: comment lines
    gw.hub.send(conn, control(
        "welcome", connection_id=conn.id, principal=principal_info(principal),
        expires_at=int(principal.expires_at), heartbeat_s=heartbeat,
    ))
    start_subscriptions(gw, conn, None, initial.scopes, initial.since, presence=initial.presence,
                        listed=initial.listed, compact=initial.compact)
    return conn


class Initial(NamedTuple):
    scopes: list[str]
    since: int | None
    presence: bool = False  # `?presence=true`: the URL scopes' presence frames too
    listed: bool = True  # `?listed=false`: watch the URL scopes without being listed in their presence
    compact: bool = False  # the URL subscriptions' replay merges deltas (docs/protocol.md, Compact catch-up)


def parse_initial(
    scopes: list[str], since: str | None, presence: str | None = None, listed: str | None = None,
    compact: str | None = None,
) -> Initial:
    """`?scope=...&scope=...&since=N&presence=true&listed=false&compact=true` on the connection URL:
    subscriptions made at connect time.

    With `since`, the connection has a cursor: these and all later subscriptions resume from it.
    """
    wanted: list[str] = []
    for item in scopes:
        for scope in filter(None, item.split(",")):
            if not is_scope(scope):
                raise FrameError(ERR_BAD_REQUEST, f"bad scope in URL: {scope[:40]!r}")
            if scope not in wanted:
                wanted.append(scope)
    return Initial(wanted, None if since is None else parse_seq(since, "since"),
                   parse_flag(presence, "presence", False), parse_flag(listed, "listed", True),
                   parse_flag(compact, "compact", False))


def start_subscriptions(
    gw: Gateway, conn: Connection, request_id: str | int | None, scopes: list[str], since: int | None,
    *, presence: bool = False, listed: bool = True, compact: bool = False,
) -> None:
    """Live subscriptions, or (with a cursor) one replay for all of them followed by live delivery
    (`compact`: the replay merges deltas).

    A connection opened with `?since=N` has a cursor: all its later subscriptions resume from it too."""
    if not scopes:
        return
    if since is None and conn.cursor is not None:
        since = max(conn.cursor, conn.last_seq)
    watch = gw.hub.presence.watch
    if since is None:
        for scope in scopes:
            gw.hub.subscribe(conn, request_id, scope)
            watch(conn, scope, listed=listed, frames=presence)
        return
    try:
        replayer = gw.replayer
    except RuntimeError:
        gw.hub.send(conn, control("error", id=request_id, code=ERR_UNAVAILABLE,
                                  message="history is unavailable right now (NATS); retry shortly"))
        return
    for scope in scopes:
        watch(conn, scope, listed=listed, frames=presence, settle=False)  # the replay settles them
    replayer.start(conn, request_id, scopes, since, compact=compact)


def _bad(gw: Gateway, conn: Connection, exc: FrameError, count: int) -> None:
    gw.metrics.client_frames_rejected.labels(exc.code).inc()
    if count > gw.settings.max_bad_frames:
        gw.hub.close(conn, CLOSE_POLICY, f"too many bad frames ({count})")
        return
    gw.hub.send(conn, control("error", id=exc.request_id, code=exc.code, message=exc.message))


async def _refresh(gw: Gateway, conn: Connection, frame: Refresh) -> None:
    try:
        new = await gw.verifier.verify(frame.token)
    except AuthError as exc:
        gw.metrics.auth_failures.labels(exc.reason).inc()
        gw.hub.send(conn, control("error", id=frame.id, code=ERR_UNAUTHORIZED, message=f"{exc.reason}: {exc.message}"))
        return
    old = conn.principal
    if conn.closed:
        return
    if (new.subject, new.tenant) != (old.subject, old.tenant):
        gw.hub.send(conn, control("error", id=frame.id, code=ERR_UNAUTHORIZED,
                                  message="refresh token must be for the same subject and tenant"))
        return
    gw.hub.refresh(conn, new)
    gw.hub.send(conn, control("refreshed", id=frame.id, expires_at=int(new.expires_at)))
