"""Garbage-collector settings for a long-running fan-out process.

Why: with thousands of connections the process holds hundreds of thousands of long-lived objects.
CPython's default generation-0 threshold (700 allocations) promotes the frames and lists that happen
to be in flight at each collection, and every ~25 % growth of the old generation triggers a full
collection that scans all of them: 30 to 130 ms pauses at 5,000 connections and 100,000 deliveries/s,
which is most of the p99 latency (measured with bench/fanout.py, docs/performance.md). Two measures:

- `gc.freeze()` once the gateway has started: modules, classes, the app and its settings live for the
  whole process, so later full collections no longer scan them;
- a larger generation-0 threshold (setting `gc_gen0_threshold`), so far fewer short-lived objects
  are promoted and full collections become rare.

The price of the larger threshold is that cyclic garbage waits longer. Each WebSocket handshake used
to leave uvicorn's HTTP protocol object and its parser behind as a reference cycle (~23 objects), so a
burst of handshakes piled up to a threshold's worth of garbage (measured at 1,000 connections: 16.2
instead of 13.6 KiB per idle connection), and a generation-0 collection ran after every 128 accepted
connections. The cycle is now broken at the hand-over (edge/http_protocol.py drops the parser), a
handshake leaves no cyclic garbage, and that collection is gone: it cost ~60 µs of CPU per handshake
(each young collection ~10 ms on the shared benchmark machine; bench/handshakes.py,
docs/performance.md). (A once-a-second young collection while "quiet" was tried too and removed: the
hot path allocates so few tracked objects that it also ran under load, where it only promotes objects
in flight.)

The tuning is process-wide, like the collector itself.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def tune_gc(gen0_threshold: int) -> None:
    """Freeze what exists now and raise the generation-0 threshold (the caller skips this for 0).

    The in-process test gateways use 0: a freeze in the shared pytest process would keep the cyclic
    garbage of earlier tests' gateways forever.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.debug("gc: froze %d objects; thresholds %s", gc.get_freeze_count(), gc.get_threshold())
