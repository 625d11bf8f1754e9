"""A graceful shutdown in the middle of a resume loses nothing (issue 10's defect, through real processes).

A client resumes a large backlog on gateway A while live events keep arriving; A gets SIGTERM while the
replay is half way (the client reads slowly, so the replay waits for its socket). Live events newer than
the replay's position are held while it runs; the drain must not write them, or the client's cursor
(the highest seq it saw, as README says) jumps past the rest of the replay. The client then resumes on
gateway B from its cursor and must end with every event of the scope exactly once, in order. Once over
a WebSocket, once over Server-Sent Events with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import STALLED_HEARTBEAT_S, scrape_metric
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.procs import GatewayProcess, gateway_processes
from tests.support.wait import eventually

# every test under both of fan-out's loops, compiled and Python (tests/conftest.py, `fast_path`)
pytestmark = pytest.mark.usefixtures("fast_path")

ADMIN = {"admins": ["user:alice"]}
SCOPE = "conversation:c1"
# ~10 MB of events: far more than the socket buffers hold (the kernel autotunes an SSE response's send
# buffer up to 4 MB), so the replay must wait for the client
BACKLOG = 6000
PAYLOAD = {"text": "x" * 1500}
READ_BEFORE_TERM = 400  # events the client takes before it stops reading
TINY_RCVBUF = 4096
# An SSE client's receive buffer: fixed (no autotuning) but not tiny: a window of a few KiB makes loopback
# TCP crawl (delayed ACKs), and the rest of the drained stream would not arrive before the shutdown ends.
SSE_RCVBUF = 256 * 1024


class LivePublisher:
    """Publishes to SCOPE one event after another until stopped; `seqs` in stream order."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.seqs: list[int] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="live publisher")

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.seqs.append(await self.platform.publish("acme", SCOPE, data=PAYLOAD))

    async def stop(self) -> None:
        self._stop.set()
        await self.task


async def publish_backlog(platform: Platform) -> list[int]:
    seqs: list[int] = []
    for start in range(0, BACKLOG, 250):
        seqs += await asyncio.gather(*(platform.publish("acme", SCOPE, data=PAYLOAD)
                                       for _ in range(start, min(BACKLOG, start + 250))))
    return sorted(seqs)


async def held_live_events(gw: GatewayProcess, backlog: list[int], live: LivePublisher) -> None:
    """Until A has taken in live events published after the client stopped reading (they are held).

    A started before the backlog was published, so it has received the backlog and the live events."""
    wanted = len(live.seqs) + 20

    async def received() -> bool:
        return len(live.seqs) >= wanted and (
            await scrape_metric(gw.http, "wsgateway_events_received_total") >= len(backlog) + wanted)

    await eventually(received, what="gateway A to receive live events during the replay", watch=[live.task])


@contextlib.asynccontextmanager
async def two_gateways_and_a_backlog(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, list[int]]]:
    """Gateways A and B (a shutdown long enough for the drained stream to be read), alice an org admin,
    and the backlog published after both started (so A has received it all)."""
    async with gateway_processes(2, nats_server.url, idp.issuer, idp.audience, shutdown_timeout_s="20",
                                 heartbeat_s=str(STALLED_HEARTBEAT_S)) as (a, b):  # a paused client is not dead
        await platform.grant("acme.org", ADMIN)
        await platform.applied(idp, a, b)
        yield a, b, await publish_backlog(platform)


def terminate(gw: GatewayProcess) -> None:
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)


def check_prefix(got: list[int], expected: list[int], where: str) -> None:
    """`got` is exactly the first len(got) events of the scope: nothing skipped, doubled or reordered."""
    if got != expected[:len(got)]:
        i = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), None)
        if i is None:
            raise AssertionError(f"{where}: {len(got)} events, more than the {len(expected)} expected "
                                 f"(last: {got[len(expected) - 1:len(expected) + 3]})")
        raise AssertionError(f"{where}: event #{i} is seq {got[i]}, expected {expected[i]} "
                             f"(got ...{got[max(0, i - 3):i + 3]}, {len(got)} events)")


# --- WebSocket ------------------------------------------------------------------------------------


async def slow_ws(url: str, token: str) -> ClientConnection:
    """A client with a tiny receive buffer that the test can stop and start reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
    sock.setblocking(False)
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, sock=sock,
                                    max_queue=1, max_size=None, open_timeout=10, compression=None,
                                    ping_interval=None)  # paused, it could not read pongs (connect_slow)


async def ws_events(ws: ClientConnection, into: list[int], *, until: int | None = None) -> None:
    """Append event seqs until the socket closes (or `until` events are in)."""
    while until is None or len(into) < until:
        try:
            frame = json.loads(await ws.recv())
        except ConnectionClosed:
            return
        if frame["type"] == "event":
            into.append(frame["seq"])


@pytest.mark.timeout(180)
async def test_sigterm_during_a_websocket_replay_then_resume_elsewhere_loses_nothing(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    async with two_gateways_and_a_backlog(nats_server, idp, platform) as (a, b, backlog):
        ws = await slow_ws(f"{a.ws}?scope={SCOPE}&since=0", idp.mint("alice"))
        got_a: list[int] = []
        await ws_events(ws, got_a, until=READ_BEFORE_TERM)
        ws.transport.pause_reading()  # the replay now waits for the socket, mid-backlog
        live = LivePublisher(platform)
        try:
            await held_live_events(a, backlog, live)
            terminate(a)
            ws.transport.resume_reading()
            await ws_events(ws, got_a)
            assert ws.close_code == 1001, (ws.close_code, ws.close_reason)
            # the replay was half way: A handed out the backlog's first events, in order, and nothing newer
            check_prefix(got_a, backlog, "what A sent before closing")
            assert READ_BEFORE_TERM <= len(got_a) < len(backlog), len(got_a)
            cursor = got_a[-1]
            got_b: list[int] = []
            ws_b = await websockets.connect(f"{b.ws}?scope={SCOPE}&since={cursor}",
                                            additional_headers={"Authorization": f"Bearer {idp.mint('alice')}"},
                                            max_size=None)
            reader = asyncio.create_task(ws_events(ws_b, got_b), name="reader on B")
            await eventually(lambda: len(got_b) >= 100, what="events through B", watch=[reader, live.task])
            await live.stop()
            expected = backlog + live.seqs
            await eventually(lambda: got_b and got_b[-1] >= expected[-1], what="B to reach the last event",
                             watch=[reader])
            await ws_b.close()
            await reader
        finally:
            if not live.task.done():
                await live.stop()
        check_prefix(got_a, expected, "before the shutdown (A)")
        assert got_a + got_b == expected, f"{len(got_a)} + {len(got_b)} events, {len(expected)} published"


# --- Server-Sent Events ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def slow_sse(url: str, token: str, last_event_id: int) -> AsyncIterator[AsyncIterator[str]]:
    transport = httpx.AsyncHTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, SSE_RCVBUF)])
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30.0)) as client:
        headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last_event_id)}
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, response.status_code
            yield response.aiter_lines()


async def sse_events(lines: AsyncIterator[str], into: list[int], *, until: int | None = None) -> dict[str, Any]:
    """Append `id:` seqs of events until the stream ends (returns the `close` event) or `until` are in."""
    event = ""
    async for line in lines:
        if line.startswith("id: "):
            into.append(int(line[4:]))
            if until is not None and len(into) >= until:
                return {}
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "close":
            return json.loads(line[6:])  # type: ignore[no-any-return]
    return {}


@pytest.mark.timeout(180)
async def test_sigterm_during_an_sse_replay_then_resume_elsewhere_loses_nothing(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    async with two_gateways_and_a_backlog(nats_server, idp, platform) as (a, b, backlog):
        got_a: list[int] = []
        live: LivePublisher | None = None
        try:
            async with slow_sse(f"{a.http}/v1/sse?scope={SCOPE}", idp.mint("alice"), 0) as lines:
                await sse_events(lines, got_a, until=READ_BEFORE_TERM)
                # not reading now: the response stalls, the SSE buffer fills and the replay waits
                live = LivePublisher(platform)
                await held_live_events(a, backlog, live)
                terminate(a)
                close = await sse_events(lines, got_a)
            assert close.get("code") == 1001, close
            check_prefix(got_a, backlog, "what A sent before closing")
            assert READ_BEFORE_TERM <= len(got_a) < len(backlog), len(got_a)
            cursor = got_a[-1]
            got_b: list[int] = []

            async def read_b() -> None:
                async with slow_sse(f"{b.http}/v1/sse?scope={SCOPE}", idp.mint("alice"), cursor) as lines_b:
                    await sse_events(lines_b, got_b)

            reader = asyncio.create_task(read_b(), name="reader on B")
            await eventually(lambda: len(got_b) >= 100, what="events through B", watch=[reader, live.task])
            await live.stop()
            expected = backlog + live.seqs
            await eventually(lambda: got_b and got_b[-1] >= expected[-1], what="B to reach the last event",
                             watch=[reader])
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        finally:
            if live is not None and not live.task.done():
                await live.stop()
        check_prefix(got_a, expected, "before the shutdown (A)")
        assert got_a + got_b == expected, f"{len(got_a)} + {len(got_b)} events, {len(expected)} published"
