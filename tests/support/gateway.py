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
from tests.support.wait import HANG_S, eventually

STALLED_HEARTBEAT_S = 10 * HANG_S
"""`heartbeat_s` for a gateway whose test stalls a client (it stops reading until the gateway closes it as
too slow, 4429). The gateway reaps a peer that leaves its ping unanswered for heartbeat_s plus the ping
timeout (as long again): a stalled client reads no ping, so with the default 5 s a loaded machine, on
which overflowing the client's queue takes longer than 10 s, got 1011 (or a reset: 1006) instead of 4429."""


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

    async def metric_reaches(
        self, name: str, value: float, labels: dict[str, str] | None = None, *, timeout: float = HANG_S
    ) -> None:
        """Wait until the scraped `name` (see `metric`) equals `value`; a failure shows the last value."""
        seen: list[float] = []

        async def reached() -> bool:
            seen.append(await self.metric(name, labels))
            return seen[-1] == value

        await eventually(reached, what=f"{name}{labels or ''} == {value:g}", timeout=timeout, interval=0.05,
                         info=lambda: f"last scraped value: {seen[-1] if seen else 'none'}")


class RunningGateway(GatewayEndpoint):
    def __init__(self, settings: Settings, server: uvicorn.Server, gateway: Gateway) -> None:
        self.settings = settings
        self.server = server
        self.gateway = gateway
        self.port = settings.port

    async def dispatched(self, seq: int) -> None:
        """Wait until this gateway has processed the stream up to `seq` (its hub's cursor, `last_seq`).

        A published event reaches the gateway's consumer asynchronously. A client that resumes (`since`)
        before the gateway has it gets it as a live frame after the replay instead of in the replay: the
        `subscribed` seq, a replay's span, compaction of the replayed range and anything queued between
        the replay and the live frames (a presence snapshot) depend on which. Tests that assert those
        wait here after publishing."""
        await eventually(lambda: self.gateway.hub.last_seq >= seq, what=f"the gateway to have dispatched seq {seq}",
                         info=lambda: f"its last_seq: {self.gateway.hub.last_seq}")


async def wait_ready(url: str, timeout: float = HANG_S) -> None:
    """Until `url`/readyz answers 200 (a hang guard of `timeout` seconds, not a start-up time limit)."""
    last = ["no answer"]
    async with httpx.AsyncClient() as c:

        async def ready() -> bool:
            r = await c.get(f"{url}/readyz")
            last[0] = f"{r.status_code} {r.text}"
            return r.status_code == 200

        await eventually(ready, what=f"gateway at {url} to answer /readyz 200", timeout=timeout, interval=0.05,
                         ignore=(httpx.HTTPError,), info=lambda: f"last /readyz answer: {last[0]}")


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
    task = asyncio.create_task(server.serve(), name=f"uvicorn-{port}")
    await eventually(lambda: server.started, what=f"uvicorn to listen on port {port}", watch=[task])
    running = RunningGateway(settings, server, app.state.gateway)
    try:
        if ready:
            await wait_ready(running.http)
        yield running
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
