"""Frames and the per-connection bounded queue: what is queued for a client, its bounds, and coalescing.

An event is encoded into one `OutFrame` once and the same object is queued for every recipient. A
connection's `SendQueue` holds frames until the writer hands them to the channel; when it grows past
its bounds, `shrink` coalesces what may be merged without losing meaning, and tells the hub whether the
connection may stay (docs/protocol.md, "Slow clients"). Pure data and algorithms: no I/O, no asyncio,
tested in-process (tests/test_queue.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from gateway.events import Envelope, coalesce_key, delivery_class
from gateway.protocol import event_payload, kept_json, server_payload, ws_text_frame


class EventMeta:
    """What coalescing needs to know about a queued event (see `coalesce`)."""

    __slots__ = ("cls", "key", "raw")

    def __init__(self, cls: str, key: tuple[str, ...] | None, raw: bytes) -> None:
        self.cls = cls  # delivery class: lifecycle | delta | snapshot | state_delta | other
        self.key = key  # delta: (scope, type, stream id); snapshot/state_delta: (scope, run_id)
        self.raw = raw  # the envelope as published


class OutFrame:
    """One encoded server frame, shared by every connection it goes to."""

    __slots__ = ("count", "ctl", "data", "deflated", "latency", "meta", "payload", "sent", "seq", "sse", "t")

    def __init__(
        self, payload: bytes, seq: int = 0, latency: Any = None, t: float = 0.0,
        meta: EventMeta | None = None, ctl: str | None = None, count: int = 1,
    ) -> None:
        self.payload = payload  # the frame's JSON
        self.data = ws_text_frame(payload)  # ... as one complete WebSocket frame
        self.sse: bytes | None = None  # ... as a Server-Sent Event, made on first use
        self.deflated: bytes | None = None  # ... as a permessage-deflate frame, made once (edge/deflate.py)
        self.seq = seq  # stream sequence, 0 for control frames
        self.latency = latency  # histogram child for this event's kind (prometheus_client internals: Any)
        self.t = t  # envelope time (epoch seconds)
        self.sent = 0  # deliveries written in the current flush, for the latency histogram
        self.meta = meta
        self.ctl = ctl  # control frame type, None for events
        self.count = count  # published events this frame stands for (>1 only after coalescing)

    def sse_bytes(self) -> bytes:
        if self.sse is None:
            head = b"id: %d\n" % self.seq if self.seq else b"event: %s\n" % (self.ctl or "message").encode()
            self.sse = head + b"data: " + self.payload + b"\n\n"
        return self.sse


def control(kind: str, **fields: Any) -> OutFrame:
    """A control frame (welcome, subscribed, error, ...)."""
    return OutFrame(server_payload(kind, **fields), ctl=kind)


def event_meta(env: Envelope, raw: bytes) -> EventMeta:
    """What coalescing needs to know about an event."""
    cls = delivery_class(env.type)
    key: tuple[str, ...] | None = None
    if cls == "delta":
        ck = coalesce_key(env)
        key = (env.scope, *ck) if ck else None
    elif cls in ("snapshot", "state_delta") and env.run_id:
        key = (env.scope, env.run_id)
    return EventMeta(cls, key, raw)


def event_frame(seq: int, env: Envelope, raw: bytes, latency: Any = None) -> OutFrame:
    """A live event frame, with what coalescing needs to know about it."""
    return OutFrame(event_payload(seq, raw), seq, latency, env.timestamp, event_meta(env, raw))


def replayed_frame(seq: int, raw: bytes) -> OutFrame:
    """An event frame read back from the stream (never coalesced: a resume is complete)."""
    return OutFrame(event_payload(seq, raw), seq)


class SendQueue:
    """Frames waiting for one connection's channel, and their size in bytes (WebSocket framing)."""

    __slots__ = ("frames", "nbytes")

    def __init__(self, frames: list[OutFrame] | None = None) -> None:
        self.frames: list[OutFrame] = frames if frames is not None else []
        self.nbytes = sum(len(f.data) for f in self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    def push(self, frame: OutFrame) -> None:
        self.frames.append(frame)
        self.nbytes += len(frame.data)

    def take(self) -> list[OutFrame]:
        """Everything queued, oldest first; the queue is empty afterwards."""
        frames, self.frames, self.nbytes = self.frames, [], 0
        return frames

    def keep(self, predicate: Any) -> None:
        """Keep only the frames for which `predicate(frame)` is true."""
        self.frames = [f for f in self.frames if predicate(f)]
        self.nbytes = sum(len(f.data) for f in self.frames)


class Bounds(NamedTuple):
    """A connection's queue bounds (WSGATEWAY_QUEUE_MAX_MESSAGES / _BYTES)."""

    max_messages: int
    max_bytes: int

    def exceeded(self, q: SendQueue) -> bool:
        return len(q.frames) > self.max_messages or q.nbytes > self.max_bytes

    def comfortable(self, q: SendQueue) -> bool:
        """Hysteresis after coalescing: only a queue well below its bounds (3/4) keeps its connection."""
        return len(q.frames) <= self.max_messages * 3 // 4 and q.nbytes <= self.max_bytes * 3 // 4


class Shrunk(NamedTuple):
    removed: int  # frames merged away
    keep: bool  # False: still too large, the connection must go (4429)


def shrink(q: SendQueue, bounds: Bounds) -> Shrunk:
    """Coalesce an over-full queue in place; say whether its connection may stay."""
    before = len(q.frames)
    merged = coalesce(q.frames)
    removed = before - len(merged)
    if removed:
        q.frames = merged
        q.nbytes = sum(len(f.data) for f in merged)
    return Shrunk(removed, bounds.comfortable(q))


def _merge_deltas(run: list[OutFrame]) -> OutFrame:
    """One delta frame standing for a run of deltas of one stream: the newest envelope, with the text of
    all of them in order (each envelope parsed once: merging is linear in the run's size)."""
    newer = run[-1]
    b = newer.meta
    assert b is not None
    env_b = orjson.loads(b.raw)
    parts = []
    for f in run[:-1]:
        assert f.meta is not None
        parts.append(orjson.loads(f.meta.raw)["data"].get("delta", ""))
    parts.append(env_b["data"].get("delta", ""))
    env_b["data"]["delta"] = "".join(parts)
    raw = kept_json(env_b)  # queued until written
    count = sum(f.count for f in run)
    return OutFrame(event_payload(newer.seq, raw, count), newer.seq, newer.latency, run[0].t,
                    EventMeta("delta", b.key, raw), count=count)


def coalesce(frames: list[OutFrame]) -> list[OutFrame]:
    """Shrink a queue without losing meaning (docs/protocol.md, "Slow clients").

    - consecutive deltas of the same message / reasoning / tool-call arguments merge into one delta
      (carrying the newest `seq` and a `coalesced` count); a lifecycle or control frame between them
      is a barrier, so nothing moves across it;
    - a state snapshot makes earlier snapshots and state deltas of the same run obsolete: they go;
    - lifecycle events and everything else stay, in order.
    """
    out: list[OutFrame | None] = []
    runs: dict[int, list[OutFrame]] = {}  # position of a merged delta -> the deltas it stands for
    last_delta: dict[tuple[str, ...], int] = {}
    last_snapshot: dict[tuple[str, ...], int] = {}
    for f in frames:
        m = f.meta
        if m is None or m.cls == "lifecycle":
            last_delta.clear()
            out.append(f)
        elif m.cls == "delta" and m.key is not None:
            i = last_delta.get(m.key)
            if i is not None:
                prev = out[i]
                assert prev is not None
                out[i] = None
                run = runs.pop(i, None) or [prev]
                run.append(f)
                runs[len(out)] = run
            last_delta[m.key] = len(out)
            out.append(f)
        else:
            if m.cls == "snapshot" and m.key is not None:
                last_snapshot[m.key] = len(out)
            out.append(f)
    for i, run in runs.items():
        out[i] = _merge_deltas(run)
    if last_snapshot:
        for i, g in enumerate(out):
            if g is None or g.meta is None or g.meta.key is None:
                continue
            if g.meta.cls in ("snapshot", "state_delta") and i < last_snapshot.get(g.meta.key, -1):
                out[i] = None
    return [f for f in out if f is not None]


__all__ = [
    "Bounds", "EventMeta", "OutFrame", "SendQueue", "Shrunk", "coalesce", "control", "event_frame", "event_meta",
    "replayed_frame", "shrink",
]
