"""The per-delivery loops of fan-out: queueing one frame for every target, and writing every LIVE connection's
frames in one write. Each exists twice, with the same semantics: in C (`gateway/core/_fastpath.c`, built by
the package's install) and here in Python, the reference and the fallback.

`WSGATEWAY_FAST_PATH=false` (or a build without a C compiler) selects the Python loops; the tests of
delivery run under both (tests/test_fastpath.py and the parametrized end-to-end tests).

- `allowed(subs) -> targets`: the connections of a scope's subscriptions (a dict's keys) whose permission
  flag is set, in order (`SubscriptionIndex.targets`; in Python `index.allowed_conns`).
- `fan_out(targets, seq, frame, size, max_msgs, max_bytes, dirty) -> (recipients, slow)`: for each target
  that has not queued `seq` yet (a connection may be a target twice: a scope and `*`): note `seq`, append
  the frame, count its bytes, put the connection on the writer's `dirty` list once (`conn.dirty`); the
  connections now over their queue bounds are returned (`slow`) for the hub to coalesce or close.
- `flush_live(dirty, live, touched) -> rest`: for each dirty connection, clear `dirty`; a LIVE one with
  queued frames and a writable channel gets them in one write (the frames' own bytes joined when they
  are the wire form, else `conn.encode`), every event frame written counts one delivery in `frame.sent`
  (a frame's first delivery of this flush appends it to `touched`, for the latency histogram), and its
  queue is emptied (`written` = `last_seq`); the connections in another state are returned (`rest`),
  for the writer's replay path.
- `direct(write) -> write`: the write a connection's flush uses, given its channel's. Compiled, a uvloop
  TCP transport's write becomes a `Sink` that sends on the socket itself while the transport holds no
  bytes (and is not closing), and hands everything else to the transport's write (the C module explains
  why that is the same); in Python, the channel's write itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from gateway.core.connection import Connection, ConnState
from gateway.core.index import Subscription, allowed_conns
from gateway.core.queue import OutFrame

log = logging.getLogger(__name__)

Write = Callable[[bytes], object]
Allowed = Callable[[dict[Subscription, None]], list[Connection]]
FanOut = Callable[[list[Connection], int, OutFrame, int, int, int, list[Connection]], tuple[int, list[Connection]]]
FlushLive = Callable[[list[Connection], ConnState, list[OutFrame]], list[Connection]]


class Loops(NamedTuple):
    allowed: Allowed
    fan_out: FanOut
    flush_live: FlushLive
    direct: Callable[[Write], Write]


def direct_py(write: Write) -> Write:
    return write


def fan_out_py(
    targets: list[Connection], seq: int, frame: OutFrame, size: int, max_msgs: int, max_bytes: int,
    dirty: list[Connection],
) -> tuple[int, list[Connection]]:
    slow: list[Connection] = []
    recipients = 0
    for c in targets:
        if seq <= c.last_seq:
            continue  # already queued through another subscription (e.g. a scope and `*`)
        c.last_seq = seq
        p = c.frames  # the connection is its own live queue
        p.append(frame)
        c.nbytes += size
        recipients += 1
        if not c.dirty:
            c.dirty = True
            dirty.append(c)
        if len(p) > max_msgs or c.nbytes > max_bytes:
            slow.append(c)
    return recipients, slow


def flush_live_py(dirty: list[Connection], live: ConnState, touched: list[OutFrame]) -> list[Connection]:
    rest: list[Connection] = []
    for c in dirty:
        c.dirty = False
        if c.state is not live:
            rest.append(c)
            continue
        p = c.frames
        if not p or not c.flag.on:
            continue  # nothing, or no room: `on_writable` marks it again
        if c.native:  # WebSocket: the frames' bytes as they are (an inlined `channel.encode`)
            c.write(p[0].data if len(p) == 1 else b"".join([f.data for f in p]))
        else:
            c.write(c.encode(p))
        for f in p:  # one check per delivery
            if f.seq:
                if not f.sent:
                    touched.append(f)
                f.sent += 1
        c.written = c.last_seq  # everything queued is now handed to the channel
        c.frames = []  # (the compiled loop empties the list in place instead: the same queue, no new list)
        c.nbytes = 0
    return rest


def _module() -> Any:
    try:
        from gateway.core import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _fastpath


MODULE: Any = _module()  # the compiled module (its loops, and the socket helpers the edge uses); None: not built


def _compiled() -> Loops | None:
    mod = MODULE
    if mod is None:
        return None
    mod.configure(Connection, OutFrame, Subscription)
    try:
        from uvloop.loop import TCPTransport  # type: ignore[attr-defined]  # (its stubs omit the class)
    except ImportError:  # no uvloop: every write goes through its transport
        pass
    else:
        mod.use_transport(TCPTransport)
    return Loops(mod.allowed, mod.fan_out, mod.flush_live, mod.direct)


_COMPILED = _compiled()
AVAILABLE = _COMPILED is not None  # the C loops were built with the package
PYTHON = Loops(allowed_conns, fan_out_py, flush_live_py, direct_py)


def select(fast: bool) -> Loops:
    """The loops to use: the C ones when `fast` and built, else the Python ones."""
    if fast and _COMPILED is not None:
        return _COMPILED
    if fast:
        log.warning("the compiled fast path (gateway.core._fastpath) is not built: using the Python loops")
    return PYTHON


__all__ = [
    "AVAILABLE", "MODULE", "PYTHON", "Allowed", "FanOut", "FlushLive", "Loops", "Write", "direct_py", "fan_out_py",
    "flush_live_py", "select",
]
