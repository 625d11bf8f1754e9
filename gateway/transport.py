"""The seam between uvicorn and the fan-out path: a WebSocket protocol class with a raw-write extension.

uvicorn lets an application choose its WebSocket protocol class (`ws=`). Ours is uvicorn's own
wsproto implementation plus one ASGI scope extension, `wsgateway.raw`: a `RawChannel` through which
the gateway writes pre-encoded WebSocket frames straight to the connection's transport. The
handshake, client frames, pings, size limits and the close handshake all stay uvicorn's; only the
hot path (one `transport.write` of many frames, no await per client) bypasses the ASGI send queue.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import wsproto.events
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

EXTENSION = "wsgateway.raw"


class RawChannel:
    """Direct, synchronous access to one WebSocket connection's byte stream."""

    __slots__ = ("_proto", "on_shutdown", "on_writable")

    def __init__(self, proto: GatewayWSProtocol) -> None:
        self._proto = proto
        self.on_writable: Callable[[], None] | None = None
        self.on_shutdown: Callable[[], None] | None = None

    @property
    def open(self) -> bool:
        p = self._proto
        return not p.close_sent and not p.disconnected and not p.transport.is_closing()

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is above its high-water mark (the peer reads slowly)."""
        return self._proto.writable.is_set()

    def write(self, data: bytes) -> bool:
        """Write complete WebSocket frames; False if the connection is no longer open."""
        if not self.open:
            return False
        self._proto.transport.write(data)
        return True

    def limit_kernel_buffer(self, size: int) -> None:
        """Bound the socket's kernel send buffer (SO_SNDBUF); 0 leaves the OS default."""
        sock = self._proto.transport.get_extra_info("socket")
        if size and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def buffered(self) -> int:
        return int(self._proto.transport.get_write_buffer_size())

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake now, even when the transport is paused (a slow client)."""
        self._proto.close_now(code, reason)


class GatewayWSProtocol(WSProtocol):
    """uvicorn's wsproto protocol, exposing a RawChannel in the scope's extensions."""

    channel: RawChannel | None = None

    def handle_connect(self, event: wsproto.events.Request) -> None:
        super().handle_connect(event)
        self.channel = RawChannel(self)
        self.scope["extensions"][EXTENSION] = self.channel  # type: ignore[index]

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.channel is not None and self.channel.on_writable is not None:
            self.channel.on_writable()

    def shutdown(self) -> None:
        """Server shutdown: let the gateway drain queued frames and close with 1001, else uvicorn's way."""
        ch = self.channel
        if ch is not None and ch.on_shutdown is not None and self.handshake_complete and not self.close_sent:
            ch.on_shutdown()
            return
        super().shutdown()

    def close_now(self, code: int, reason: str) -> None:
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.stop_keepalive()
        self.close_sent = True
        disconnect: Any = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self.queue.put_nowait(disconnect)
        self.transport.write(self.conn.send(wsproto.events.CloseConnection(code=code, reason=reason)))
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
