"""Run a real gateway (uvicorn + our WebSocket protocol) on a free loopback port inside the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway, create_app, uvicorn_options
from gateway.config import Settings
from tests.support.ports import free_port


async def scrape_metric(http: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` scraped from `http`/metrics whose labels include `labels` (0 if none)."""
    async with httpx.AsyncClient(timeout=5) as c:
        text = (await c.get(f"{http}/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += float(s.value)
    return total


class GatewayEndpoint:
    """Addresses of a gateway on a loopback port (in-process or a child process)."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def metrics_text(self) -> str:
        async with httpx.AsyncClient() as c:
            return (await c.get(f"{self.http}/metrics")).text

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return await scrape_metric(self.http, name, labels)


class RunningGateway(GatewayEndpoint):
    def __init__(self, settings: Settings, server: uvicorn.Server, gateway: Gateway) -> None:
        self.settings = settings
        self.server = server
        self.gateway = gateway
        self.port = settings.port


async def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = await c.get(f"{url}/readyz")
                if r.status_code == 200:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"gateway at {url} not ready: {r.text if 'r' in dir() else 'no answer'}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def run_gateway(
    nats_url: str, issuer: str | None = None, *, ready: bool = True, **overrides: Any
) -> AsyncIterator[RunningGateway]:
    """Start a gateway against `nats_url` with tokens from `issuer`; stop it (gracefully) afterwards.

    `overrides` are Settings fields, except `tracer_provider`, which goes to `create_app`."""
    port = overrides.pop("port", None) or free_port()
    tracer_provider = overrides.pop("tracer_provider", None)
    values: dict[str, Any] = {
        "nats_url": nats_url, "host": "127.0.0.1", "port": port, "oidc_issuer": issuer,
        "heartbeat_s": 5, "shutdown_timeout_s": 3, "log_level": "warning", "jwt_leeway_s": 1,
    }
    values.update(overrides)
    settings = Settings(**values)
    app = create_app(settings, tracer_provider=tracer_provider)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(settings))  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    running = RunningGateway(settings, server, app.state.gateway)
    try:
        if ready:
            await wait_ready(running.http)
        yield running
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
