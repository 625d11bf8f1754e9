"""HTTP read APIs beside the WebSocket: the history API, the caller's visible scopes, presence and Server-Sent
Events.

All use the same token rules as the socket (Authorization header, or `access_token` in the query)
and the same permission check; history and SSE read the same JetStream stream, so what they return
is byte for byte what a live subscriber saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, NamedTuple

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway import tracing
from gateway.core.history import StreamBounds
from gateway.core.queue import OutFrame, coalesce, event_meta
from gateway.edge.httpauth import authenticate, error_response
from gateway.edge.openapi import (
    BAD_REQUEST,
    FLAG,
    FORBIDDEN,
    OVER_LIMIT,
    SCOPE,
    SECURITY,
    UNAUTHORIZED,
    UNAVAILABLE,
    HistoryBody,
    InboxBody,
    PresenceBody,
    ScopesBody,
    integer,
    sequence,
)
from gateway.edge.sse import sse_stream
from gateway.events import InvalidEvent, parse_event, subject_for
from gateway.protocol import FrameError, is_resource_scope, parse_flag, parse_int, parse_seq

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.principal import Principal


SCOPES_MAX_LIMIT = 1000
INBOX_MAX_LIMIT = 1000


class HistoryPage(NamedTuple):
    items: list[bytes]  # `{"seq":N,"event":<envelope>}` entries
    last: int  # the last sequence read: `next_after`
    bounds: StreamBounds


async def _read_history(gw: Gateway, subject: str, after: int, limit: int, compact: bool = False) -> HistoryPage:
    """One page; `compact`: the page's deltas merged by the coalescing rules (queue.coalesce), a merged
    item carrying the newest `seq` and `coalesced`, the number of events it stands for."""
    reader = gw.reader
    bounds = await reader.bounds()
    items: list[bytes] = []
    frames: list[OutFrame] = []
    last = after
    async for batch in reader.read(subject, after, limit=limit, batch=min(limit, 256)):
        for ev in batch:
            last = ev.seq
            try:
                env = parse_event(ev.data, ev.subject, gw.settings.subject_prefix)
            except InvalidEvent:
                continue  # never delivered live either
            if compact:
                frames.append(OutFrame(b"", ev.seq, meta=event_meta(env, ev.data)))  # only merged ones are encoded
            else:
                items.append(b'{"seq":%d,"event":%s}' % (ev.seq, ev.data))
    for f in coalesce(frames):
        assert f.meta is not None
        if f.count > 1:
            items.append(b'{"seq":%d,"coalesced":%d,"event":%s}' % (f.seq, f.count, f.meta.raw))
        else:
            items.append(b'{"seq":%d,"event":%s}' % (f.seq, f.meta.raw))
    return HistoryPage(items, last, bounds)


def build_router(gw: Gateway) -> APIRouter:
    router = APIRouter(tags=["read APIs"])

    async def authenticate_for_scope(request: Request, scope: str) -> Principal | JSONResponse:
        """The caller's principal, or the 401/503 answer, or 400 when `scope` is not one resource scope."""
        principal = await authenticate(gw, request)
        if not isinstance(principal, JSONResponse) and not is_resource_scope(scope):
            return error_response(400, "bad_request", "scope must be <conversation|process|agent>:<id>")
        return principal

    @router.get("/v1/history", openapi_extra={"security": SECURITY},
                responses={200: {"model": HistoryBody}, **BAD_REQUEST, **UNAUTHORIZED, **FORBIDDEN, **UNAVAILABLE})
    async def history(
        request: Request,
        scope: Annotated[str, Query(description="`<conversation|process|agent>:<id>`", json_schema_extra=SCOPE)] = "",
        after: Annotated[str, Query(description="Events with a stream sequence above this",
                                    json_schema_extra=sequence(0))] = "0",
        # a default, not Annotated: the bound is this gateway's setting (annotations are resolved globally)
        limit: str = Query("100", description="Page size (at most WSGATEWAY_HISTORY_MAX_LIMIT)",
                           json_schema_extra=integer(1, gw.settings.history_max_limit, 100)),
        compact: Annotated[str, Query(description="`true`: the page's message, reasoning and tool-argument deltas "
                                                  "merged into one item each (`coalesced`: how many)",
                                      json_schema_extra=FLAG)] = "false",
    ) -> Response:
        """Retained events of one scope after a stream sequence, oldest first (pages with `next_after`)."""
        principal = await authenticate_for_scope(request, scope)
        if isinstance(principal, JSONResponse):
            return principal
        try:
            after_seq = parse_seq(after, "after")
            count = parse_int(limit, "limit", 1, gw.settings.history_max_limit)
            merge = parse_flag(compact, "compact", False)
        except FrameError as exc:
            return error_response(400, "bad_request", exc.message)
        kind, _, rid = scope.partition(":")
        if not gw.acl.may_see(principal, principal.tenant, kind, rid):
            return error_response(403, "forbidden", "not allowed to see this scope")
        subject = subject_for(gw.settings.subject_prefix, principal.tenant, scope)
        try:
            if gw.tracer is None:
                page = await _read_history(gw, subject, after_seq, count, merge)
            else:
                with tracing.replay_span(gw.tracer, "history", [scope], after_seq) as span:
                    page = await _read_history(gw, subject, after_seq, count, merge)
                    tracing.record_replay(span, len(page.items), page.bounds.complete_after(after_seq))
        except Exception as exc:  # NATS down: say so, the client retries
            return error_response(503, "unavailable", f"history is unavailable right now: {type(exc).__name__}")
        gw.metrics.events_replayed.inc(len(page.items))
        body = b'{"events":[%s],"next_after":%d,"earliest":%d,"latest":%d}' % (
            b",".join(page.items), page.last, page.bounds.earliest, page.bounds.latest)
        return Response(body, media_type="application/json")

    @router.get("/v1/scopes", openapi_extra={"security": SECURITY},
                responses={200: {"model": ScopesBody}, **BAD_REQUEST, **UNAUTHORIZED, **UNAVAILABLE})
    async def scopes(
        request: Request,
        after: Annotated[str, Query(description="The last scope of the previous page (empty: from the start)")] = "",
        limit: Annotated[str, Query(description="Page size")] = "100",
    ) -> Response:
        """The scopes of the caller's tenant the caller may see now (those with an ACL document), sorted."""
        principal = await authenticate(gw, request)
        if isinstance(principal, JSONResponse):
            return principal
        if after and not is_resource_scope(after):
            return error_response(400, "bad_request", "after must be a scope <conversation|process|agent>:<id>")
        try:
            count = parse_int(limit, "limit", 1, SCOPES_MAX_LIMIT)
        except FrameError as exc:
            return error_response(400, "bad_request", exc.message)
        visible = gw.acl.visible_scopes(principal, after, count)
        return JSONResponse({
            "tenant": principal.tenant,
            "principal": principal.name,
            "org_admin": gw.acl.is_org_admin(principal),
            "scopes": [{"scope": scope, "via": why} for scope, why in visible],
            "next_after": visible[-1][0] if visible else after,
        })

    @router.get("/v1/inbox", openapi_extra={"security": SECURITY},
                responses={200: {"model": InboxBody}, **BAD_REQUEST, **UNAUTHORIZED, **UNAVAILABLE})
    async def inbox(
        request: Request,
        after: Annotated[str, Query(description="Requests with a stream sequence above this (paging)")] = "0",
        limit: Annotated[str, Query(description="Page size")] = "100",
    ) -> Response:
        """The requests for input open now for the caller, oldest first: assigned to the caller or one of its
        groups (or to everyone), of processes the caller may see now, not expired."""
        principal = await authenticate(gw, request)
        if isinstance(principal, JSONResponse):
            return principal
        try:
            after_seq = parse_seq(after, "after")
            count = parse_int(limit, "limit", 1, INBOX_MAX_LIMIT)
        except FrameError as exc:
            return error_response(400, "bad_request", exc.message)
        registry = gw.hub.index.inbox
        if not registry.loaded:
            return error_response(503, "unavailable", "the inbox is not loaded yet (NATS); retry shortly")
        try:
            bounds = await gw.reader.bounds()
        except Exception as exc:  # NATS down: say so, the client retries
            return error_response(503, "unavailable", f"the inbox is unavailable right now: {type(exc).__name__}")
        registry.prune(principal.tenant, bounds.earliest)
        page = registry.open_for(principal, after=after_seq)[:count]
        body = b'{"tenant":%s,"principal":%s,"requests":[%s],"seq":%d,"next_after":%d,"earliest":%d}' % (
            orjson.dumps(principal.tenant), orjson.dumps(principal.name),
            b",".join(b'{"seq":%d,"event":%s}' % (r.seq, r.raw) for r in page),
            gw.hub.last_seq, page[-1].seq if page else after_seq, bounds.earliest)
        return Response(body, media_type="application/json")

    @router.get("/v1/presence", openapi_extra={"security": SECURITY},
                responses={200: {"model": PresenceBody}, **BAD_REQUEST, **UNAUTHORIZED, **FORBIDDEN, **UNAVAILABLE})
    async def presence(
        request: Request,
        scope: Annotated[str, Query(description="`<conversation|process|agent>:<id>`", json_schema_extra=SCOPE)] = "",
    ) -> Response:
        """Who is watching a scope now (cluster-wide) and which agents are active in it: the presence snapshot."""
        principal = await authenticate_for_scope(request, scope)
        if isinstance(principal, JSONResponse):
            return principal
        kind, _, rid = scope.partition(":")
        if not gw.acl.may_see(principal, principal.tenant, kind, rid):
            return error_response(403, "forbidden", "not allowed to see this scope")
        if not gw.hub.presence.synced:
            return error_response(503, "unavailable", "presence is unavailable right now (NATS); retry shortly")
        return JSONResponse({"tenant": principal.tenant, **gw.hub.presence.current(principal.tenant, scope)})

    @router.get("/v1/sse", openapi_extra={"security": SECURITY}, responses={
        200: {"description": "The stream: `id:` is the stream sequence; ends after an `event: close`",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **BAD_REQUEST, **UNAUTHORIZED, **OVER_LIMIT,
    })
    async def sse(
        request: Request,
        scope: Annotated[list[str] | None, Query(description="Scopes to subscribe (repeat, or comma-separated); "
                                                             "none: `*`, every scope the caller may see")] = None,
        since: Annotated[str | None, Query(description="Resume after this stream sequence")] = None,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", description="As `since`, set by "
                                                    "EventSource when it reconnects")] = None,
        presence: Annotated[str | None, Query(description="`true`: the scopes' `presence` events too")] = None,
        listed: Annotated[str | None, Query(description="`false`: watch without being listed in presence")] = None,
        compact: Annotated[str | None, Query(description="`true`: the resumed range's deltas merged "
                                                         "(docs/protocol.md, Compact catch-up)",
                                             json_schema_extra=FLAG)] = None,
    ) -> Response:
        """The live stream as Server-Sent Events: `id:` is the stream sequence; resume with Last-Event-ID."""
        return await sse_stream(gw, request)

    return router


__all__ = ["INBOX_MAX_LIMIT", "HistoryPage", "build_router"]
