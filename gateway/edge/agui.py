"""AG-UI over HTTP+SSE (`GET /v1/agui?scope=...`): one scope's runs as an AG-UI 1.0 event stream.

An AG-UI stream is an SSE stream with another encoding: the same hub, queue, replay and permission
checks serve it (`AguiChannel` is an `SseChannel` whose `encode` maps). Each event is `data: <json>`
as `@ag-ui/encoder` writes it; our extension is `id: <stream sequence>` on the last AG-UI event of each
gateway event (AG-UI says to ignore `id:`; EventSource and our clients resume with Last-Event-ID), an
`id:` line alone for a gateway event that maps to nothing, and the gateway's control frames as SSE
comments (`: {"type":"welcome",...}`), which every SSE parser skips.

A stream always starts valid for AG-UI's verifier, whether it joins or resumes: the scope's retained
events up to the starting point are read back from JetStream and folded into the mapper's thread
model, whose prelude (RUN_STARTED, MESSAGES_SNAPSHOT, STATE_SNAPSHOT, the re-opening of what is open)
comes before the first delta.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway.agui_map import AgEvent, AguiMapper
from gateway.core.queue import OutFrame
from gateway.edge.httpauth import authenticate, error_response
from gateway.edge.openapi import BAD_REQUEST, FORBIDDEN, SCOPE, SECURITY, UNAUTHORIZED, ErrorBody, Responses
from gateway.edge.session import Initial, open_connection
from gateway.edge.sse import SseChannel, stream_response
from gateway.events import InvalidEvent, parse_event, subject_for
from gateway.protocol import WILDCARD, FrameError, is_scope, parse_seq

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

UNAVAILABLE_OR_FULL: Responses = {503: {"model": ErrorBody, "description": (
    "NATS is unavailable right now (the stream cannot be read back), this instance is at "
    "WSGATEWAY_MAX_CONNECTIONS, or it is starting (ACLs and stream position not loaded yet); retry")}}


def _data(events: Sequence[AgEvent], seq: int) -> bytes:
    """AG-UI's SSE encoding of `events`, `id: seq` on the last one (or alone when there is none)."""
    if not events:
        return b"id: %d\n\n" % seq if seq else b""
    out = bytearray()
    last = len(events) - 1
    for i, ev in enumerate(events):
        if i == last and seq:
            out += b"id: %d\n" % seq
        out += b"data: " + orjson.dumps(ev) + b"\n\n"
    return bytes(out)


class AguiChannel(SseChannel):
    """An SSE channel whose frames are mapped to AG-UI events, in delivery order, by this stream's mapper."""

    def __init__(self, mapper: AguiMapper) -> None:
        super().__init__()
        self.mapper = mapper

    def encode(self, frames: Sequence[OutFrame]) -> bytes:  # a method (SseChannel's is static)
        out = bytearray()
        for f in frames:
            if f.ctl is not None or not f.seq:
                out += b": " + f.payload + b"\n\n"  # welcome, subscribed, revoked, error, close
                continue
            out += _data(_feed(self.mapper, orjson.loads(f.payload)["event"]), f.seq)
        return bytes(out)


def _feed(mapper: AguiMapper, env: dict[str, Any]) -> list[AgEvent]:
    """`mapper.feed`, never raising: this runs in the writer's flush, which serves every connection. An event
    the mapping cannot handle maps to nothing, logged (defence in depth: no such event is known; the
    gateway's own parser refuses JSON nested deeper than the mapping's recursive copies can go)."""
    try:
        return mapper.feed(env)
    except Exception:
        log.warning("agui: event %r of %s not mapped", env.get("id"), mapper.thread, exc_info=True)
        return []


_FOLDS: weakref.WeakKeyDictionary[Gateway, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def _fold(gw: Gateway, mapper: AguiMapper, subject: str, upto: int) -> None:
    """The scope's retained events up to `upto` into the mapper's model (their output is not sent). At most
    WSGATEWAY_MAX_CONCURRENT_REPLAYS folds read at once per gateway (like replays); the others wait."""
    slots = _FOLDS.get(gw)
    if slots is None:
        slots = _FOLDS[gw] = asyncio.Semaphore(gw.settings.max_concurrent_replays)
    async with slots:
        async for batch in gw.reader.read(subject, 0, upto=upto):
            for ev in batch:
                try:
                    parse_event(ev.data, ev.subject, gw.settings.subject_prefix)
                except InvalidEvent:
                    continue  # never delivered live either
                _feed(mapper, orjson.loads(ev.data))


async def agui_stream(gw: Gateway, request: Request) -> Response:
    principal = await authenticate(gw, request)
    attempts = gw.metrics.connection_attempts
    if isinstance(principal, JSONResponse):
        attempts.labels("unauthorized").inc()
        return principal
    scopes = request.query_params.getlist("scope")
    if len(scopes) != 1 or not is_scope(scopes[0]) or scopes[0] == WILDCARD:
        attempts.labels("rejected").inc()
        return error_response(400, "bad_request", "scope must be one <conversation|process|agent>:<id>")
    scope = scopes[0]
    header = request.headers.get("last-event-id")
    since_text = header or request.query_params.get("since")
    try:
        since = None if since_text is None else parse_seq(since_text, "Last-Event-ID" if header else "since")
    except FrameError as exc:
        attempts.labels("rejected").inc()
        return error_response(400, "bad_request", exc.message)
    kind, _, rid = scope.partition(":")
    if not gw.acl.may_see(principal, principal.tenant, kind, rid):
        attempts.labels("rejected").inc()
        return error_response(403, "forbidden", "not allowed to see this scope")
    if gw.hub.full:
        attempts.labels("rejected").inc()
        return error_response(503, "over_limit", "over connection limit: retry on another instance")
    mapper = AguiMapper(scope)
    try:
        upto = since if since is not None else (await gw.reader.bounds()).latest
        await _fold(gw, mapper, subject_for(gw.settings.subject_prefix, principal.tenant, scope), upto)
    except Exception as exc:  # NATS down: say so, the client retries
        attempts.labels("rejected").inc()
        return error_response(503, "unavailable", f"the stream is unavailable right now: {type(exc).__name__}")
    if gw.hub.full:  # again: the read-back took a while
        attempts.labels("rejected").inc()
        return error_response(503, "over_limit", "over connection limit: retry on another instance")
    channel = AguiChannel(mapper)
    channel.write(_data(mapper.prelude(), upto))
    return stream_response(gw, channel, open_connection(gw, channel, principal, Initial([scope], upto)))


def build_agui_router(gw: Gateway) -> APIRouter:
    router = APIRouter(tags=["read APIs"])
    stream: dict[str, Any] = {"description": (
        "AG-UI 1.0 events (`data: <json>`, @ag-ui/encoder's SSE encoding); our extension: `id:` is the stream "
        "sequence, control frames are SSE comments"), "content": {"text/event-stream": {"schema": {"type": "string"}}}}

    @router.get("/v1/agui", openapi_extra={"security": SECURITY},
                responses={200: stream, **BAD_REQUEST, **UNAUTHORIZED, **FORBIDDEN, **UNAVAILABLE_OR_FULL})
    async def agui(
        request: Request,
        scope: Annotated[str, Query(description="The thread: one `<conversation|process|agent>:<id>`",
                                    json_schema_extra=SCOPE)] = "",
        since: Annotated[str | None, Query(description="Resume after this stream sequence")] = None,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", description="As `since` (wins over "
                                                    "it), set by EventSource when it reconnects")] = None,
    ) -> Response:
        """One scope's agent runs as an AG-UI event stream; joins and resumes start with a snapshot prelude."""
        return await agui_stream(gw, request)

    return router


__all__ = ["AguiChannel", "agui_stream", "build_agui_router"]
