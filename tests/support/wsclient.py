"""A thin test client over the real WebSocket protocol (the `websockets` library).

Every timeout here is a hang guard (generous: a frame that is due arrives long before it), never a
speed assertion; "nothing arrives" is `nothing_before`, which waits for a marker, not for a timeout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.support.wait import HANG_S


async def connect(url: str, token: str | None = None, *, via: str = "header", **kw: Any) -> ClientConnection:
    headers: dict[str, str] = {}
    subprotocols: list[str] | None = kw.pop("subprotocols", None)
    if token is not None:
        if via == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif via == "subprotocol":
            subprotocols = ["wsgateway.v1", f"bearer.{token}"]
        elif via == "query":
            url = f"{url}{'&' if '?' in url else '?'}access_token={token}"
    return await websockets.connect(
        url, additional_headers=headers, subprotocols=subprotocols, max_size=None, open_timeout=10, **kw  # type: ignore[arg-type]
    )


async def connect_slow(url: str, token: str, rcvbuf: int = 4096) -> ClientConnection:
    """A client with a tiny socket receive buffer (so the server's queue, not the kernel, absorbs a backlog).

    It does not offer compression: the backlog is the frames' plain bytes (compressed, the tests'
    repetitive payloads would take many times more events to fill the kernel's buffers). Nor does it send
    keepalive pings: while a test keeps it from reading it could not read the pongs either, and after the
    library's ping interval and timeout (20 s + 20 s, which a loaded machine's test can outlast) it would
    drop the connection itself (1011, or 1006 as its own close code)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (u.hostname or "127.0.0.1", u.port or 80))
    return await connect(url, token, sock=sock, max_queue=1, compression=None, ping_interval=None)


async def slow_and_fast(url: str, token: str, scope: str) -> tuple[ClientConnection, ClientConnection]:
    """Two clients subscribed to `scope`: one whose reading a test will pause (no compression: its backlog
    fills the kernel's buffers as plain bytes; no keepalive pings, as `connect_slow`), and one that reads."""
    slow = await connect(url, token, max_queue=1, compression=None, ping_interval=None)
    fast = await connect(url, token)
    for ws in (slow, fast):
        await welcome(ws)
        await subscribe(ws, scope)
    return slow, fast


async def connect_stalled(url: str, token: str) -> ClientConnection:
    """A slow client (see `connect_slow`) subscribed through the URL's `scope`, that has now stopped reading:
    the server's backlog for it builds up in the gateway's queue."""
    ws = await connect_slow(url, token)
    await recv_type(ws, "welcome")
    await recv_type(ws, "subscribed")
    ws.transport.pause_reading()
    return ws


async def recv(ws: ClientConnection, timeout: float = HANG_S) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(raw)  # type: ignore[no-any-return]


async def recv_type(ws: ClientConnection, kind: str, timeout: float = HANG_S) -> dict[str, Any]:
    """Next frame, which must be of type `kind`."""
    frame = await recv(ws, timeout)
    assert frame["type"] == kind, f"expected {kind}, got {frame}"
    return frame


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    return await recv_type(ws, "welcome")


async def subscribe(ws: ClientConnection, scope: str, rid: str = "s1", **extra: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"op": "subscribe", "id": rid, "scope": scope, **extra}))
    return await recv(ws)


async def events(ws: ClientConnection, n: int, timeout: float = HANG_S) -> list[dict[str, Any]]:
    """The next n event frames (other frames are not expected in between)."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        frame = await recv(ws, max(0.01, deadline - loop.time()))
        assert frame["type"] == "event", f"expected an event, got {frame}"
        out.append(frame)
    return out


async def nothing_before(ws: ClientConnection, marker: int, timeout: float = HANG_S) -> dict[str, Any]:
    """Assert that nothing arrived before the marker event `marker`: the next frame must be that event.

    The marker is an event published AFTER whatever must not arrive, to a scope the client does see.
    The gateway handles events in stream order and writes each connection's frames in order, so a frame
    for anything earlier would come first: this proves "nothing else" without waiting out a quiet window."""
    frame = await recv(ws, timeout)
    assert frame.get("type") == "event" and frame.get("seq") == marker, (
        f"expected nothing before the marker event seq={marker}, got {frame}")
    return frame


async def closed(ws: ClientConnection, timeout: float = HANG_S) -> tuple[int, str]:
    """Wait for the server to close; returns (code, reason). Frames before the close are skipped."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "connection dropped without a close frame"
        return exc.rcvd.code, exc.rcvd.reason
