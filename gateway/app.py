"""The application factory: builds one gateway (state passed explicitly) and its FastAPI app."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.auth import TokenVerifier
from gateway.bus import Bus
from gateway.config import Settings
from gateway.history import StreamReader
from gateway.http_api import build_router
from gateway.hub import Hub
from gateway.logs import configure_logging, install_redaction
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.replay import Replayer
from gateway.session import serve_socket

if TYPE_CHECKING:
    from gateway.devidp import DevIdentityProvider

log = logging.getLogger(__name__)


class Gateway:
    """Everything one gateway process owns; created by `create_app`, reachable as `app.state.gateway`."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, issuer: str | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.acl = AclStore()
        self.hub = Hub(settings, self.metrics, self.acl)
        self.bus = Bus(settings, self.hub, self.acl, self.metrics)
        self.verifier = TokenVerifier.from_settings(settings, issuer=issuer)

        self._replayer: Replayer | None = None

    @property
    def reader(self) -> StreamReader:
        if self.bus.js is None:
            raise RuntimeError("not connected to NATS yet")
        return StreamReader(self.bus.js, self.settings.stream)

    @property
    def replayer(self) -> Replayer:
        if self._replayer is None:
            self._replayer = Replayer(self.hub, self.reader, max_concurrent=self.settings.max_concurrent_replays)
        return self._replayer

    async def start(self) -> None:
        await self.verifier.start()
        await self.bus.start()

    async def stop(self) -> None:
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


WS_PATH = "/v1/ws"


class GatewayApp(FastAPI):
    """FastAPI for HTTP; the WebSocket endpoint is dispatched before the router and middleware stack.

    Every open WebSocket keeps its ASGI call on the stack for its whole life. Through FastAPI's router,
    exception middleware and AsyncExitStack that is ~10 KiB per idle connection; dispatched here, the
    session holds only what it uses (see docs/performance.md for the per-connection figures).
    """

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
) -> FastAPI:
    """Build the gateway app. In dev mode the development identity provider is mounted at /dev/idp."""
    settings = settings or Settings()
    if settings.dev_mode and dev_idp is None and not (settings.oidc_issuer or settings.jwks_url):
        raise ValueError("dev_mode needs the development identity provider: run `wsgateway dev`, not `serve`")
    install_redaction()
    gateway = Gateway(settings, metrics=metrics, issuer=dev_idp.issuer if dev_idp else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = GatewayApp(title="wsgateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway

    if dev_idp is not None:
        app.include_router(dev_idp.router(), prefix="/dev/idp", tags=["dev identity provider (insecure)"])

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """Ready to serve: NATS connected, consumer live, ACLs and JWKS loaded."""
        checks = gateway.readiness()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics_endpoint() -> Response:
        body, ctype = gateway.metrics.exposition()
        return Response(body, media_type=ctype)

    app.include_router(build_router(gateway))

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for `wsgateway serve` worker processes: settings from WSGATEWAY_* variables."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """The uvicorn settings the data path relies on (protocol class, limits, keepalive, shutdown)."""
    return {
        "ws": "gateway.transport:GatewayWSProtocol",
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": settings.heartbeat_s,
        "ws_ping_timeout": settings.heartbeat_s,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "lifespan": "on",
        "log_level": settings.log_level,
    }
