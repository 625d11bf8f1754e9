"""The inbox: every request for input (`process.input_required`) addressed to a user, across processes.

Two parts, one job (who is asked what, and what settles it):

* the **registry** of requests, per tenant and process, built from the stream: at start-up from the
  retained process events (`load`, before the bus consumes live), then from every live event
  (`observe`, called by the hub's dispatch). Its updates are idempotent and keyed by stream sequence,
  so a re-load after a NATS reconnect changes nothing, and every instance that read the same stream
  holds the same registry;
* the **`inbox` subscriptions** (one per connection at most, like `*`), kept by tenant, with a cached
  permission decision per process they delivered something of; the subscription index asks
  `targets` which of them an event is for, and `recheck` re-decides them after an ACL change.

Who an event is for (its *audience*: principal ids, the empty set meaning "everyone who may see the
process", as docs/events.md defines empty `assignees`):

* `process.input_required`: its own `assignees` (`user:<sub>` / `group:<name>`; a bare name is a user);
* `process.input_received`: the audience of the request it answers (unknown request: nobody);
* `process.completed` / `failed` / `cancelled`: everyone any request of that process was for
  (a process that never asked anything: nobody).

An inbox subscription receives an event when its principal is in the audience and may see the process
now. The audience depends only on the stream, never on time or on this instance, so live delivery, a
replay and another instance decide alike. Expiry (`expires_at`) produces no frame: it is not an event of
the stream (a synthesized frame would have no `seq` to resume from and would differ per instance);
`open_for` (GET /v1/inbox) leaves expired requests out and clients hide them at `expires_at`.

Memory: a request costs under 1 KB with, while it is open, its envelope (bench/inbox.py measures it).
Requests older than the stream's first retained sequence are dropped by `prune` (GET /v1/inbox and
start-up call it), and at most MAX_REQUESTS are kept (the oldest go first), so the registry is bounded
by the stream's retention and by a fixed size. The open requests of each tenant are indexed apart
(`open`), so listing an inbox or starting an inbox subscription costs the open requests, not every
request ever asked.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pydantic import ValidationError

from gateway.events import InvalidEvent, ProcessInputRequired, parse_event
from gateway.permissions import AclStore, principal_id
from gateway.principal import Principal

if TYPE_CHECKING:
    from gateway.core.connection import Connection
    from gateway.core.history import StoredEvent, StreamReader
    from gateway.events import Envelope

log = logging.getLogger(__name__)

REQUEST = "process.input_required"
ANSWER = "process.input_received"
ENDS = frozenset({"process.completed", "process.failed", "process.cancelled"})
TYPES = frozenset({REQUEST, ANSWER, *ENDS})
# A cheap pre-filter for the start-up load: only events whose body names one of the types are parsed.
_TYPES_RE = re.compile(rb"process\.(?:input_required|input_received|completed|failed|cancelled)")
EVERYONE: frozenset[str] = frozenset()
# At most this many requests are kept per gateway process (open or settled, all tenants); beyond it the
# oldest in stream order are forgotten first, the same ones on every instance.
MAX_REQUESTS = 100_000


def inbox_subjects(prefix: str, tenant: str) -> str:
    """The subject filter of every process event of a tenant (what an inbox replay reads)."""
    return f"{prefix}.{tenant}.process.*"


def assigned(principal: Principal, audience: frozenset[str]) -> bool:
    """Whether the principal is in an audience (empty: everyone who may see the process)."""
    return not audience or not principal.ids.isdisjoint(audience)


class Request:
    """One request for input, as the registry keeps it."""

    __slots__ = ("assignees", "expires", "open", "raw", "scope", "seq")

    def __init__(self, seq: int, scope: str, assignees: frozenset[str], expires: float | None, raw: bytes) -> None:
        self.seq = seq  # stream sequence of its `process.input_required`
        self.scope = scope  # the process
        self.assignees = assignees  # principal ids; empty: everyone who may see the process
        self.expires = expires  # epoch seconds of `expires_at`, or None
        self.raw = raw  # the envelope as published, while open (b"" once settled)
        self.open = True

    def settle(self) -> None:
        self.open = False
        self.raw = b""


class InboxSubscription:
    """A connection's `inbox` subscription; `decisions` caches may-see per process scope it delivered."""

    __slots__ = ("conn", "decisions")

    MAX_CACHED = 4096

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decisions: dict[str, bool] = {}


def _request_of(env: Envelope) -> tuple[str, frozenset[str], float | None] | None:
    """request_id, assignees (principal ids) and expiry of a `process.input_required` (validated data)."""
    try:
        data = ProcessInputRequired.model_validate(env.data)
    except ValidationError:  # the bus validated it already; a replayed event was validated by parse_event
        return None
    expires = data.expires_at.timestamp() if data.expires_at is not None else None
    return data.request_id, frozenset(principal_id(a) for a in data.assignees), expires


class Inbox:
    """The request registry and the `inbox` subscriptions of one gateway process."""

    def __init__(self, acl: AclStore) -> None:
        self.acl = acl
        # tenant -> process scope -> request_id -> Request
        self.requests: dict[str, dict[str, dict[str, Request]]] = {}
        self.open: dict[str, dict[Request, None]] = {}  # tenant -> its open requests (what GET lists)
        self.order: deque[tuple[str, str, str, int]] = deque()  # (tenant, scope, request_id, seq), stream order
        self.subs: dict[str, dict[InboxSubscription, None]] = {}  # tenant -> inbox subscriptions
        self.by_conn: dict[str, InboxSubscription] = {}  # connection id -> its inbox subscription
        self.loaded = False  # the start-up load is done: the registry is complete up to the hub's position

    # --- the registry ----------------------------------------------------------------------

    def observe(self, seq: int, env: Envelope, raw: bytes) -> None:
        """Apply one event of the stream (any event; only the inbox types change anything). Idempotent."""
        etype = env.type
        if etype not in TYPES:
            return
        procs = self.requests.get(env.tenant)
        if etype == REQUEST:
            req = _request_of(env)
            if req is None:
                return
            rid, assignees, expires = req
            if procs is None:
                procs = self.requests[env.tenant] = {}
            asked = procs.setdefault(env.scope, {})
            old = asked.get(rid)
            if old is None or old.seq < seq:
                if old is not None:
                    self._settle(env.tenant, old)
                new = asked[rid] = Request(seq, env.scope, assignees, expires, raw)
                self.open.setdefault(env.tenant, {})[new] = None
                self.order.append((env.tenant, env.scope, rid, seq))
                while len(self.order) > MAX_REQUESTS:
                    self._forget(*self.order.popleft())
            return
        reqs = procs.get(env.scope) if procs is not None else None
        if not reqs:
            return
        if etype == ANSWER:
            answered = reqs.get(str(env.data.get("request_id")))
            if answered is not None and answered.seq < seq:
                self._settle(env.tenant, answered)
            return
        for r in reqs.values():  # the process ended: every request it had asked is settled
            if r.seq < seq:
                self._settle(env.tenant, r)

    def _settle(self, tenant: str, r: Request) -> None:
        if r.open:
            r.settle()
            mine = self.open.get(tenant)
            if mine is not None:
                mine.pop(r, None)
                if not mine:
                    del self.open[tenant]

    def _forget(self, tenant: str, scope: str, rid: str, seq: int) -> None:
        """Drop one request from the registry (if it is still the one asked at `seq`)."""
        procs = self.requests.get(tenant)
        reqs = procs.get(scope) if procs is not None else None
        r = reqs.get(rid) if reqs is not None else None
        if procs is None or reqs is None or r is None or r.seq != seq:
            return
        self._settle(tenant, r)
        del reqs[rid]
        if not reqs:
            del procs[scope]
            if not procs:
                del self.requests[tenant]

    def audience(self, env: Envelope, seq: int | None = None) -> frozenset[str] | None:
        """Whose inbox an event belongs to: principal ids (EVERYONE: all who may see the process), or None
        when it is no inbox event (another type, an unknown request, a process that never asked).

        `seq` (a replayed event's) counts only the requests asked before it, as live delivery did; live, every
        request the registry holds was asked before."""
        etype = env.type
        if etype not in TYPES:
            return None
        if etype == REQUEST:
            req = _request_of(env)
            return None if req is None else req[1]
        reqs = self.requests.get(env.tenant, {}).get(env.scope)
        if not reqs:
            return None
        if etype == ANSWER:
            answered = reqs.get(str(env.data.get("request_id")))
            return None if answered is None or (seq is not None and answered.seq > seq) else answered.assignees
        out: set[str] = set()
        for r in reqs.values():
            if seq is not None and r.seq > seq:
                continue
            if not r.assignees:
                return EVERYONE
            out |= r.assignees
        return frozenset(out) if out else None

    async def load(self, reader: StreamReader, prefix: str, upto: int) -> int:
        """Build the registry from the retained process events up to `upto` (the bus calls this before it
        consumes live from `upto + 1`); returns the number of events applied."""
        applied = 0

        def apply(ev: StoredEvent) -> None:
            nonlocal applied
            if _TYPES_RE.search(ev.data) is None:
                return
            try:
                env = parse_event(ev.data, ev.subject, prefix)
            except InvalidEvent:
                return
            self.observe(ev.seq, env, ev.data)
            applied += 1

        await reader.scan(f"{prefix}.*.process.*", upto, apply)
        bounds = await reader.bounds()
        for tenant in list(self.requests):
            self.prune(tenant, bounds.earliest)
        self.loaded = True
        log.info("inbox: %d request events read from the stream up to seq %d, %d requests open", applied, upto,
                 sum(len(mine) for mine in self.open.values()))
        return applied

    def prune(self, tenant: str, earliest: int) -> None:
        """Forget the tenant's requests the stream no longer holds (older than its first sequence)."""
        procs = self.requests.get(tenant)
        if procs is None or earliest <= 1:
            return
        gone = [(scope, rid, r.seq) for scope, reqs in procs.items() for rid, r in reqs.items() if r.seq < earliest]
        for scope, rid, seq in gone:
            self._forget(tenant, scope, rid, seq)

    def open_for(self, principal: Principal, *, after: int = 0, now: float | None = None) -> list[Request]:
        """The requests open now for the principal, oldest first: assigned to it (or to everyone), of a
        process it may see now, not expired, with a sequence above `after`."""
        now = time.time() if now is None else now
        tenant = principal.tenant
        seen: dict[str, bool] = {}  # may-see per process, decided once per call
        out: list[Request] = []
        for r in self.open.get(tenant, ()):
            if r.seq <= after or not assigned(principal, r.assignees) or (r.expires is not None and r.expires <= now):
                continue
            ok = seen.get(r.scope)
            if ok is None:
                kind, _, rid = r.scope.partition(":")
                ok = seen[r.scope] = self.acl.may_see(principal, tenant, kind, rid)
            if ok:
                out.append(r)
        out.sort(key=lambda r: r.seq)
        return out

    # --- the subscriptions -----------------------------------------------------------------

    def add(self, conn: Connection) -> tuple[InboxSubscription, bool]:
        """The connection's inbox subscription (made if new: True). Its decisions start with the processes
        of the requests open for it now, so losing one of them is a `revoked` frame like a delivered one."""
        sub = self.by_conn.get(conn.id)
        if sub is not None:
            return sub, False
        sub = InboxSubscription(conn)
        for r in self.open_for(conn.principal):
            sub.decisions[r.scope] = True
        self.by_conn[conn.id] = sub
        self.subs.setdefault(conn.principal.tenant, {})[sub] = None
        return sub, True

    def remove(self, conn: Connection) -> bool:
        sub = self.by_conn.pop(conn.id, None)
        if sub is None:
            return False
        tenant = conn.principal.tenant
        entries = self.subs.get(tenant)
        if entries is not None:
            entries.pop(sub, None)
            if not entries:
                del self.subs[tenant]
        return True

    def tenants(self) -> set[str]:
        return set(self.subs)

    def _decide(self, sub: InboxSubscription, env: Envelope) -> bool:
        ok = sub.decisions.get(env.scope)
        if ok is None:
            ok = self.acl.may_see(sub.conn.principal, env.tenant, env.kind, env.resource_id)
            if len(sub.decisions) >= sub.MAX_CACHED:
                sub.decisions.clear()
            sub.decisions[env.scope] = ok
        return ok

    def targets(self, env: Envelope, out: list[Connection]) -> int:
        """Append the connections whose inbox a live event is for; returns how many were denied it (in the
        audience, but may not see the process)."""
        subs = self.subs.get(env.tenant)
        if not subs:
            return 0
        audience = self.audience(env)
        if audience is None:
            return 0
        denied = 0
        for sub in subs:
            if not assigned(sub.conn.principal, audience):
                continue
            if self._decide(sub, env):
                out.append(sub.conn)
            else:
                denied += 1
        return denied

    def replayed(self, sub: InboxSubscription, env: Envelope, seq: int) -> bool | None:
        """For a replayed event at `seq`: None when it is not for this inbox, else whether it may be delivered
        now."""
        audience = self.audience(env, seq)
        if audience is None or not assigned(sub.conn.principal, audience):
            return None
        ok = self.acl.may_see(sub.conn.principal, env.tenant, env.kind, env.resource_id)
        sub.decisions[env.scope] = ok
        return ok

    def recheck(self, conns: Iterable[Connection] = (), tenant: str | None = None) -> list[tuple[Connection, str]]:
        """Re-decide the cached decisions (an ACL change of a tenant, or refreshed connections); returns the
        (connection, process scope) pairs that were visible and are not any more."""
        subs: list[InboxSubscription] = list(self.subs.get(tenant, {})) if tenant is not None else []
        subs.extend(s for c in conns if (s := self.by_conn.get(c.id)) is not None)
        changes: list[tuple[Connection, str]] = []
        for sub in subs:
            p = sub.conn.principal
            old, sub.decisions = sub.decisions, {}
            for scope, was in old.items():
                kind, _, rid = scope.partition(":")
                now = self.acl.may_see(p, p.tenant, kind, rid)
                sub.decisions[scope] = now
                if was and not now:
                    changes.append((sub.conn, scope))
        return changes


__all__ = [
    "ANSWER",
    "ENDS",
    "REQUEST",
    "TYPES",
    "Inbox",
    "InboxSubscription",
    "Request",
    "assigned",
    "inbox_subjects",
]
