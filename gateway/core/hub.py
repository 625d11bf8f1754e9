"""The hub: the one writer of connection state, and fan-out.

An event is encoded into one frame, once. Fan-out asks the subscription index who may see it and
appends that same frame to each connection's bounded queue: no await, no copy, no per-client
encoding; the writer then gives every connection its frames in ONE channel write per loop turn. A
connection whose channel does not drain keeps its frames queued; when they exceed the queue bounds
they are coalesced, and if that is not enough it is closed with 4429 and resumes from its cursor, and
no other client waits for it.

Everything that changes a `Connection` goes through here: joining and leaving, subscriptions, queued
frames, the replay seam (`begin_replay` / `deliver_replayed` / `end_replay`), draining and closing, token
refresh and expiry. The parts each do one job: `index` (subscriptions and permission flags), `queue`
(frames, bounds, coalescing), `writer` (write scheduling), `expiry` (token expiry).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from gateway.config import Settings
from gateway.core.channel import Channel
from gateway.core.connection import Connection, ConnState
from gateway.core.expiry import Expiry
from gateway.core.index import AnySubscription, Change, Subscription, SubscriptionIndex
from gateway.core.presence import RUN_EDGES, Presence
from gateway.core.queue import Bounds, OutFrame, SendQueue, control, event_frame, shrink
from gateway.core.writer import Writer
from gateway.events import Envelope
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.principal import Principal
from gateway.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_SLOW,
    ERR_FORBIDDEN,
    ERR_LIMIT,
)

log = logging.getLogger(__name__)

RequestId = str | int | None


class ReplayPlan(NamedTuple):
    """What `begin_replay` decided: the subscriptions to replay and the seam."""

    subs: dict[str, AnySubscription]
    target: int  # T: the hub's stream position when the replay began; live frames are all > T
    start: int  # replay events with sequence > start (and <= T)
    recovered: bool  # the connection's own state allows a complete resume from `since`


class Hub:
    """Subscription index, connection state and fan-out for one gateway process."""

    def __init__(self, settings: Settings, metrics: Metrics, acl: AclStore) -> None:
        self.settings = settings
        self.metrics = metrics
        self.acl = acl
        self.index = SubscriptionIndex(acl, settings.max_subscriptions, metrics.subscriptions)
        self.writer = Writer(metrics, settings.flush_interval_ms, fast=settings.fast_path)
        self.fan_out = self.writer.fan_out  # the per-delivery loop of dispatch (C or Python: core/fastpath.py)
        self.index.allowed = self.writer.loops.allowed  # ... and of the index's targets
        self.expiry = Expiry(self._expired)
        self.bounds = Bounds(settings.queue_max_messages, settings.queue_max_bytes)
        self.last_seq = 0  # stream sequence of the last event processed: every client's cursor base
        self.connections: dict[str, Connection] = {}
        self.presence = Presence(self.send, settings, metrics)  # who watches which scope (core/presence.py)
        # Plain-int mirrors of three counters, bumped only where the metric is: the traced delivery path
        # (gateway.core.bus) reads them around one dispatch to tell what that dispatch did, so dispatch
        # itself neither returns more nor knows about tracing.
        self.denied_total = 0
        self.coalesced_total = 0
        self.slow_closed_total = 0

    # --- connections -----------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """At WSGATEWAY_MAX_CONNECTIONS: a new WebSocket or SSE stream is refused (4429 / 503)."""
        return len(self.connections) >= self.settings.max_connections

    def open(self, channel: Channel, principal: Principal, conn_id: str, *, cursor: int | None = None) -> Connection:
        """An authenticated client joins: LIVE, counted, its token expiry armed."""
        conn = Connection(channel, principal, conn_id, cursor=cursor, owner=self)
        conn.write = self.writer.loops.direct(conn.write)  # the fast path's write (core/fastpath.py)
        conn.move(ConnState.LIVE)
        self.connections[conn.id] = conn
        channel.on_writable = conn.channel_writable
        channel.on_shutdown = conn.channel_shutdown
        channel.on_lost = conn.channel_lost
        self.metrics.connections.set(len(self.connections))
        self._arm_expiry(conn)
        return conn

    def write_first(self, conn: Connection, head: bytes) -> None:
        """`head` (a WebSocket's 101, held back by the session until its connection opened), then the control
        frames queued for it since (welcome, the URL subscriptions' answers), in one write: a new connection's
        first bytes take one send, not two. Event frames (a replay's, never at this point) stay for the writer."""
        frames = conn.frames
        if conn.state is ConnState.LIVE and frames and all(not f.seq for f in frames):
            head += conn.encode(conn.take())
        conn.channel.write(head)

    def remove(self, conn: Connection) -> None:
        """Forget a connection and all its subscriptions (idempotent); nothing is written any more."""
        if conn.state is ConnState.CLOSED:
            return
        conn.move(ConnState.CLOSED)
        conn.queue.take()
        conn.replay_queue = None
        conn.expires = 0.0
        self.index.remove_all(conn)
        self.presence.drop(conn)
        ch = conn.channel
        ch.on_writable = ch.on_shutdown = ch.on_lost = None
        if conn.waiter is not None:
            conn.waiter()  # a replay waiting for a write: it ends now
        if self.connections.pop(conn.id, None) is not None:
            self.metrics.connections.set(len(self.connections))

    def close(self, conn: Connection, code: int, reason: str, *, drain: bool = False) -> None:
        """Close a connection: optionally write what may be written first (graceful), then the close frame.

        Draining a REPLAYING connection writes the replay's queued frames but never the held live frames:
        those are newer than the replay's position, and a client that took its cursor from them would
        resume past events the replay had not reached yet."""
        if conn.closed:
            return
        if drain:
            out = conn.replay_queue if conn.state is ConnState.REPLAYING else conn.queue
            if out is not None and out.frames:
                frames = out.take()
                conn.channel.write(conn.encode(frames))
                conn.written = max([conn.written, *(f.seq for f in frames)])
        conn.move(ConnState.DRAINING)
        self.remove(conn)
        conn.channel.close(code, reason[:120])

    def go_away(self, conn: Connection) -> None:
        self.close(conn, CLOSE_GOING_AWAY, "server shutting down", drain=True)

    def too_slow(self, conn: Connection) -> None:
        self.metrics.slow_client_disconnects.inc()
        self.slow_closed_total += 1
        # `written` is the last sequence handed to the channel: a client that read everything before the
        # close frame has exactly that cursor (its own last seen `seq` is always the one to use)
        self.close(conn, CLOSE_TOO_SLOW, f"too slow: reconnect and resume after seq {conn.written}")

    def send(self, conn: Connection, frame: OutFrame) -> None:
        """Queue a control frame behind whatever is queued, and schedule a write."""
        if conn.closed:
            return
        conn.queue.push(frame)
        self.writer.mark(conn)

    def resume(self, conn: Connection) -> None:
        """The channel has room again: write what waits."""
        out = conn.replay_queue if conn.state is ConnState.REPLAYING else conn.queue
        if not conn.closed and out is not None and out.frames:
            self.writer.mark(conn)

    def refresh(self, conn: Connection, principal: Principal) -> None:
        """A refreshed token (same subject and tenant): new expiry, permissions decided again."""
        conn.principal = principal
        self._arm_expiry(conn)
        self._notify(self.index.recheck(conns=[conn]))

    def _arm_expiry(self, conn: Connection) -> None:
        """The verifier accepts a token until exp + leeway; the session lives exactly as long (4408 then)."""
        self.expiry.arm(conn, conn.principal.expires_at + self.settings.jwt_leeway_s)

    def _expired(self, conn: Connection) -> None:
        self.close(conn, CLOSE_TOKEN_EXPIRED, "token expired: reconnect with a fresh token")

    # --- subscriptions ---------------------------------------------------------------------

    def _refuse(self, conn: Connection, request_id: RequestId, scope: str, sub: AnySubscription | None) -> bool:
        """Answer a subscription that cannot start now (limit, or not allowed yet); True if refused."""
        if sub is None:
            self.send(conn, control("error", id=request_id, code=ERR_LIMIT, scope=scope,
                                    message=f"at most {self.settings.max_subscriptions} subscriptions"))
            return True
        if isinstance(sub, Subscription) and not sub.allowed:
            self.send(conn, control("error", id=request_id, code=ERR_FORBIDDEN, scope=scope,
                                    message="not allowed to see this scope; the subscription stays pending "
                                            "and starts if access is granted"))
            return True
        return False

    def subscribe(self, conn: Connection, request_id: RequestId, scope: str) -> None:
        """A live subscription: events from the current stream position on."""
        if conn.closed:
            return
        sub = self.index.add(conn, scope)
        if not self._refuse(conn, request_id, scope, sub):
            self.send(conn, control("subscribed", id=request_id, scope=scope, seq=self.last_seq))

    def unsubscribe(self, conn: Connection, request_id: RequestId, scope: str) -> None:
        if conn.closed:
            return
        self.index.remove(conn, scope)
        self.presence.unwatch(conn, scope)
        self.send(conn, control("unsubscribed", id=request_id, scope=scope))

    def recheck_all(self) -> None:
        """Re-decide every subscription (after the first full ACL load)."""
        for tenant in self.index.tenants():
            self.recheck(tenant=tenant)

    def recheck(self, conns: Iterable[Connection] = (), tenant: str | None = None) -> None:
        """Re-decide permissions after an ACL change (a tenant) or a token refresh (connections).

        A subscription that loses access gets `revoked` and delivers nothing more; one that gains
        access gets `subscribed` and starts at the current sequence.
        """
        self._notify(self.index.recheck(conns, tenant))

    def _notify(self, changes: list[Change]) -> None:
        for c, scope, allowed in changes:
            if allowed:
                self.send(c, control("subscribed", scope=scope, seq=self.last_seq))
            else:
                self.send(c, control("revoked", scope=scope))
            self.presence.permission(c, scope)  # a revoked watcher leaves; a granted one gets a snapshot

    # --- the replay seam -------------------------------------------------------------------

    def begin_replay(
        self, conn: Connection, request_id: RequestId, scopes: Sequence[str], since: int
    ) -> ReplayPlan | None:
        """In one synchronous step: register the subscriptions, note T, and start holding live frames.

        None when nothing is to be replayed (the connection is closing, or every scope was refused)."""
        if conn.state is not ConnState.LIVE:
            return None
        subs: dict[str, AnySubscription] = {}
        for scope in scopes:
            sub = self.index.add(conn, scope)
            if not self._refuse(conn, request_id, scope, sub):
                assert sub is not None
                subs[scope] = sub
        if not subs:
            return None
        target = self.last_seq
        plan = ReplayPlan(subs, target, max(since, conn.last_seq), conn.last_seq <= since <= target)
        conn.replay_queue = SendQueue(conn.queue.take())  # what was queued goes out first
        conn.move(ConnState.REPLAYING)
        return plan

    def replay_lagging(self, conn: Connection, since: int) -> None:
        """This instance lags the stream and the client has everything up to `since`: nothing it already
        has is sent again (held live frames at or below `since` go)."""
        if conn.state is not ConnState.REPLAYING:
            return
        conn.last_seq = max(conn.last_seq, since)
        conn.queue.keep(lambda f: not f.seq or f.seq > since)

    async def deliver_replayed(self, conn: Connection, frames: Sequence[OutFrame]) -> bool:
        """Queue the replay's frames and wait until they are handed to the channel (the client paces the
        replay); False when the connection stopped replaying (closed) meanwhile."""
        if conn.state is not ConnState.REPLAYING or conn.replay_queue is None:
            return False
        q = conn.replay_queue
        for f in frames:
            q.push(f)
            if f.seq > conn.last_seq:
                conn.last_seq = f.seq
        done = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        conn.waiter = wake
        try:
            self.writer.mark(conn)
            await done
        finally:
            conn.waiter = None
        return conn.state is ConnState.REPLAYING

    def end_replay(self, conn: Connection) -> None:
        """The replay reached T: release the held live frames (all newer than what was replayed)."""
        if conn.state is not ConnState.REPLAYING:
            return
        rest = conn.replay_queue
        conn.replay_queue = None
        if rest is not None and rest.frames:  # not written yet: they still go first
            conn.frames = rest.frames + conn.frames
            conn.nbytes += rest.nbytes
        conn.move(ConnState.LIVE)
        if conn.queue.frames:
            self.writer.mark(conn)

    # --- events ----------------------------------------------------------------------------

    def skip(self, seq: int) -> None:
        """Advance the cursor past an event that is not delivered (invalid)."""
        self.last_seq = max(self.last_seq, seq)

    def dispatch(self, seq: int, env: Envelope, raw: bytes) -> int:
        """Fan one validated event out to every connection allowed to see it; returns recipients."""
        if seq <= self.last_seq:
            return 0  # redelivered after a consumer reset: already handled
        self.last_seq = seq
        self.index.inbox.observe(seq, env, raw)  # the request registry follows every event (core/inbox.py)
        if env.type in RUN_EDGES:
            self.presence.on_run(env)  # agents active per scope
        targets, denied = self.index.targets(env)
        if denied:
            self.metrics.events_denied.inc(denied)
            self.denied_total += denied
        if not targets:
            return 0
        frame = event_frame(seq, env, raw, self.metrics.latency_by_kind.get(env.kind))
        size = len(frame.data)
        max_msgs, max_bytes = self.bounds
        # for each target: append the frame, count its bytes, mark it dirty; the ones over their bounds come back
        recipients, slow = self.fan_out(targets, seq, frame, size, max_msgs, max_bytes, self.writer.dirty)
        for c in slow:
            self.overflow(c)
        if recipients:
            self.writer.schedule()
        return recipients

    def overflow(self, conn: Connection) -> None:
        """A connection's queue is over its bounds: coalesce what may be merged, else close with 4429."""
        if conn.closed:
            return
        removed, keep = shrink(conn.queue, self.bounds)
        if removed:
            self.metrics.events_coalesced.inc(removed)
            self.coalesced_total += removed
        if not keep:
            self.too_slow(conn)


__all__ = ["Hub", "ReplayPlan"]
