"""An idle SSE stream gets a `: keepalive` comment every WSGATEWAY_HEARTBEAT_S (docs/protocol.md, Server-Sent
Events), so proxies do not cut it, and stays a working stream: the next event still arrives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import HANG_S


async def _until(lines: AsyncIterator[str], wanted: str) -> list[str]:
    """Lines up to and including the first that starts with `wanted`."""
    seen = []
    async for line in lines:
        seen.append(line)
        if line.startswith(wanted):
            return seen
    raise AssertionError(f"the stream ended before {wanted!r}: {seen}")


async def test_idle_sse_stream_gets_keepalive_comments_and_keeps_streaming(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, heartbeat_s=0.2) as g, \
            httpx.AsyncClient(base_url=g.http, timeout=HANG_S) as c, \
            c.stream("GET", "/v1/sse", params={"scope": "process:quiet", "access_token": idp.mint("alice")}) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        head = await asyncio.wait_for(_until(lines, "event: subscribed"), HANG_S)
        assert head[0] == "event: welcome"
        idle = []
        for _ in range(2):  # nothing is published: only comments come, one per heartbeat
            idle += await asyncio.wait_for(_until(lines, ":"), HANG_S)
        assert idle[0].startswith("data: ") and set(idle[1:]) == {"", ": keepalive"}, idle  # subscribed's data
        assert idle.count(": keepalive") == 2
        seq = await platform.publish("acme", "process:quiet")
        got = await asyncio.wait_for(_until(lines, "id:"), HANG_S)
        assert got[-1] == f"id: {seq}" and all(x in ("", ": keepalive") or x.startswith("data:") for x in got[:-1]), got
