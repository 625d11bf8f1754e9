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
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from gateway.config import Settings
from gateway.edge.transport import RawChannel
from gateway.events import Envelope, coalesce_key, delivery_class
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.principal import Principal
from gateway.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_SLOW,
    ERR_FORBIDDEN,
    ERR_LIMIT,
    WILDCARD,
    event_payload,
    server_payload,
    ws_text_frame,
)

log = logging.getLogger(__name__)


class EventMeta:
    """What coalescing needs to know about a queued event (see `coalesce`)."""

    __slots__ = ("cls", "key", "raw")

    def __init__(self, cls: str, key: tuple[str, ...] | None, raw: bytes) -> None:
        self.cls = cls  # delivery class: lifecycle | delta | snapshot | state_delta | other
        self.key = key  # delta: (scope, type, stream id); snapshot/state_delta: (scope, run_id)
        self.raw = raw  # the envelope as published


class OutFrame:
    """One encoded server frame, shared by every connection it goes to."""

    __slots__ = ("ctl", "data", "latency", "meta", "payload", "sent", "seq", "sse", "t")

    def __init__(
        self, payload: bytes, seq: int = 0, latency: Any = None, t: float = 0.0,
        meta: EventMeta | None = None, ctl: str | None = None,
    ) -> None:
        self.payload = payload  # the frame's JSON
        self.data = ws_text_frame(payload)  # ... as one complete WebSocket frame
        self.sse: bytes | None = None  # ... as a Server-Sent Event, made on first use
        self.seq = seq  # stream sequence, 0 for control frames
        self.latency = latency  # histogram child for this event's kind
        self.t = t  # envelope time (epoch seconds)
        self.sent = 0  # deliveries written in the current flush, for the latency histogram
        self.meta = meta
        self.ctl = ctl  # control frame type, None for events

    def sse_bytes(self) -> bytes:
        if self.sse is None:
            head = b"id: %d\n" % self.seq if self.seq else b"event: %s\n" % (self.ctl or "message").encode()
            self.sse = head + b"data: " + self.payload + b"\n\n"
        return self.sse


def control(kind: str, **fields: Any) -> OutFrame:
    return OutFrame(server_payload(kind, **fields), ctl=kind)


def event_frame(seq: int, env: Envelope, raw: bytes, latency: Any = None) -> OutFrame:
    cls = delivery_class(env.type)
    key: tuple[str, ...] | None = None
    if cls == "delta":
        ck = coalesce_key(env)
        key = (env.scope, *ck) if ck else None
    elif cls in ("snapshot", "state_delta") and env.run_id:
        key = (env.scope, env.run_id)
    return OutFrame(event_payload(seq, raw), seq, latency, env.timestamp, EventMeta(cls, key, raw))


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
        "bad_frames", "blocked", "channel", "closed", "cursor", "dirty", "drained", "expires", "flag", "hub", "id",
        "last_seq", "pending", "pending_bytes", "principal", "replay_lock", "replaying", "sse", "subs", "wild",
        "write", "written",
    )

    def __init__(
        self, hub: Hub, channel: RawChannel | Any, principal: Principal, conn_id: str, *, sse: bool = False
    ) -> None:
        self.hub = hub
        self.channel = channel
        self.principal = principal
        self.id = conn_id
        self.pending: list[OutFrame] = []
        self.pending_bytes = 0
        self.last_seq = 0  # highest event sequence queued for this client: never send one twice
        self.written = 0  # highest event sequence handed to the socket
        self.subs: dict[str, Subscription] = {}
        self.wild: WildSubscription | None = None
        self.dirty = False
        self.blocked = False
        self.closed = False
        self.bad_frames = 0
        self.expires = 0.0  # wall-clock time at which the session ends with 4408 (0: not armed)
        self.replaying = 0  # >0 while a replay runs: live frames are held in `pending`, not written
        self.replay_lock: asyncio.Lock | None = None
        self.cursor: int | None = None  # connected with ?since=N: every subscription resumes from a cursor
        self.sse = sse  # Server-Sent Events instead of WebSocket frames
        self.drained: asyncio.Future[None] | None = None  # a replay waiting for the socket to drain
        # WebSocket fast path (the transport's write and its writable flag); None for SSE
        self.write: Callable[[bytes], None] | None = None
        self.flag: Any = None
        if not sse:
            self.write, self.flag = channel.fast_path()

    def on_writable(self) -> None:
        self.hub._on_writable(self)

    def go_away(self) -> None:
        self.hub.go_away(self)

    def lost(self) -> None:
        self.hub.remove(self)

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
        self._expiries: list[tuple[float, int, Connection]] = []  # heap: one timer for all sessions
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_n = 0
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_msgs = settings.queue_max_messages
        self._max_bytes = settings.queue_max_bytes
        self._delay = settings.flush_interval_ms / 1000.0
        # Plain-int mirrors of three counters, bumped only where the metric is: the traced delivery path
        # (gateway.core.bus) reads them around one dispatch to tell what that dispatch did, so dispatch itself
        # neither returns more nor knows about tracing.
        self.denied_total = 0
        self.coalesced_total = 0
        self.slow_closed_total = 0

    # --- connections -----------------------------------------------------------------------

    def add(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        conn.channel.on_writable = conn.on_writable
        conn.channel.on_shutdown = conn.go_away
        if not conn.sse:
            conn.channel.on_lost = conn.lost
        self.metrics.connections.set(len(self.connections))

    def remove(self, conn: Connection) -> None:
        """Forget a connection and all its subscriptions (idempotent)."""
        conn.closed = True
        conn.pending = []
        conn.pending_bytes = 0
        conn.expires = 0.0
        for sub in list(conn.subs.values()):
            self._drop(sub)
        conn.subs.clear()
        if conn.wild is not None:
            self._drop_wild(conn.wild)
            conn.wild = None
        conn.channel.on_writable = None
        conn.channel.on_shutdown = None
        if not conn.sse:
            conn.channel.on_lost = None
        if self.connections.pop(conn.id, None) is not None:
            self.metrics.connections.set(len(self.connections))

    def close(self, conn: Connection, code: int, reason: str, *, drain: bool = False) -> None:
        """Close a connection: optionally write what is pending first (graceful), then the close frame."""
        if conn.closed:
            return
        if drain and conn.pending:
            conn.channel.write(encode(conn, conn.pending))
        self.remove(conn)
        conn.channel.close(code, reason[:120])

    def expire_at(self, conn: Connection, when: float) -> None:
        """Close the session with 4408 at wall-clock `when` (re-arming replaces the previous time)."""
        conn.expires = when
        self._expiry_n += 1
        heapq.heappush(self._expiries, (when, self._expiry_n, conn))
        if self._expiry_timer is None:
            self._expiry_timer = asyncio.get_running_loop().call_later(
                max(0.0, min(1.0, when - time.time())), self._expire
            )

    def _expire(self) -> None:
        """Close sessions whose token has expired; checks at most once a second while any is armed."""
        self._expiry_timer = None
        now = time.time()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            when, _, conn = heapq.heappop(heap)
            if conn.expires == when and not conn.closed:  # else refreshed, or already gone
                self.close(conn, CLOSE_TOKEN_EXPIRED, "token expired: reconnect with a fresh token")
        if heap:
            self._expiry_timer = asyncio.get_running_loop().call_later(
                max(0.0, min(1.0, heap[0][0] - now)), self._expire
            )

    def go_away(self, conn: Connection) -> None:
        self.close(conn, CLOSE_GOING_AWAY, "server shutting down", drain=True)

    def too_slow(self, conn: Connection) -> None:
        self.metrics.slow_client_disconnects.inc()
        self.slow_closed_total += 1
        # `written` is the last sequence handed to the socket: a client that read everything before the
        # close frame has exactly that cursor (its own last seen `seq` is always the one to use)
        self.close(conn, CLOSE_TOO_SLOW, f"too slow: reconnect and resume after seq {conn.written}")

    # --- subscriptions ---------------------------------------------------------------------

    def add_subscription(self, conn: Connection, scope: str) -> Subscription | WildSubscription | None:
        """Register interest in a scope (idempotent); None when the connection is at its limit."""
        if scope == WILDCARD:
            if conn.wild is None:
                conn.wild = WildSubscription(conn)
                self.wild.setdefault(conn.principal.tenant, {})[conn.wild] = None
                self.metrics.subscriptions.inc()
            return conn.wild
        sub = conn.subs.get(scope)
        if sub is None:
            if len(conn.subs) >= self.settings.max_subscriptions:
                return None
            kind, _, rid = scope.partition(":")
            allowed = self.acl.may_see(conn.principal, conn.principal.tenant, kind, rid)
            sub = Subscription(conn, scope, kind, rid, allowed)
            conn.subs[scope] = sub
            self.by_scope.setdefault(sub.key, {})[sub] = None
            self.by_tenant.setdefault(sub.key[0], {})[sub] = None
            self.metrics.subscriptions.inc()
        return sub

    def refuse(self, conn: Connection, request_id: str | int | None, scope: str, sub: object) -> bool:
        """Answer a subscription that cannot start now (limit, or not allowed yet); True if refused."""
        if sub is None:
            conn.send(control("error", id=request_id, code=ERR_LIMIT, scope=scope,
                              message=f"at most {self.settings.max_subscriptions} subscriptions"))
            return True
        if isinstance(sub, Subscription) and not sub.allowed:
            conn.send(control("error", id=request_id, code=ERR_FORBIDDEN, scope=scope,
                              message="not allowed to see this scope; the subscription stays pending "
                                      "and starts if access is granted"))
            return True
        return False

    def subscribe(self, conn: Connection, request_id: str | int | None, scope: str) -> None:
        """A live subscription: events from the current stream position on."""
        sub = self.add_subscription(conn, scope)
        if not self.refuse(conn, request_id, scope, sub):
            conn.send(control("subscribed", id=request_id, scope=scope, seq=self.last_seq))

    def unsubscribe(self, conn: Connection, request_id: str | int | None, scope: str) -> None:
        if scope == WILDCARD:
            if conn.wild is not None:
                self._drop_wild(conn.wild)
                conn.wild = None
        else:
            sub = conn.subs.pop(scope, None)
            if sub is not None:
                self._drop(sub)
        conn.send(control("unsubscribed", id=request_id, scope=scope))

    def _drop(self, sub: Subscription) -> None:
        for index, key in ((self.by_scope, sub.key), (self.by_tenant, sub.key[0])):
            entries = index.get(key)  # type: ignore[call-overload]
            if entries is not None and sub in entries:
                del entries[sub]
                if index is self.by_scope:
                    self.metrics.subscriptions.dec()
                if not entries:
                    del index[key]  # type: ignore[arg-type]

    def _drop_wild(self, w: WildSubscription) -> None:
        entries = self.wild.get(w.conn.principal.tenant)
        if entries is not None and w in entries:
            del entries[w]
            self.metrics.subscriptions.dec()
            if not entries:
                del self.wild[w.conn.principal.tenant]

    def recheck_all(self) -> None:
        """Re-decide every subscription (after the first full ACL load)."""
        for tenant in set(self.by_tenant) | set(self.wild):
            self.recheck(tenant=tenant)

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
        targets = [sub.conn for sub in subs if sub.allowed] if subs else []
        denied = len(subs) - len(targets) if subs else 0
        if wild:
            kind, rid = env.kind, env.resource_id
            for w in wild:
                ok = w.decisions.get(scope)
                if ok is None:
                    ok = self.acl.may_see(w.conn.principal, tenant, kind, rid)
                    if len(w.decisions) >= w.MAX_CACHED:
                        w.decisions.clear()
                    w.decisions[scope] = ok
                if ok:
                    targets.append(w.conn)
                else:
                    denied += 1
        frame = event_frame(seq, env, raw, self.metrics.latency_by_kind.get(env.kind))
        size = len(frame.data)
        max_msgs, max_bytes = self._max_msgs, self._max_bytes
        dirty = self._dirty
        slow: list[Connection] = []
        recipients = 0
        for c in targets:
            if seq <= c.last_seq:
                continue  # already queued through another subscription (e.g. a scope and `*`)
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
            self.denied_total += denied
        for c in slow:
            self.overflow(c)
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

    def overflow(self, conn: Connection) -> None:
        """A connection's queue is over its bounds: coalesce what may be merged, else close with 4429."""
        if conn.closed:
            return
        before = len(conn.pending)
        conn.pending = coalesce(conn.pending)
        removed = before - len(conn.pending)
        if removed:
            self.metrics.events_coalesced.inc(removed)
            self.coalesced_total += removed
            conn.pending_bytes = sum(len(f.data) for f in conn.pending)
        # hysteresis: only keep a connection whose queue came well below its bounds
        if len(conn.pending) > self._max_msgs * 3 // 4 or conn.pending_bytes > self._max_bytes * 3 // 4:
            self.too_slow(conn)

    def _on_writable(self, conn: Connection) -> None:
        if conn.drained is not None and not conn.drained.done():
            conn.drained.set_result(None)
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
            if c.closed or not c.pending or c.replaying:
                continue  # a replaying connection's live frames wait until the replay reaches them
            p = c.pending
            write = c.write
            if write is not None:  # WebSocket: straight to the transport
                if not c.flag.on:
                    c.blocked = True  # resumes from _on_writable; bounded by the queue limits
                    continue
                write(p[0].data if len(p) == 1 else b"".join([f.data for f in p]))
            else:  # SSE
                if not c.channel.writable:
                    c.blocked = True
                    continue
                c.channel.write(encode(c, p))
            for f in p:
                if f.seq:
                    if not f.sent:
                        touched.append(f)
                    f.sent += 1
            c.written = c.last_seq  # everything queued is now handed to the socket
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


def encode(conn: Connection, frames: list[OutFrame]) -> bytes:
    if conn.sse:
        return b"".join([f.sse_bytes() for f in frames])
    return b"".join([f.data for f in frames])


def _merge_deltas(older: OutFrame, newer: OutFrame) -> OutFrame:
    """One delta frame standing for two: the newer envelope, with the older text prepended."""
    a, b = older.meta, newer.meta
    assert a is not None and b is not None
    env_a, env_b = orjson.loads(a.raw), orjson.loads(b.raw)
    env_b["data"]["delta"] = env_a["data"].get("delta", "") + env_b["data"].get("delta", "")
    raw = orjson.dumps(env_b)
    count = _coalesced_count(older) + _coalesced_count(newer)
    frame = OutFrame(event_payload(newer.seq, raw, count), newer.seq, newer.latency, older.t,
                     EventMeta("delta", b.key, raw))
    frame.sse = None
    return frame


def _coalesced_count(f: OutFrame) -> int:
    marker = b'"coalesced":'
    i = f.payload.find(marker, 0, 64)
    if i < 0:
        return 1
    j = f.payload.index(b",", i)
    return int(f.payload[i + len(marker):j])


def coalesce(frames: list[OutFrame]) -> list[OutFrame]:
    """Shrink a queue without losing meaning (docs/protocol.md, "Slow clients").

    - consecutive deltas of the same message / reasoning / tool-call arguments merge into one delta
      (carrying the newest `seq` and a `coalesced` count); a lifecycle or control frame between them
      is a barrier, so nothing moves across it;
    - a state snapshot makes earlier snapshots and state deltas of the same run obsolete: they go;
    - lifecycle events and everything else stay, in order.
    """
    out: list[OutFrame | None] = []
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
                f = _merge_deltas(prev, f)
            last_delta[m.key] = len(out)
            out.append(f)
        else:
            if m.cls == "snapshot" and m.key is not None:
                last_snapshot[m.key] = len(out)
            out.append(f)
    if last_snapshot:
        for i, f in enumerate(out):
            if f is None or f.meta is None or f.meta.key is None:
                continue
            if f.meta.cls in ("snapshot", "state_delta") and i < last_snapshot.get(f.meta.key, -1):
                out[i] = None
    return [f for f in out if f is not None]


__all__ = ["Connection", "Hub", "OutFrame", "coalesce", "control", "event_frame"]
