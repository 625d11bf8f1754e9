"""Write scheduling: once per loop turn (or per `flush_interval_ms`), every connection with queued frames
gets them in ONE channel write, and delivery latency is recorded once per event, not per recipient.

A LIVE connection writes its queue; a REPLAYING one writes only the replay's frames (its live frames
are held until the replay reaches them). A channel without room keeps its frames queued; the channel's
`on_writable` brings the connection back (`Hub` wires it to `resume`), bounded by the queue limits.

The per-delivery loops (fan-out's queueing, the LIVE connections' writes) are `gateway.core.fastpath`'s:
compiled, or the same in Python (`fast=False`, WSGATEWAY_FAST_PATH=false).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.core import fastpath
from gateway.core.connection import Connection, ConnState
from gateway.core.queue import OutFrame
from gateway.metrics import Metrics

_LIVE = ConnState.LIVE
_REPLAYING = ConnState.REPLAYING


class Writer:
    def __init__(self, metrics: Metrics, flush_interval_ms: float, *, fast: bool = True) -> None:
        self.metrics = metrics
        self.loops = fastpath.select(fast)
        self.fan_out, self._flush_live = self.loops.fan_out, self.loops.flush_live
        self.fast = self.loops is not fastpath.PYTHON  # the compiled loops are in use
        self._delay = flush_interval_ms / 1000.0
        self._dirty: list[Connection] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, conn: Connection) -> None:
        """Write this connection's frames at the next flush."""
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)
            self.schedule()

    def schedule(self) -> None:
        if self._scheduled:
            return
        self._scheduled = True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._delay:
            loop.call_later(self._delay, self.flush)
        else:
            loop.call_soon(self.flush)

    @property
    def dirty(self) -> list[Connection]:
        """The list fan-out appends to directly (with `conn.dirty` set), followed by `schedule()`."""
        return self._dirty

    def flush(self) -> None:
        """Write every dirty connection's frames in one write each; record latency."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        touched: list[OutFrame] = []
        replayed = 0
        wake: list[Callable[[], None]] = []
        # the hot path: every LIVE connection is its own queue, written in one write; the rest come back
        for c in self._flush_live(dirty, _LIVE, touched):
            q = c.replay_queue
            if c.state is not _REPLAYING or q is None or not q.frames or not c.flag.on:
                continue
            p = q.take()
            c.write(c.encode(p))
            for f in p:  # what the connection had queued live before the replay, then the replayed events
                if f.seq:
                    c.written = max(c.written, f.seq)
                    if f.meta is not None:  # a live event (replayed frames carry no coalescing meta)
                        if not f.sent:
                            touched.append(f)
                        f.sent += 1
                    else:
                        replayed += 1
            if c.waiter is not None:
                wake.append(c.waiter)
        if touched:
            now = time.time()
            delivered = 0
            for f in touched:
                n = f.sent
                delivered += n
                if f.latency is not None:
                    f.latency.observe_many(max(0.0, now - f.t), n)
                f.sent = 0
            self.metrics.events_delivered.inc(delivered)
        if replayed:
            self.metrics.events_replayed.inc(replayed)
        for w in wake:
            w()


__all__ = ["Writer"]
