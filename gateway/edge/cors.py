"""CORS for the browser read APIs: pages of the origins in WSGATEWAY_CORS_ORIGINS may call
`GET /v1/history`, `/v1/scopes`, `/v1/inbox`, `/v1/presence`, `/v1/sse` and `/v1/agui` (docs/protocol.md, CORS).

A small ASGI middleware rather than Starlette's CORSMiddleware, for three reasons: it answers only on
these paths (not /metrics, /readyz or the dev routes), an origin that is not listed gets no CORS
header at all (Starlette's preflight refusal still sends Allow-Methods/Allow-Headers/Max-Age), and a
refused preflight from a listed origin gets the gateway's JSON error saying what was refused. It never
sends `Access-Control-Allow-Credentials`: the APIs take a bearer token (Authorization header or
`access_token`), never cookies, so browsers need no credentialed requests. The WebSocket is dispatched
before the middleware stack (app.py), so this costs the data path nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CORS_PATHS = frozenset({"/v1/history", "/v1/scopes", "/v1/inbox", "/v1/presence", "/v1/sse", "/v1/agui"})
ALLOW_METHODS = ("GET",)
ALLOW_HEADERS = ("Authorization", "Last-Event-ID")
MAX_AGE_S = 600  # how long a browser may cache a successful preflight (Chromium caps it at 7200)

_ALLOWED_HEADER_NAMES = frozenset(h.lower() for h in ALLOW_HEADERS)
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class CorsMiddleware:
    """Adds `Access-Control-Allow-Origin: <origin>` and `Vary: Origin` to the read APIs' responses for a
    listed origin and answers their preflights; everything else passes through untouched."""

    def __init__(self, app: ASGIApp, origins: Iterable[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in CORS_PATHS or not self.origins:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        listed = origin is not None and origin in self.origins
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            if listed:
                await self._preflight(headers, send)
                return
            # not listed: the app's own answer (405), with no CORS header; browsers refuse the request
            await self.app(scope, receive, _with_headers(send, None))
            return
        await self.app(scope, receive, _with_headers(send, origin if listed else None))

    async def _preflight(self, headers: Headers, send: Send) -> None:
        origin = headers["origin"]
        method = headers["access-control-request-method"].strip()
        requested = [h.strip() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
        refused = [h for h in requested if h.lower() not in _ALLOWED_HEADER_NAMES]
        problem = None
        if method not in ALLOW_METHODS:
            problem = f"CORS preflight: method {method!r} is not allowed (only GET)"
        elif refused:
            problem = (f"CORS preflight: request header {refused[0]!r} is not allowed "
                       f"(only {', '.join(ALLOW_HEADERS)})")
        if problem is not None:
            body = json.dumps({"error": {"code": "bad_request", "message": problem}}).encode()
            await _respond(send, 400, [(b"content-type", b"application/json"), (b"vary", _PREFLIGHT_VARY.encode())],
                           body)
            return
        await _respond(send, 204, [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", ", ".join(ALLOW_METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(ALLOW_HEADERS).encode()),
            (b"access-control-max-age", str(MAX_AGE_S).encode()),
            (b"vary", _PREFLIGHT_VARY.encode()),
        ], b"")


def _with_headers(send: Send, origin: str | None) -> Send:
    """`send` that adds `Vary: Origin` (the answer depends on it) and, for a listed origin, the
    Access-Control-Allow-Origin header to the response start."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            out = MutableHeaders(scope=message)
            out.add_vary_header("Origin")
            if origin is not None:
                out["Access-Control-Allow-Origin"] = origin
        await send(message)

    return wrapped


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
