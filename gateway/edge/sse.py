"""Server-Sent Events: the live stream over plain HTTP (`GET /v1/sse`), a `Channel` like the WebSocket's.

`id:` is the stream sequence, so a browser's EventSource resumes by itself with `Last-Event-ID`; the
same hub, queue, slow-client policy and replay serve it. Idle streams get a `: keepalive` comment
every WSGATEWAY_HEARTBEAT_S (keeps proxies from cutting them); the stream ends after a `close` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from gateway.core.channel import sse_encode
from gateway.core.queue import control
from gateway.edge.httpauth import authenticate, error_response
from gateway.edge.session import open_connection, parse_initial
from gateway.protocol import WILDCARD, FrameError

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.core.connection import Connection


class _Room:
    """The channel's writable flag (`on`), read by the writer."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


class SseChannel:
    """Bytes go to a buffer the response body drains; not writable while the buffer is above its
    high-water mark (the client reads slowly)."""

    HIGH_WATER = 256 * 1024

    kind = "sse"
    frames_are_wire = False
    encode = staticmethod(sse_encode)

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ready = asyncio.Event()
        self.done = False
        self.close_code: int | None = None
        self.room = _Room()
        self.on_writable: Callable[[], None] | None = None
        self.on_shutdown: Callable[[], None] | None = None
        self.on_lost: Callable[[], None] | None = None  # unused: the response body's end removes the stream

    @property
    def writable(self) -> bool:
        return self.room.on

    def write(self, data: bytes) -> bool:
        if self.done:
            return False
        self.buf += data
        if len(self.buf) >= self.HIGH_WATER:
            self.room.on = False
        self.ready.set()
        return True

    def fast_path(self) -> tuple[Callable[[bytes], object], _Room]:
        return self.write, self.room

    def close(self, code: int, reason: str = "") -> None:
        if self.done:
            return
        self.write(self.encode([control("close", code=code, reason=reason)]))
        self.close_code = code
        self.done = True
        self.ready.set()

    async def body(self, keepalive_s: float) -> AsyncIterator[bytes]:
        """The response body: buffered frames as they come, a comment line when idle, and the end of the
        response right after the `close` event."""
        while True:
            try:
                await asyncio.wait_for(self.ready.wait(), keepalive_s)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            self.ready.clear()
            if self.buf:
                was_full = not self.room.on
                chunk = bytes(self.buf)
                self.buf.clear()
                self.room.on = True
                yield chunk
                if was_full and self.on_writable is not None:
                    self.on_writable()
            if self.done and not self.buf:
                return


async def sse_stream(gw: Gateway, request: Request) -> Response:
    """The live stream as Server-Sent Events: `id:` is the stream sequence; resume with Last-Event-ID."""
    principal = await authenticate(gw, request)
    attempts = gw.metrics.connection_attempts  # like a WebSocket: every stream attempt has an outcome
    if isinstance(principal, Response):
        attempts.labels("unauthorized").inc()
        return principal
    since = request.headers.get("last-event-id") or request.query_params.get("since")
    try:
        q = request.query_params
        initial = parse_initial(q.getlist("scope") or [WILDCARD], since, q.get("presence"), q.get("listed"),
                                q.get("compact"))
    except FrameError as exc:
        attempts.labels("rejected").inc()
        return error_response(400, "bad_request", exc.message)
    if gw.hub.full:
        attempts.labels("rejected").inc()
        return error_response(503, "over_limit", "over connection limit: retry on another instance")
    channel = SseChannel()
    return stream_response(gw, channel, open_connection(gw, channel, principal, initial))


def stream_response(gw: Gateway, channel: SseChannel, conn: Connection) -> StreamingResponse:
    """The response whose body is the channel's stream; the connection leaves the hub when it ends."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in channel.body(gw.settings.heartbeat_s):
                yield chunk
        finally:
            gw.hub.remove(conn)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["SseChannel", "sse_stream", "stream_response"]
