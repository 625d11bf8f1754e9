"""The application factory: builds one gateway (state passed explicitly) and its FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway import package_version, tracing
from gateway.auth import TokenVerifier
from gateway.config import Settings, fit_open_file_limit
from gateway.core.bus import Bus
from gateway.core.history import StreamReader
from gateway.core.hub import Hub
from gateway.core.replay import Replayer
from gateway.core.window import RecentWindow
from gateway.edge.agui import build_agui_router
from gateway.edge.cors import CorsMiddleware
from gateway.edge.deflate import Deflater
from gateway.edge.http_api import INBOX_MAX_LIMIT, SCOPES_MAX_LIMIT, build_router
from gateway.edge.openapi import ReadyBody, truthful_openapi
from gateway.edge.session import serve_socket
from gateway.gc_tuning import tune_gc
from gateway.logs import configure_logging, install_redaction
from gateway.metrics import Metrics
from gateway.permissions import AclStore

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from gateway.devtools.devidp import DevIdentityProvider

log = logging.getLogger(__name__)


class Gateway:
    """Everything one gateway process owns; created by `create_app`, reachable as `app.state.gateway`."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, issuer: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer  # None: tracing off (gateway/tracing.py)
        self.metrics = metrics or Metrics()
        self.metrics.set_capacity(settings.max_connections, settings.connections_target)
        self.acl = AclStore()
        self.hub = Hub(settings, self.metrics, self.acl)
        self.window = RecentWindow(settings.replay_window_bytes)  # recent events for resumes (core/window.py)
        self.bus = Bus(settings, self.hub, self.acl, self.metrics, tracer=tracer, window=self.window)
        self.verifier = TokenVerifier.from_settings(settings, issuer=issuer)
        self.deflater = Deflater(self.metrics.frames_compressed.inc)  # permessage-deflate, once per frame

        self._replayer: Replayer | None = None
        self._unchain_signals: Callable[[], None] = lambda: None

    @property
    def reader(self) -> StreamReader:
        if self.bus.js is None:
            raise RuntimeError("not connected to NATS yet")
        return StreamReader(self.bus.js, self.settings.stream)

    @property
    def replayer(self) -> Replayer:
        if self._replayer is None:
            self._replayer = Replayer(
                self.hub, self.reader, max_concurrent=self.settings.max_concurrent_replays, tracer=self.tracer,
                window=self.window,
            )
        return self._replayer

    async def start(self) -> None:
        await self.verifier.start()
        await self.bus.start()
        if self.settings.gc_gen0_threshold > 0:
            tune_gc(self.settings.gc_gen0_threshold)
        self._unchain_signals = chain_exit_signals(asyncio.get_running_loop(), self.begin_shutdown)

    def begin_shutdown(self) -> None:
        """The server was told to stop: end every SSE stream now, after what is queued, with a `close`
        event (1001). WebSockets get theirs from uvicorn's protocol shutdown (transport.py); an SSE
        response would otherwise run until the graceful-shutdown timeout."""
        for conn in list(self.hub.connections.values()):
            if conn.channel.kind == "sse":
                self.hub.go_away(conn)

    async def stop(self) -> None:
        self._unchain_signals()
        for conn in list(self.hub.connections.values()):
            self.hub.go_away(conn)
        await self.bus.stop()
        await self.verifier.aclose()

    def readiness(self) -> dict[str, bool]:
        nc = self.bus.nc
        return {
            "nats_connected": bool(nc and nc.is_connected),
            "consumer_live": self.bus.consuming,
            "acl_loaded": self.bus.acl_ready.is_set(),
            "jwks_loaded": self.verifier.ready,
        }


def chain_exit_signals(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` on the loop when SIGINT/SIGTERM arrive, then the handler that was there.

    uvicorn installs its own Python handlers before the app starts (and restores the previous ones
    when it ends); chaining in front of them is how the gateway learns that shutdown began before the
    server waits for open HTTP responses. The callback is scheduled with `call_soon_threadsafe`, never
    run inside the signal handler, so it cannot interleave with the hub's own work. Nothing happens
    outside the main thread or when no Python handler is installed. Returns what undoes it (where the
    chain is still in place).
    """
    installed: list[tuple[signal.Signals, Any, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(callback)
                previous(signum, frame)

            signal.signal(sig, handler)
            installed.append((sig, handler, previous))

    def undo() -> None:
        for sig, handler, previous in installed:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return undo


WS_PATH = "/v1/ws"
STATIC_DIR = Path(__file__).parent / "static"
VIEWER_HEADERS = {  # the viewer is self-contained: no inline code, no other origin, never framed
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class GatewayApp(FastAPI):
    """FastAPI for HTTP; the WebSocket endpoint is dispatched before the router and middleware stack.

    Every open WebSocket keeps its ASGI call on the stack for its whole life. Through FastAPI's router,
    exception middleware and AsyncExitStack that is ~10 KiB per idle connection; dispatched here, the
    session holds only what it uses (see docs/performance.md for the per-connection figures).
    """

    def openapi(self) -> dict[str, Any]:
        return truthful_openapi(self, self.state.gateway.settings.history_max_limit, SCOPES_MAX_LIMIT, INBOX_MAX_LIMIT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            await serve_socket(self.state.gateway, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    dev_idp: DevIdentityProvider | None = None,
    metrics: Metrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the gateway app. In dev mode the development identity provider is mounted at /dev/idp.

    Tracing uses `tracer_provider` if given (tests; the caller keeps ownership, the app only flushes
    it), else one built from the settings (none unless WSGATEWAY_OTEL_ENDPOINT is set), shut down with
    the app.
    """
    settings, fd_warning = fit_open_file_limit(settings or Settings())
    if fd_warning:
        log.warning("%s", fd_warning)
    if settings.dev_mode and dev_idp is None and not (settings.oidc_issuer or settings.jwks_url):
        raise ValueError("dev_mode needs the development identity provider: run `wsgateway dev`, not `serve`")
    install_redaction()
    owns_provider = tracer_provider is None
    provider = tracing.build_provider(settings) if tracer_provider is None else tracer_provider
    gateway = Gateway(
        settings, metrics=metrics, issuer=dev_idp.issuer if dev_idp else None, tracer=tracing.tracer_of(provider)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            try:
                await gateway.stop()
            finally:
                if provider is not None:
                    await tracing.close_provider(provider, owned=owns_provider)

    docs = settings.api_docs  # off by default: FastAPI's pages load their scripts from a CDN
    app = GatewayApp(title="wsgateway", version=package_version(), lifespan=lifespan,
                     docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.gateway = gateway
    if settings.cors_origin_list:  # WSGATEWAY_CORS_ORIGINS: browser pages of other origins (edge/cors.py)
        app.add_middleware(CorsMiddleware, origins=settings.cors_origin_list)
    if provider is not None:
        tracing.instrument_fastapi(app, provider)

    if dev_idp is not None:
        app.include_router(dev_idp.router(), prefix="/dev/idp", tags=["dev identity provider (insecure)"])

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    not_ready: dict[int | str, dict[str, Any]] = {
        200: {"model": ReadyBody, "description": "Ready: every check holds"},
        503: {"model": ReadyBody, "description": "Not ready: the body says which check fails"},
    }

    @app.get("/readyz", tags=["operations"], responses=not_ready)
    async def readyz() -> JSONResponse:
        """Ready to serve: NATS connected, consumer live, ACLs and JWKS loaded."""
        checks = gateway.readiness()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    exposition: dict[int | str, dict[str, Any]] = {200: {"description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}

    @app.get("/metrics", tags=["operations"], responses=exposition)
    async def metrics_endpoint() -> Response:
        body, ctype = gateway.metrics.exposition()
        return Response(body, media_type=ctype)

    app.include_router(build_router(gateway))
    app.include_router(build_agui_router(gateway))

    @app.get("/", include_in_schema=False)
    async def viewer() -> FileResponse:
        """The live viewer (plain HTML/JS/CSS from gateway/static): pick a user or paste a token, watch."""
        return FileResponse(STATIC_DIR / "index.html", headers=VIEWER_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    return app


def app_from_env(settings: Settings | None = None) -> FastAPI:
    """uvicorn factory for `wsgateway serve` worker processes: settings from WSGATEWAY_* variables
    (or the ones given, read from them already)."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """The uvicorn settings the data path relies on (protocol classes, limits, keepalive, shutdown).

    `http` is uvicorn's own HTTP protocol with a deadline for request headers (edge/http_protocol.py);
    a fresh one per call, since it counts its server's waiting connections."""
    from gateway.edge.http_protocol import HeaderDeadline

    return {
        "http": HeaderDeadline(settings.header_timeout_s, settings.max_connections),
        "ws": "gateway.edge.transport:GatewayWSProtocol",
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": settings.heartbeat_s,
        "ws_ping_timeout": settings.heartbeat_s,
        "ws_per_message_deflate": settings.ws_compression,  # served by edge/deflate.py, never uvicorn's own
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "lifespan": "on",
        # said, not guessed: logs.AccessTiming's __call__ is a plain function (no coroutine frame per socket)
        "interface": "asgi3",
        "log_level": settings.log_level,
    }
