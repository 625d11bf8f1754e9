"""The seam between the hub and a client's byte stream: one small interface, two implementations.

A `Channel` is where one connection's frames go. The WebSocket implementation writes pre-encoded
frames straight to uvicorn's transport (`gateway.edge.transport.RawChannel`); the Server-Sent Events
implementation buffers bytes for a streaming HTTP response (`gateway.edge.sse.SseChannel`). The hub
treats both alike: it never asks which one it has.

The hub sets the three callbacks when the connection joins and clears them when it leaves; a channel
calls them from the event loop's thread, never re-entrantly from `write` or `close`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.core.queue import OutFrame


class WritableFlag(Protocol):
    """The channel's "has room" flag, read once per flush by the writer (its hottest loop)."""

    on: bool


class Channel(Protocol):
    kind: str  # "websocket" | "sse": for logs, spans and shutdown, never for fan-out decisions

    @property
    def frames_are_wire(self) -> bool:
        """True when each frame's `data` (its WebSocket form) is what this channel writes: the writer then
        joins the frames itself instead of calling `encode` (one call less per connection and write, the hot
        path). False for SSE and for a compressing WebSocket. Read once, when the connection joins the hub."""

    on_writable: Callable[[], None] | None  # the channel has room again after being full
    on_lost: Callable[[], None] | None  # the peer went away (the connection must leave the hub now)
    on_shutdown: Callable[[], None] | None  # the server is stopping: drain and close with 1001

    @property
    def writable(self) -> bool:
        """False while the channel's buffer is above its high-water mark (the peer reads slowly)."""

    def write(self, data: bytes) -> bool:
        """Hand encoded frames to the peer; False if the channel is no longer open."""

    def encode(self, frames: Sequence[OutFrame]) -> bytes:
        """The bytes of these frames on this channel's wire (WebSocket frames, or SSE events)."""

    def fast_path(self) -> tuple[Callable[[bytes], object], WritableFlag]:
        """`write` without the open check, and the writable flag: valid until `on_lost` fires or the
        channel is closed; the writer stops using them at either."""

    def close(self, code: int, reason: str = "") -> None:
        """End the stream with a close code (a WebSocket close frame, or a final SSE `close` event)."""


def websocket_encode(frames: Sequence[OutFrame]) -> bytes:
    """WebSocket wire bytes of queued frames (each is already one complete frame)."""
    return frames[0].data if len(frames) == 1 else b"".join([f.data for f in frames])


def sse_encode(frames: Sequence[OutFrame]) -> bytes:
    """Server-Sent Events wire bytes of queued frames (`id:` is the stream sequence)."""
    return b"".join([f.sse_bytes() for f in frames])


__all__ = ["Channel", "WritableFlag", "sse_encode", "websocket_encode"]
