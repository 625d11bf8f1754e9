"""HTTP read APIs beside the WebSocket: the history API, the caller's visible scopes and Server-Sent Events.

All use the same token rules as the socket (Authorization header, or `access_token` in the query)
and the same permission check; history and SSE read the same JetStream stream, so what they return
is byte for byte what a live subscriber saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway import tracing
from gateway.auth import AuthError, extract_token
from gateway.core.history import StreamBounds
from gateway.core.hub import control
from gateway.edge.session import open_connection, parse_initial
from gateway.events import InvalidEvent, parse_event
from gateway.principal import Principal
from gateway.protocol import SCOPE_RE, WILDCARD, FrameError

if TYPE_CHECKING:
    from gateway.app import Gateway


SCOPES_MAX_LIMIT = 1000


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _authenticate(gw: Gateway, request: Request) -> Principal | JSONResponse:
    src = extract_token(request.headers, [], request.query_params, allow_query=gw.settings.allow_query_token)
    try:
        return await gw.verifier.verify(src.token)
    except AuthError as exc:
        gw.metrics.auth_failures.labels(exc.reason).inc()
        return _error(401, "unauthorized", f"{exc.reason}: {exc.message}", **{"WWW-Authenticate": "Bearer"})


class SseChannel:
    """The RawChannel counterpart for a Server-Sent Events response: bytes go to a buffer the
    response body drains; `writable` is False while the buffer is above its high-water mark."""

    HIGH_WATER = 256 * 1024

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ready = asyncio.Event()
        self.done = False
        self.close_code: int | None = None
        self.on_writable: Any = None
        self.on_shutdown: Any = None

    @property
    def open(self) -> bool:
        return not self.done

    @property
    def writable(self) -> bool:
        return len(self.buf) < self.HIGH_WATER

    def write(self, data: bytes) -> bool:
        if self.done:
            return False
        self.buf += data
        self.ready.set()
        return True

    def close(self, code: int, reason: str = "") -> None:
        if self.done:
            return
        self.write(control("close", code=code, reason=reason).sse_bytes())
        self.close_code = code
        self.done = True
        self.ready.set()

    async def body(self, keepalive_s: float) -> AsyncIterator[bytes]:
        """The response body: buffered frames as they come, a comment line when idle (keeps proxies from
        cutting the stream), and the end of the response right after the `close` event."""
        while True:
            try:
                await asyncio.wait_for(self.ready.wait(), keepalive_s)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            self.ready.clear()
            if self.buf:
                was_full = not self.writable
                chunk = bytes(self.buf)
                self.buf.clear()
                yield chunk
                if was_full and self.on_writable is not None:
                    self.on_writable()
            if self.done and not self.buf:
                return


class HistoryPage(NamedTuple):
    items: list[bytes]  # `{"seq":N,"event":<envelope>}` entries
    last: int  # the last sequence read: `next_after`
    bounds: StreamBounds

    def recovered(self, after: int) -> bool:
        """False when the stream no longer holds everything after `after` (as `recovered` of a resume)."""
        b = self.bounds
        return not (b.earliest and after + 1 < b.earliest and b.latest > after)


async def _read_history(gw: Gateway, subject: str, after: int, limit: int) -> HistoryPage:
    reader = gw.reader
    bounds = await reader.bounds()
    items: list[bytes] = []
    last = after
    async for batch in reader.read(subject, after, limit=limit, batch=min(limit, 256)):
        for ev in batch:
            last = ev.seq
            try:
                parse_event(ev.data, ev.subject, gw.settings.subject_prefix)
            except InvalidEvent:
                continue  # never delivered live either
            items.append(b'{"seq":%d,"event":%s}' % (ev.seq, ev.data))
    return HistoryPage(items, last, bounds)


def build_router(gw: Gateway) -> APIRouter:
    router = APIRouter(tags=["read APIs"])

    @router.get("/v1/history")
    async def history(request: Request, scope: str = "", after: str = "0", limit: str = "100") -> Response:
        """Retained events of one scope after a stream sequence, oldest first (pages with `next_after`)."""
        principal = await _authenticate(gw, request)
        if isinstance(principal, JSONResponse):
            return principal
        if not SCOPE_RE.match(scope) or scope == WILDCARD:
            return _error(400, "bad_request", "scope must be <conversation|process|agent>:<id>")
        if not after.isdigit() or len(after) > 19:
            return _error(400, "bad_request", "after must be a stream sequence (a non-negative integer)")
        if not limit.isdigit() or not 1 <= int(limit) <= gw.settings.history_max_limit:
            return _error(400, "bad_request", f"limit must be an integer from 1 to {gw.settings.history_max_limit}")
        kind, _, rid = scope.partition(":")
        if not gw.acl.may_see(principal, principal.tenant, kind, rid):
            return _error(403, "forbidden", "not allowed to see this scope")
        subject = f"{gw.settings.subject_prefix}.{principal.tenant}.{kind}.{rid}"
        try:
            if gw.tracer is None:
                page = await _read_history(gw, subject, int(after), int(limit))
            else:
                with tracing.replay_span(gw.tracer, "history", [scope], int(after)) as span:
                    page = await _read_history(gw, subject, int(after), int(limit))
                    tracing.record_replay(span, len(page.items), page.recovered(int(after)))
        except Exception as exc:  # NATS down: say so, the client retries
            return _error(503, "unavailable", f"history is unavailable right now: {type(exc).__name__}")
        gw.metrics.events_replayed.inc(len(page.items))
        body = b'{"events":[%s],"next_after":%d,"earliest":%d,"latest":%d}' % (
            b",".join(page.items), page.last, page.bounds.earliest, page.bounds.latest)
        return Response(body, media_type="application/json")

    @router.get("/v1/scopes")
    async def scopes(request: Request, after: str = "", limit: str = "100") -> Response:
        """The scopes of the caller's tenant the caller may see now (those with an ACL document), sorted."""
        principal = await _authenticate(gw, request)
        if isinstance(principal, JSONResponse):
            return principal
        if after and not SCOPE_RE.match(after):
            return _error(400, "bad_request", "after must be a scope <conversation|process|agent>:<id>")
        if not limit.isdigit() or not 1 <= int(limit) <= SCOPES_MAX_LIMIT:
            return _error(400, "bad_request", f"limit must be an integer from 1 to {SCOPES_MAX_LIMIT}")
        visible = gw.acl.visible_scopes(principal, after, int(limit))
        return JSONResponse({
            "tenant": principal.tenant,
            "principal": principal.name,
            "org_admin": gw.acl.is_org_admin(principal),
            "scopes": [{"scope": scope, "via": why} for scope, why in visible],
            "next_after": visible[-1][0] if visible else after,
        })

    @router.get("/v1/sse")
    async def sse(request: Request) -> Response:
        """The live stream as Server-Sent Events: `id:` is the stream sequence; resume with Last-Event-ID."""
        principal = await _authenticate(gw, request)
        attempts = gw.metrics.connection_attempts  # like a WebSocket: every stream attempt has an outcome
        if isinstance(principal, JSONResponse):
            attempts.labels("unauthorized").inc()
            return principal
        since = request.headers.get("last-event-id") or request.query_params.get("since")
        try:
            initial = parse_initial(request.query_params.getlist("scope") or [WILDCARD], since)
        except FrameError as exc:
            attempts.labels("rejected").inc()
            return _error(400, "bad_request", exc.message)
        if len(gw.hub.connections) >= gw.settings.max_connections:
            attempts.labels("rejected").inc()
            return _error(503, "over_limit", "over connection limit: retry on another instance")
        channel = SseChannel()
        conn = open_connection(gw, channel, principal, initial, sse=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in channel.body(gw.settings.heartbeat_s):
                    yield chunk
            finally:
                gw.hub.remove(conn)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
