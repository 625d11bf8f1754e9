"""`wsgateway serve`: configuration from WSGATEWAY_* variables, several workers on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import wait_ready
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wait import HANG_S, eventually
from tests.support.wsclient import closed, connect, events, recv_type, subscribe, welcome

WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


def _env(nats: NatsProcess, idp: TestIdP, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
    env.update({
        "WSGATEWAY_NATS_URL": nats.url, "WSGATEWAY_OIDC_ISSUER": idp.issuer,
        "WSGATEWAY_AUDIENCE": idp.audience, "WSGATEWAY_PORT": str(port), "WSGATEWAY_HOST": "127.0.0.1",
        "WSGATEWAY_LOG_LEVEL": "warning",
    })
    return env


@pytest.mark.timeout(90)
async def test_two_workers_share_one_port_each_with_its_own_consumer(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    port = free_port()
    env = {**_env(nats_server, idp, port), "WSGATEWAY_MAX_CONNECTIONS": "1000", "WSGATEWAY_CONNECTIONS_TARGET": "700"}
    proc = subprocess.Popen([WSGATEWAY, "serve", "--workers", "2"], env=env)  # noqa: ASYNC220
    try:
        await wait_ready(f"http://127.0.0.1:{port}", timeout=40)
        # every worker runs its own ordered consumer on the stream (readiness answered for one of them)
        async def one_consumer_per_worker() -> bool:
            return (await platform.js.stream_info("EVENTS")).state.consumer_count == 2

        await eventually(one_consumer_per_worker, what="one consumer per worker on the stream", interval=0.1)
        await platform.grant("acme.org", {"admins": ["user:alice"]})
        clients = []
        for _ in range(12):  # the kernel spreads these over both workers
            ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", idp.mint("alice"))
            await welcome(ws)
            # the grant is a KV write each worker applies on its own, and GET /v1/scopes cannot choose the
            # worker it asks: a worker that has not applied it yet answers `forbidden`, and the pending
            # subscription starts (`subscribed`) once it has, before any event below is published
            ack = await subscribe(ws, "conversation:c1")
            if ack["type"] == "error":
                assert ack["code"] == "forbidden", ack
                await recv_type(ws, "subscribed")
            else:
                assert ack["type"] == "subscribed", ack
            clients.append(ws)
        seqs = [await platform.publish("acme", "conversation:c1") for _ in range(5)]
        for ws in clients:
            assert [f["seq"] for f in await events(ws, 5)] == seqs
        # /metrics sums the workers (whichever worker answers)
        async with httpx.AsyncClient() as c:
            for _ in range(4):
                text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
                values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                          if ln.startswith("wsgateway_connections")}
                assert values["wsgateway_connections"] == 12
                assert values["wsgateway_connections_limit"] == 2000  # the pod's total: 2 x 1000
                assert values["wsgateway_connections_target"] == 700  # per pod, not summed
        for ws in clients:
            await ws.close()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)


def test_serve_refuses_a_configuration_without_identity_provider(nats_server: NatsProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
    env["WSGATEWAY_NATS_URL"] = nats_server.url
    out = subprocess.run([WSGATEWAY, "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "WSGATEWAY_OIDC_ISSUER" in out.stderr


def test_serve_refuses_dev_mode(nats_server: NatsProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
    env.update({"WSGATEWAY_NATS_URL": nats_server.url, "WSGATEWAY_DEV_MODE": "true"})
    out = subprocess.run([WSGATEWAY, "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "wsgateway dev" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(60)
async def test_shutdown_ends_sse_streams_with_a_close_event_at_once(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """SIGTERM: an open SSE stream gets what is queued, then `event: close` with code 1001, and the
    process exits without waiting out the graceful-shutdown timeout (it used to wait all of it): that
    timeout is far longer than the hang guard on the stream's end, so waiting it out fails the test."""
    port = free_port()
    env = {**_env(nats_server, idp, port), "WSGATEWAY_SHUTDOWN_TIMEOUT_S": "600"}
    proc = subprocess.Popen([WSGATEWAY, "serve", "--workers", "1"], env=env)  # noqa: ASYNC220
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, timeout=40)
        await platform.grant("acme.org", {"admins": ["user:alice"]})
        await platform.applied(idp, base)
        seq = await platform.publish("acme", "conversation:c1")
        body = b""
        async with httpx.AsyncClient(timeout=HANG_S) as c:
            params = {"scope": "conversation:c1", "since": str(seq - 1)}
            headers = {"Authorization": f"Bearer {idp.mint('alice')}"}
            async with c.stream("GET", f"{base}/v1/sse", params=params, headers=headers) as r:
                assert r.status_code == 200
                chunks = r.aiter_bytes()
                while f"id: {seq}".encode() not in body:
                    body += await chunks.__anext__()
                proc.terminate()
                try:
                    async with asyncio.timeout(HANG_S):  # a hang guard, 20 x shorter than the shutdown timeout
                        async for chunk in chunks:  # ends when the server ends the response
                            body += chunk
                except TimeoutError:
                    raise AssertionError(f"the SSE stream was not ended by the shutdown; got {body[-300:]!r}") from None
        assert b"event: close" in body and b'"code":1001' in body.replace(b" ", b"")
        # uvicorn re-raises the signal once it has shut down gracefully: exit by SIGTERM (or 0)
        assert await asyncio.to_thread(proc.wait, HANG_S) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, 20)


@pytest.mark.timeout(90)
async def test_the_connection_limit_fits_the_open_file_limit(nats_server: NatsProcess, idp: TestIdP) -> None:
    """With `ulimit -n` 100 and the default WSGATEWAY_MAX_CONNECTIONS (50,000), descriptors would run out
    at about 84 connections and the next client would get a TCP reset. The gateway lowers its limit to
    100 - 64 and says so at start-up: the 37th client gets the documented close 4429."""
    from gateway.config import FD_RESERVE
    from tests.support.procs import GatewayProcess

    nofile = 100
    limit = nofile - FD_RESERVE
    g = GatewayProcess(nats_server.url, idp.issuer, idp.audience, nofile=nofile).start()
    clients = []
    try:
        await g.wait_ready()
        assert "WSGATEWAY_MAX_CONNECTIONS=50000 is more than the open-file limit (100" in g.log()
        assert await g.metric("wsgateway_connections_limit") == limit
        for _ in range(limit):
            ws = await connect(g.ws, idp.mint("alice"))
            await welcome(ws)
            clients.append(ws)
        extra = await connect(g.ws, idp.mint("alice"))
        code, reason = await closed(extra)
        assert code == 4429 and "connection limit" in reason
        await clients.pop().close()
        await g.metric_reaches("wsgateway_connections", limit - 1)
        again = await connect(g.ws, idp.mint("alice"))  # room for one again
        await welcome(again)
        clients.append(again)
    finally:
        for ws in clients:
            await ws.close()
        await asyncio.to_thread(g.cleanup)
