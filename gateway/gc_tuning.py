"""Garbage-collector settings for a long-running fan-out process.

Why: with thousands of connections the process holds hundreds of thousands of long-lived objects.
CPython's default generation-0 threshold (700 allocations) promotes the frames and lists that happen
to be in flight at each collection, and every ~25 % growth of the old generation triggers a full
collection that scans all of them: 30 to 130 ms pauses at 5,000 connections and 100,000 deliveries/s,
which is most of the p99 latency (measured with bench/fanout.py, docs/performance.md). Two measures:

- `gc.freeze()` once the gateway has started: modules, classes, the app and its settings live for the
  whole process, so later full collections no longer scan them;
- a larger generation-0 threshold (setting `gc_gen0_threshold`), so far fewer short-lived objects
  are promoted and full collections become rare. Cyclic garbage waits a little longer to be freed;
  the gateway's hot path creates almost none.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def tune_gc(gen0_threshold: int) -> None:
    """Freeze what exists now and raise the generation-0 threshold; 0 leaves the collector alone.

    The in-process test gateways use 0: a freeze in the shared pytest process would keep the cyclic
    garbage of earlier tests' gateways forever.
    """
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.debug("gc: froze %d objects; thresholds %s", gc.get_freeze_count(), gc.get_threshold())
