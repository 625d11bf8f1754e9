"""The recent window: the newest events this process received, kept in memory to serve resumes.

A reconnect storm (an instance dies, its clients resume on the others) asks every surviving instance
for the same few seconds of history, thousands of times. The bus has just received exactly those
events, so each instance keeps the newest ones (up to WSGATEWAY_REPLAY_WINDOW_BYTES) in stream order,
indexed by tenant and by (tenant, scope); a replay whose cursor is inside the window reads from memory,
and the replayed frame of an event is encoded once and shared by every client that resumes through it.

The window is exact: from `reset` on (the bus's start position) it holds every valid event with
`floor < seq <= last` that the bus delivered to the hub, fed in the same synchronous step as the hub's
dispatch, so it never lags the hub's position T. At start the bus also reads the stream's newest events
back (`prepend`: only once, only the range just before `reset`, atomically), which lowers `floor`.
Invalid events are not held (a replay from JetStream skips them too). Evicting the oldest event raises
`floor`; a reader whose position fell below `floor` gets None and continues from JetStream. Pure data:
no I/O, no asyncio.
"""

from __future__ import annotations

import copy
from bisect import bisect_right
from collections import deque
from operator import attrgetter
from sys import intern
from typing import TypeVar

from gateway.core.queue import OutFrame, event_meta, replayed_frame
from gateway.events import Envelope

# what one held event costs beyond its bytes: the entry, its index slots, and (once replayed) the shared
# frame, which holds the event twice more (frame JSON and WebSocket frame)
ENTRY_OVERHEAD = 320
_seq_of = attrgetter("seq")


class Entry:
    """One held event: what a replay needs to filter it, check its permission and send it."""

    __slots__ = ("frame", "kind", "meta", "rid", "scope", "seq", "size", "tenant")

    def __init__(self, seq: int, env: Envelope, raw: bytes) -> None:
        self.seq = seq
        # one copy of each name for all the entries of a scope (~0.2 KiB per entry); interned strings
        # are freed with their last entry
        self.tenant = intern(env.tenant)
        self.scope = intern(env.scope)
        kind, _, rid = env.scope.partition(":")
        self.kind, self.rid = intern(kind), intern(rid)
        self.meta = event_meta(env, raw)  # the raw event, and what a compact replay merges by
        self.frame: OutFrame | None = None  # the replayed frame, made on first use and shared
        self.size = 3 * len(raw) + ENTRY_OVERHEAD

    def replayed(self) -> OutFrame:
        """The event as a replayed frame (no coalescing meta): one object for every client."""
        if self.frame is None:
            self.frame = replayed_frame(self.seq, self.meta.raw)
        return self.frame

    def compactable(self) -> OutFrame:
        """The event as a frame `coalesce` may merge: a compact replay's own copy of the shared frame."""
        f = copy.copy(self.replayed())
        f.meta = self.meta
        return f


class _Run:
    """Entries of one index key, oldest first: a list with a moving head (O(1) eviction, bisect reads)."""

    __slots__ = ("head", "items")

    def __init__(self) -> None:
        self.items: list[Entry] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def popleft(self) -> None:
        self.head += 1
        if self.head >= 1024 and self.head * 2 >= len(self.items):
            del self.items[: self.head]
            self.head = 0

    def after(self, seq: int, upto: int, n: int) -> list[Entry]:
        items = self.items
        i = bisect_right(items, seq, lo=self.head, key=_seq_of)
        out = items[i : i + n]
        if out and out[-1].seq > upto:
            out = [e for e in out if e.seq <= upto]
        return out


K = TypeVar("K")


def _prepend_runs(runs: dict[K, _Run], older: dict[K, list[Entry]]) -> None:
    for key, items in older.items():
        run = runs.get(key)
        if run is None:
            run = runs[key] = _Run()
        run.items = items + run.items[run.head :]
        run.head = 0


class RecentWindow:
    """The newest events of this process, bounded by bytes, indexed by tenant and by (tenant, scope)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.started = False  # `reset` was called: from then on nothing the bus delivers is missed
        self.floor = 0  # every valid event with floor < seq <= last is held
        self.last = 0
        self.nbytes = 0
        self._all: deque[Entry] = deque()
        self._scopes: dict[tuple[str, str], _Run] = {}
        self._tenants: dict[str, _Run] = {}

    def __len__(self) -> int:
        return len(self._all)

    def reset(self, seq: int) -> None:
        """The bus consumes from seq + 1 on: start holding from there."""
        self._all.clear()
        self._scopes.clear()
        self._tenants.clear()
        self.nbytes = 0
        self.floor = self.last = seq
        self.started = self.max_bytes > 0

    def add(self, seq: int, env: Envelope, raw: bytes) -> None:
        """A valid event the bus hands to the hub (same step, same order)."""
        if not self.started or seq <= self.last:
            return
        self.last = seq
        e = Entry(seq, env, raw)
        self._all.append(e)
        self.nbytes += e.size
        run = self._scopes.get((e.tenant, e.scope))
        if run is None:
            run = self._scopes[(e.tenant, e.scope)] = _Run()
        run.items.append(e)
        run = self._tenants.get(e.tenant)
        if run is None:
            run = self._tenants[e.tenant] = _Run()
        run.items.append(e)
        while self.nbytes > self.max_bytes and self._all:
            self._evict()

    def _evict(self) -> None:
        e = self._all.popleft()
        self.nbytes -= e.size
        self.floor = e.seq
        for runs, key in ((self._scopes, (e.tenant, e.scope)), (self._tenants, e.tenant)):
            run = runs[key]  # type: ignore[index]
            run.popleft()  # the oldest of every index is the oldest overall: the same entry
            if not run:
                del runs[key]  # type: ignore[arg-type]

    def prepend(self, older: list[Entry], floor: int, upto: int) -> int:
        """Events read back from the stream at start-up: every valid event of (floor, upto], oldest
        first, where `upto` is the position `reset` started from. The window then reaches back to
        `floor`, or (keeping the newest) as far as its budget allows. Nothing happens if the window has
        evicted since `reset` (it is full of newer events anyway). Returns how many were taken."""
        if not self.started or self.floor != upto or not older:
            return 0
        budget = self.max_bytes - self.nbytes
        take: list[Entry] = []
        for e in reversed(older):
            if e.size > budget:
                floor = e.seq  # everything after it is held
                break
            budget -= e.size
            take.append(e)
        if not take:
            return 0
        take.reverse()
        self._all.extendleft(reversed(take))
        self.nbytes = self.max_bytes - budget
        scopes: dict[tuple[str, str], list[Entry]] = {}
        tenants: dict[str, list[Entry]] = {}
        for e in take:
            scopes.setdefault((e.tenant, e.scope), []).append(e)
            tenants.setdefault(e.tenant, []).append(e)
        _prepend_runs(self._scopes, scopes)
        _prepend_runs(self._tenants, tenants)
        self.floor = floor
        return len(take)

    def covers(self, after: int) -> bool:
        """Every held-worthy event after `after` (up to the hub's position) is in the window."""
        return self.started and self.floor <= after

    def read(self, tenant: str, scope: str | None, after: int, upto: int, n: int) -> list[Entry] | None:
        """Up to n entries of the tenant (or one scope of it) with after < seq <= upto, oldest first;
        None when the window no longer holds everything after `after` (read the rest from JetStream)."""
        if not self.covers(after):
            return None
        run = self._tenants.get(tenant) if scope is None else self._scopes.get((tenant, scope))
        if run is None:
            return []
        return run.after(after, upto, n)


__all__ = ["Entry", "RecentWindow"]
