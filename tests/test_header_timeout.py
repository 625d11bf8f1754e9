"""Slow or half-open requests: a connection that does not complete its request headers within
WSGATEWAY_HEADER_TIMEOUT_S is closed; nothing whose headers are complete is affected.

Raw sockets send requests that never finish (nothing at all, half a request line, an upgrade request
without its final blank line, headers dribbled); the gateway must close them (the read returns b'' or
the connection is reset), while real clients keep connecting and receiving events. The waits are
`eventually` hang guards, never speed assertions: "closed in time" is tested by the small deadline the
gateway runs with here, "an idle connection outlives the deadline" with a marker (a half-open socket
opened after it, which the deadline has closed by the time the idle connection is checked).

The first half runs uvicorn with both of its HTTP implementations (httptools, which the gateway uses,
and h11, uvicorn's fallback) and a small ASGI app; the second the real gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
import websockets

from gateway.app import uvicorn_options
from gateway.config import Settings
from gateway.edge.http_protocol import HeaderDeadline, Implementation
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.rawws import TEXT, RawConnection, frame, upgrade_request
from tests.support.wait import HANG_S, eventually
from tests.support.wsclient import connect, events, subscribe, welcome

ADMIN = {"admins": ["user:alice"]}
IMPLEMENTATIONS: list[Implementation] = ["httptools", "h11"]

# requests that never complete their headers
UNFINISHED: list[bytes] = [
    b"",  # connected, never sent a byte
    b"GE",
    b"GET /v1/ws HTTP/1.1\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    upgrade_request()[:-2],  # a whole upgrade request but its final blank line
    upgrade_request()[:40],
]


# --- uvicorn alone, both HTTP implementations -----------------------------------------------------

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class App:
    """GET /hello answers at once; GET /stream sends one chunk, then the rest when `release` is set;
    a WebSocket echoes."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (msg := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": msg.get("text") or ""})
        elif scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first;", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"last"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
            await send({"type": "http.response.body", "body": b"hello"})


@contextlib.asynccontextmanager
async def serve(deadline: HeaderDeadline, app: App | None = None) -> AsyncIterator[int]:
    port = free_port()
    # keep-alive far beyond any wait here: only the header deadline may close a connection
    config = uvicorn.Config(app or App(), host="127.0.0.1", port=port, http=deadline,  # type: ignore[arg-type]
                            ws="gateway.edge.transport:GatewayWSProtocol", log_level="warning",
                            timeout_keep_alive=3600)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, what="uvicorn to listen", watch=[task])
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, HANG_S)


async def _unfinished(port: int, data: bytes) -> RawConnection:
    conn = await RawConnection.open(port)
    if data:
        await conn.send(data)
    return conn


async def _all_closed(
    conns: list[RawConnection], what: str, *, dribbler: RawConnection | None = None
) -> list[bytes]:
    """Wait (hang guard) until the server has closed every connection; what each still received.

    A `dribbler` (one of `conns`) sends one more byte of its request at every poll, as long as it is open."""
    readers = [asyncio.create_task(c.until_closed()) for c in conns]
    dribbling = readers[conns.index(dribbler)] if dribbler is not None else None

    def all_done() -> bool:
        if dribbler is not None and dribbling is not None and not dribbling.done():
            dribbler.writer.write(b"X")
        return all(r.done() for r in readers)

    try:
        await eventually(all_done, what=what,
                         info=lambda: f"{sum(not r.done() for r in readers)} of {len(readers)} still open")
        return [r.result() for r in readers]
    finally:
        for r in readers:
            r.cancel()


async def _get(conn: RawConnection, path: str, *, pieces: int = 1) -> bytes:
    """A complete GET sent in `pieces` writes; the response head and body (content-length 5)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    step = -(-len(request) // pieces)
    for i in range(0, len(request), step):
        await conn.send(request[i:i + step])
    head = await conn.response_head()
    return head + await asyncio.wait_for(conn.reader.readexactly(5), HANG_S)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_unfinished_requests_are_closed_complete_ones_served(impl: Implementation) -> None:
    deadline = HeaderDeadline(1, 1000, impl)
    async with serve(deadline) as port:
        stalled = [await _unfinished(port, data) for data in UNFINISHED for _ in range(5)]
        dribbler = await _unfinished(port, b"GET /hello HTTP/1.1\r\n")
        ok = await RawConnection.open(port)
        answer = await _get(ok, "/hello", pieces=3)  # a request in several writes, complete in time
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello")
        # the dribbler sends a byte at a time: the deadline runs from the connection, not from the last byte
        received = await _all_closed([*stalled, dribbler], "every unfinished request to be closed",
                                     dribbler=dribbler)
        assert received == [b""] * len(received), "the server answered an unfinished request"
        assert deadline.waiting == 0 and deadline.expired_total == len(received)
        assert (await _get(ok, "/hello")).endswith(b"hello")  # the served connection was never timed
        ok.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_a_later_request_on_a_keep_alive_connection_has_its_own_deadline(impl: Implementation) -> None:
    async with serve(HeaderDeadline(1, 1000, impl)) as port:
        conn = await RawConnection.open(port)
        assert (await _get(conn, "/hello")).endswith(b"hello")
        await conn.send(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the next request, never finished
        assert await _all_closed([conn], "the unfinished second request to be closed") == [b""]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_a_pipelined_unfinished_request_is_closed_after_the_response(impl: Implementation) -> None:
    async with serve(HeaderDeadline(1, 1000, impl)) as port:
        conn = await RawConnection.open(port)
        await conn.send(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /hello HTTP/1.1\r\n")
        received = (await _all_closed([conn], "the pipelined unfinished request to be closed"))[0]
        assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"hello")  # the first one, answered


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_idle_websockets_and_long_responses_outlive_the_deadline(impl: Implementation) -> None:
    app = App()
    async with serve(HeaderDeadline(1, 1000, impl), app) as port:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/", ping_interval=None)
        stream = await RawConnection.open(port)
        await stream.send(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await stream.response_head()).startswith(b"HTTP/1.1 200 ")
        # marker: opened after both completed their headers, closed by the deadline; by then both have
        # been idle for longer than it
        marker = await _unfinished(port, b"GET / HTTP/1.1\r\n")
        await _all_closed([marker], "the marker to be closed by the deadline")
        await ws.send("still open")
        assert await asyncio.wait_for(ws.recv(), HANG_S) == "still open"
        await ws.close()
        app.release.set()
        rest = await asyncio.wait_for(stream.reader.readuntil(b"last"), HANG_S)
        assert b"first;" in rest
        stream.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_beyond_max_pending_the_longest_waiting_is_closed(impl: Implementation) -> None:
    deadline = HeaderDeadline(300, 5, impl)  # a deadline that never fires here: only the bound acts
    async with serve(deadline) as port:
        conns: list[RawConnection] = []
        for i in range(8):
            conns.append(await _unfinished(port, b"GET / HTTP/1.1\r\n"))
            await eventually(lambda: deadline.waiting + deadline.expired_total == len(conns),
                             what=f"connection {i} to be accepted",
                             info=lambda: f"waiting {deadline.waiting}, expired {deadline.expired_total}")
        # 8 arrived, 5 may wait: the 3 that waited longest were closed, in arrival order
        assert await _all_closed(conns[:3], "the 3 oldest to be closed") == [b""] * 3
        assert deadline.expired_total == 3
        ok = await RawConnection.open(port)  # a real client still gets in (closing the next oldest)
        assert (await _get(ok, "/hello")).endswith(b"hello")
        assert await _all_closed(conns[3:4], "the next oldest to make room") == [b""]
        assert deadline.waiting == 4 and deadline.expired_total == 4
        for c in [*conns, ok]:
            c.close()
        await eventually(lambda: deadline.waiting == 0, what="closed connections to stop waiting")


def test_the_factory_pickles_to_its_settings() -> None:
    """`wsgateway serve --workers N` pickles uvicorn's config into each worker; each counts its own."""
    options = uvicorn_options(Settings(jwks_url="http://idp.invalid/jwks", header_timeout_s=3, max_connections=7))
    original = options["http"]
    assert isinstance(original, HeaderDeadline)
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.timeout_s, copy.max_pending, copy.implementation) == (3, 7, "httptools")
    assert copy is not original and copy.waiting == 0


def test_the_setting_is_bounded() -> None:
    for bad in (0, -1, 301):
        with pytest.raises(ValueError):
            Settings(jwks_url="http://idp.invalid/jwks", header_timeout_s=bad)
    assert Settings(jwks_url="http://idp.invalid/jwks").header_timeout_s == 10


# --- the real gateway ---------------------------------------------------------------------------


@pytest.fixture
async def gw1(nats_server: Any, idp: TestIdP) -> AsyncIterator[RunningGateway]:
    """A gateway with a 1 s header deadline."""
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, header_timeout_s=1) as g:
        yield g


def _deadline(gw: RunningGateway) -> HeaderDeadline:
    factory = gw.server.config.http
    assert isinstance(factory, HeaderDeadline), "the gateway runs without its header deadline"
    return factory


async def test_200_half_open_upgrade_requests_are_closed_while_clients_connect_and_receive(
    gw1: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw1)
    deadline = _deadline(gw1)
    partial = upgrade_request(token=idp.mint("alice"))[:-2]  # all but the blank line that ends the headers
    stalled = await asyncio.gather(*(_unfinished(gw1.port, partial) for _ in range(200)))
    await eventually(lambda: deadline.waiting + deadline.expired_total >= 200, what="the 200 to be accepted",
                     info=lambda: f"waiting {deadline.waiting}, expired {deadline.expired_total}")

    # meanwhile a real client connects, subscribes and receives events
    ws = await connect(gw1.ws, idp.mint("alice"))
    await welcome(ws)
    await subscribe(ws, "conversation:c1")
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(ws, 1))[0]["seq"] == seq

    received = await _all_closed(list(stalled), "the 200 half-open upgrade requests to be closed")
    assert received == [b""] * 200, "an unfinished upgrade request got an answer"
    assert deadline.waiting == 0
    assert len(gw1.gateway.hub.connections) == 1  # none of them ever became a WebSocket

    # the client, idle since, is still served after the deadline passed for all of them
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(ws, 1))[0]["seq"] == seq
    await ws.close()


async def _sse_event_ids(stream: RawConnection) -> AsyncIterator[int]:
    """The `id:` of each event of a raw SSE response (comments such as `: keepalive` skipped)."""
    while True:
        line = await asyncio.wait_for(stream.reader.readline(), HANG_S)
        if not line:
            return
        if line.startswith(b"id: "):
            yield int(line[4:])


async def test_idle_websocket_and_sse_stream_outlive_the_deadline(
    gw1: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw1)
    token = idp.mint("alice")
    ws = await connect(gw1.ws, token)
    await welcome(ws)
    await subscribe(ws, "conversation:c1")
    sse = await RawConnection.open(gw1.port)
    await sse.send(f"GET /v1/sse?scope=conversation:c1&access_token={token} HTTP/1.1\r\n"
                   "Host: 127.0.0.1\r\n\r\n".encode())
    head = await sse.response_head()
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, head

    marker = await _unfinished(gw1.port, b"GET /healthz HTTP/1.1\r\n")
    await _all_closed([marker], "the marker to be closed by the deadline")

    seq = await platform.publish("acme", "conversation:c1", data={"after": "deadline"})
    assert (await events(ws, 1))[0]["seq"] == seq
    ids = _sse_event_ids(sse)
    assert await anext(ids) == seq
    await ws.close()
    sse.close()


async def test_a_slow_but_complete_upgrade_request_is_served(gw1: RunningGateway, idp: TestIdP) -> None:
    """Headers in several writes, complete before the deadline: the WebSocket opens and stays open."""
    conn = await RawConnection.open(gw1.port)
    request = upgrade_request(token=idp.mint("alice"))
    for i in range(0, len(request), 64):
        await conn.send(request[i:i + 64])
    assert (await conn.response_head()).startswith(b"HTTP/1.1 101 ")
    _, _, payload = await conn.read_frame()
    assert json.loads(payload)["type"] == "welcome"
    marker = await _unfinished(gw1.port, b"")
    await _all_closed([marker], "the marker to be closed by the deadline")
    await conn.send(frame(TEXT, json.dumps({"op": "ping", "id": "late"}).encode()))
    _, _, payload = await conn.read_frame()
    assert json.loads(payload) == {"type": "pong", "id": "late"}
    conn.close()
