"""The hub: subscription index, permission check, fan-out and batched writes.

An event is encoded into one WebSocket frame, once. Fan-out walks the subscribers of the event's
scope (and the tenant's `*` subscribers) and appends that same bytes object to each connection's
pending list: no await, no copy, no per-client encoding. Once per loop turn (or per
`flush_interval_ms`), every connection with pending frames gets them in ONE transport write. A
connection whose socket does not drain keeps its frames pending; when they exceed the queue bounds it
is closed with 4429 and resumes from its cursor, and no other client waits for it.

Permissions are decided when a subscription is made and again whenever the ACL of its tenant
changes (or the connection's token is refreshed), so fan-out reads a boolean, not the ACL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from gateway.auth import Principal
from gateway.config import Settings
from gateway.events import Envelope
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_SLOW,
    ERR_FORBIDDEN,
    ERR_LIMIT,
    WILDCARD,
    event_payload,
    server_frame,
    ws_text_frame,
)
from gateway.transport import RawChannel

log = logging.getLogger(__name__)


class OutFrame:
    """One encoded server frame, shared by every connection it goes to."""

    __slots__ = ("data", "latency", "sent", "seq", "t")

    def __init__(self, data: bytes, seq: int = 0, latency: Any = None, t: float = 0.0) -> None:
        self.data = data
        self.seq = seq  # stream sequence, 0 for control frames
        self.latency = latency  # histogram child for this event's kind
        self.t = t  # envelope time (epoch seconds)
        self.sent = 0  # deliveries written in the current flush, for the latency histogram


def control(kind: str, **fields: Any) -> OutFrame:
    return OutFrame(server_frame(kind, **fields))


class Subscription:
    """A connection's interest in one scope; `allowed` is the cached permission decision."""

    __slots__ = ("allowed", "conn", "key", "kind", "resource_id", "scope")

    def __init__(self, conn: Connection, scope: str, kind: str, resource_id: str, allowed: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.kind = kind
        self.resource_id = resource_id
        self.allowed = allowed
        self.key = (conn.principal.tenant, scope)


class WildSubscription:
    """A `*` subscription: every scope of the tenant the principal may see, decided per scope and cached."""

    __slots__ = ("conn", "decisions")

    MAX_CACHED = 4096

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decisions: dict[str, bool] = {}


class Connection:
    """Gateway-side state of one authenticated WebSocket."""

    __slots__ = (
        "bad_frames", "blocked", "channel", "closed", "dirty", "expiry", "hub", "id", "last_seq",
        "pending", "pending_bytes", "principal", "subs", "wild",
    )

    def __init__(self, hub: Hub, channel: RawChannel, principal: Principal, conn_id: str) -> None:
        self.hub = hub
        self.channel = channel
        self.principal = principal
        self.id = conn_id
        self.pending: list[OutFrame] = []
        self.pending_bytes = 0
        self.last_seq = 0  # highest event sequence queued for this client: never send one twice
        self.subs: dict[str, Subscription] = {}
        self.wild: WildSubscription | None = None
        self.dirty = False
        self.blocked = False
        self.closed = False
        self.bad_frames = 0
        self.expiry: asyncio.TimerHandle | None = None

    def send(self, frame: OutFrame) -> None:
        """Queue a control frame behind whatever is pending, and schedule a flush."""
        if self.closed:
            return
        self.pending.append(frame)
        self.pending_bytes += len(frame.data)
        if not self.dirty:
            self.dirty = True
            self.hub.mark_dirty(self)


class Hub:
    """Subscription index and fan-out for one gateway process."""

    def __init__(self, settings: Settings, metrics: Metrics, acl: AclStore) -> None:
        self.settings = settings
        self.metrics = metrics
        self.acl = acl
        self.last_seq = 0  # stream sequence of the last event processed: every client's cursor base
        self.connections: dict[str, Connection] = {}
        self.by_scope: dict[tuple[str, str], dict[Subscription, None]] = {}
        self.by_tenant: dict[str, dict[Subscription, None]] = {}
        self.wild: dict[str, dict[WildSubscription, None]] = {}
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_msgs = settings.queue_max_messages
        self._max_bytes = settings.queue_max_bytes
        self._delay = settings.flush_interval_ms / 1000.0

    # --- connections -----------------------------------------------------------------------

    def add(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        conn.channel.on_writable = lambda: self._on_writable(conn)
        conn.channel.on_shutdown = lambda: self.go_away(conn)
        self.metrics.connections.set(len(self.connections))

    def remove(self, conn: Connection) -> None:
        """Forget a connection and all its subscriptions (idempotent)."""
        conn.closed = True
        conn.pending = []
        conn.pending_bytes = 0
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        for sub in list(conn.subs.values()):
            self._drop(sub)
        conn.subs.clear()
        if conn.wild is not None:
            self._drop_wild(conn.wild)
            conn.wild = None
        conn.channel.on_writable = None
        conn.channel.on_shutdown = None
        if self.connections.pop(conn.id, None) is not None:
            self.metrics.connections.set(len(self.connections))
            self._update_sub_gauge()

    def close(self, conn: Connection, code: int, reason: str, *, drain: bool = False) -> None:
        """Close a connection: optionally write what is pending first (graceful), then the close frame."""
        if conn.closed:
            return
        if drain and conn.pending:
            conn.channel.write(b"".join(f.data for f in conn.pending))
        self.remove(conn)
        conn.channel.close(code, reason[:120])

    def go_away(self, conn: Connection) -> None:
        self.close(conn, CLOSE_GOING_AWAY, "server shutting down", drain=True)

    def too_slow(self, conn: Connection) -> None:
        self.metrics.slow_client_disconnects.inc()
        self.close(conn, CLOSE_TOO_SLOW, f"too slow: reconnect and resume after seq {self._acked(conn)}")

    @staticmethod
    def _acked(conn: Connection) -> int:
        """Highest event sequence fully handed to the socket (the client resumes after it)."""
        pending_min = min((f.seq for f in conn.pending if f.seq), default=0)
        return pending_min - 1 if pending_min else conn.last_seq

    # --- subscriptions ---------------------------------------------------------------------

    def subscribe(self, conn: Connection, request_id: str | int | None, scope: str) -> None:
        if scope == WILDCARD:
            if conn.wild is None:
                conn.wild = WildSubscription(conn)
                self.wild.setdefault(conn.principal.tenant, {})[conn.wild] = None
                self._update_sub_gauge()
            conn.send(control("subscribed", id=request_id, scope=scope, seq=self.last_seq))
            return
        sub = conn.subs.get(scope)
        if sub is None:
            if len(conn.subs) >= self.settings.max_subscriptions:
                conn.send(control("error", id=request_id, code=ERR_LIMIT,
                                  message=f"at most {self.settings.max_subscriptions} subscriptions"))
                return
            kind, _, rid = scope.partition(":")
            allowed = self.acl.may_see(conn.principal, conn.principal.tenant, kind, rid)
            sub = Subscription(conn, scope, kind, rid, allowed)
            conn.subs[scope] = sub
            self.by_scope.setdefault(sub.key, {})[sub] = None
            self.by_tenant.setdefault(sub.key[0], {})[sub] = None
            self._update_sub_gauge()
        if sub.allowed:
            conn.send(control("subscribed", id=request_id, scope=scope, seq=self.last_seq))
        else:
            conn.send(control("error", id=request_id, code=ERR_FORBIDDEN, scope=scope,
                              message="not allowed to see this scope; the subscription stays pending "
                                      "and starts if access is granted"))

    def unsubscribe(self, conn: Connection, request_id: str | int | None, scope: str) -> None:
        if scope == WILDCARD:
            if conn.wild is not None:
                self._drop_wild(conn.wild)
                conn.wild = None
        else:
            sub = conn.subs.pop(scope, None)
            if sub is not None:
                self._drop(sub)
        self._update_sub_gauge()
        conn.send(control("unsubscribed", id=request_id, scope=scope))

    def _drop(self, sub: Subscription) -> None:
        for index, key in ((self.by_scope, sub.key), (self.by_tenant, sub.key[0])):
            entries = index.get(key)  # type: ignore[call-overload]
            if entries is not None:
                entries.pop(sub, None)
                if not entries:
                    del index[key]  # type: ignore[arg-type]

    def _drop_wild(self, w: WildSubscription) -> None:
        entries = self.wild.get(w.conn.principal.tenant)
        if entries is not None:
            entries.pop(w, None)
            if not entries:
                del self.wild[w.conn.principal.tenant]

    def _update_sub_gauge(self) -> None:
        n = sum(len(v) for v in self.by_scope.values()) + sum(len(v) for v in self.wild.values())
        self.metrics.subscriptions.set(n)

    def recheck(self, conns: Iterable[Connection] | None = None, tenant: str | None = None) -> None:
        """Re-decide permissions after an ACL change (a tenant) or a token refresh (connections).

        A subscription that loses access gets `revoked` and delivers nothing more; one that gains
        access gets `subscribed` and starts at the current sequence.
        """
        subs: list[Subscription] = []
        wilds: list[WildSubscription] = []
        if tenant is not None:
            subs.extend(self.by_tenant.get(tenant, {}))
            wilds.extend(self.wild.get(tenant, {}))
        for c in conns or ():
            subs.extend(c.subs.values())
            if c.wild is not None:
                wilds.append(c.wild)
        acl = self.acl
        for sub in subs:
            c = sub.conn
            now = acl.may_see(c.principal, c.principal.tenant, sub.kind, sub.resource_id)
            if now == sub.allowed:
                continue
            sub.allowed = now
            if now:
                c.send(control("subscribed", scope=sub.scope, seq=self.last_seq))
            else:
                c.send(control("revoked", scope=sub.scope))
        for w in wilds:
            c = w.conn
            old = w.decisions
            w.decisions = {}
            for scope, was in old.items():
                kind, _, rid = scope.partition(":")
                now = acl.may_see(c.principal, c.principal.tenant, kind, rid)
                w.decisions[scope] = now
                if was and not now:
                    c.send(control("revoked", scope=scope))

    # --- events ----------------------------------------------------------------------------

    def skip(self, seq: int) -> None:
        """Advance the cursor past an event that is not delivered (invalid)."""
        self.last_seq = max(self.last_seq, seq)

    def dispatch(self, seq: int, env: Envelope, raw: bytes) -> int:
        """Fan one validated event out to every connection allowed to see it; returns recipients."""
        if seq <= self.last_seq:
            return 0  # redelivered after a consumer reset: already handled
        self.last_seq = seq
        tenant, scope = env.tenant, env.scope
        subs = self.by_scope.get((tenant, scope))
        wild = self.wild.get(tenant)
        if not subs and not wild:
            return 0
        latency = self.metrics.latency_by_kind.get(env.kind)
        data = ws_text_frame(event_payload(seq, raw))
        frame = OutFrame(data, seq, latency, env.timestamp)
        size = len(data)
        max_msgs, max_bytes = self._max_msgs, self._max_bytes
        dirty = self._dirty
        slow: list[Connection] = []
        denied = 0
        recipients = 0
        if subs:
            for sub in subs:
                if not sub.allowed:
                    denied += 1
                    continue
                c = sub.conn
                if seq <= c.last_seq:
                    continue
                c.last_seq = seq
                p = c.pending
                p.append(frame)
                c.pending_bytes += size
                recipients += 1
                if not c.dirty:
                    c.dirty = True
                    dirty.append(c)
                if len(p) > max_msgs or c.pending_bytes > max_bytes:
                    slow.append(c)
        if wild:
            kind, rid = env.kind, env.resource_id
            for w in wild:
                c = w.conn
                ok = w.decisions.get(scope)
                if ok is None:
                    ok = self.acl.may_see(c.principal, tenant, kind, rid)
                    if len(w.decisions) >= w.MAX_CACHED:
                        w.decisions.clear()
                    w.decisions[scope] = ok
                if not ok:
                    denied += 1
                    continue
                if seq <= c.last_seq:
                    continue
                c.last_seq = seq
                p = c.pending
                p.append(frame)
                c.pending_bytes += size
                recipients += 1
                if not c.dirty:
                    c.dirty = True
                    dirty.append(c)
                if len(p) > max_msgs or c.pending_bytes > max_bytes:
                    slow.append(c)
        if denied:
            self.metrics.events_denied.inc(denied)
        for c in slow:
            self.too_slow(c)
        if dirty:
            self._schedule_flush()
        return recipients

    # --- writes ----------------------------------------------------------------------------

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        if self._delay:
            loop.call_later(self._delay, self.flush)
        else:
            loop.call_soon(self.flush)

    def _on_writable(self, conn: Connection) -> None:
        if conn.blocked and conn.pending and not conn.closed:
            conn.blocked = False
            conn.dirty = True
            self.mark_dirty(conn)

    def flush(self) -> None:
        """Write every dirty connection's pending frames in one write each; record latency."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        touched: list[OutFrame] = []
        for c in dirty:
            c.dirty = False
            if c.closed or not c.pending:
                continue
            ch = c.channel
            if not ch.writable:
                c.blocked = True  # resumes from _on_writable; bounded by the queue limits
                continue
            p = c.pending
            ch.write(p[0].data if len(p) == 1 else b"".join([f.data for f in p]))
            for f in p:
                if f.seq:
                    if not f.sent:
                        touched.append(f)
                    f.sent += 1
            c.pending = []
            c.pending_bytes = 0
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


__all__ = ["Connection", "Hub", "OutFrame", "control"]
