"""Token expiry of open sessions: one heap and one timer for all of them, not a timer per session."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.core.connection import Connection


class Expiry:
    """Calls `on_expired(conn)` once a connection's armed time has passed (checked at most once a second)."""

    def __init__(self, on_expired: Callable[[Connection], None]) -> None:
        self._on_expired = on_expired
        self._heap: list[tuple[float, int, Connection]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._n = 0

    def arm(self, conn: Connection, when: float) -> None:
        """End the session at wall-clock `when` (re-arming replaces the previous time)."""
        conn.expires = when
        self._n += 1
        heapq.heappush(self._heap, (when, self._n, conn))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, min(1.0, when - time.time())), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, conn = heapq.heappop(heap)
            if conn.expires == when and not conn.closed:  # else refreshed, or already gone
                self._on_expired(conn)
        if heap:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, min(1.0, heap[0][0] - now)), self._fire)


__all__ = ["Expiry"]
