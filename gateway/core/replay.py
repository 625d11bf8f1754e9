"""Resume: read a subscription's missed events back (from memory or JetStream) and hand them to the hub.

The seam is exact, and it is the hub's (`Hub.begin_replay`): in one synchronous step the subscriptions
are registered, the connection starts *holding* live frames, and T, the hub's current stream position,
is noted. Everything the scopes have in (since, T] then comes, in order, with permissions checked per
event as they are now; every live event is > T and is already held. When the replay reaches T,
`end_replay` releases the held frames: no gap, no duplicate, stream order throughout.

Where the events come from: a cursor inside this process's recent window (`gateway.core.window`, the
newest events the bus received, fed in the same step as the hub's dispatch) is served from memory,
with one shared frame per event for every client resuming through it: a reconnect storm costs no
JetStream read at all. A cursor older than the window, or a replay the window runs past while it goes,
reads (the rest) from JetStream, at most WSGATEWAY_MAX_CONCURRENT_REPLAYS of those at once. The stream's
bounds (for `recovered` / `earliest`) are one request shared by the replays that begin while it is
under way (`SharedBounds`).

The replayer only reads and filters: it never writes to a channel or touches connection state. A
replay is paced by the client (`deliver_replayed` returns once a batch was handed to the channel), and
the held live frames count against the connection's queue bounds, so a client that cannot keep up is
closed with 4429 like any other slow client. A compact replay (`compact: true`) merges the deltas of
each message, reasoning and tool call's arguments in the replayed range with the coalescing rules
(`queue.coalesce`) before handing them over (`Compactor`).

The inbox (`gateway.core.inbox`): an `inbox` subscription's events are decided by the request registry
from the whole envelope (who was asked), which the window does not hold, so a replay that includes
`inbox` reads JetStream (the inbox's own subjects when it is the only scope).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial

from opentelemetry.trace import Tracer

from gateway import tracing
from gateway.core.connection import Connection, ConnState
from gateway.core.history import StreamBounds, StreamReader
from gateway.core.hub import Hub, ReplayPlan
from gateway.core.inbox import InboxSubscription, inbox_subjects
from gateway.core.index import AnySubscription, Subscription
from gateway.core.queue import OutFrame, coalesce, control, event_meta, replayed_frame
from gateway.core.window import RecentWindow
from gateway.events import Envelope, InvalidEvent, parse_event, subject_for, tenant_subjects
from gateway.permissions import AclStore
from gateway.principal import Principal
from gateway.protocol import INBOX, WILDCARD

log = logging.getLogger(__name__)

CLOSE_INTERNAL = 1011


class ReplayStats:
    """What one replay did: the `replay` span's attributes (filled in as the replay goes)."""

    __slots__ = ("denied", "events", "recovered")

    def __init__(self, recovered: bool) -> None:
        self.recovered = recovered
        self.events = 0  # event frames handed over
        self.denied = 0  # events of the subscribed scopes withheld by the permission check


class _Serial:
    """Replays of one connection run one after another; the entry goes when no replay waits."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class SharedBounds:
    """The stream's bounds for replays that begin at about the same time: one request, many answers.

    A caller gets the answer of a request SENT AFTER it asked (so the bounds are never older than the
    caller's seam T); callers arriving while a request is under way share the next one."""

    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader
        self._next: asyncio.Future[StreamBounds] | None = None
        self._pump_task: asyncio.Task[None] | None = None  # referenced while it runs

    async def get(self) -> StreamBounds:
        fut = self._next
        if fut is None:
            fut = self._next = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            if self._pump_task is None:
                self._pump_task = asyncio.create_task(self._pump())
                self._pump_task.add_done_callback(_log_failure)
        return await asyncio.shield(fut)

    async def _pump(self) -> None:
        try:
            while self._next is not None:
                fut, self._next = self._next, None
                try:
                    fut.set_result(await self.reader.bounds())
                except Exception as exc:
                    fut.set_exception(exc)
                except BaseException:  # cancelled (shutdown): nobody waits for an answer that cannot come
                    fut.cancel()
                    raise
        finally:
            self._pump_task = None
            if self._next is not None:
                self._next.cancel()
                self._next = None


def _retrieve(fut: asyncio.Future[StreamBounds]) -> None:
    if not fut.cancelled():
        fut.exception()  # seen by its callers; marked retrieved even if all of them were cancelled


class _Filter:
    """The permission check of one replay, per event as it is now (follows ACL changes mid-replay)."""

    __slots__ = ("acl", "in_inbox", "principal", "subs", "tenant", "wildcard")

    def __init__(
        self, subs: dict[str, AnySubscription], acl: AclStore, principal: Principal,
        in_inbox: Callable[[Envelope, int], bool | None] | None = None,
    ) -> None:
        self.subs = subs
        self.acl = acl
        self.principal = principal
        self.tenant = principal.tenant
        self.wildcard = WILDCARD in subs
        self.in_inbox = in_inbox  # the inbox subscription's decision (registry.replayed), when subscribed

    def check(self, scope: str, kind: str, rid: str) -> bool | None:
        """True: deliver; False: denied; None: not a subscribed scope."""
        sub = self.subs.get(scope)
        if isinstance(sub, Subscription):
            return sub.allowed
        if self.wildcard:
            return self.acl.may_see(self.principal, self.tenant, kind, rid)
        return None

    def check_event(self, env: Envelope, seq: int) -> bool | None:
        """`check`, then (for an event of no subscribed scope) whether it is for the inbox."""
        ok = self.check(env.scope, env.kind, env.resource_id)
        if ok is None and self.in_inbox is not None:
            return self.in_inbox(env, seq)
        return ok


class Compactor:
    """A compact replay's merging: deltas merged (queue.coalesce) across batches; the frames after the
    last barrier (a lifecycle event) are held back, since the next batch may still merge into them."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.held: list[OutFrame] = []
        self.limit = limit

    def feed(self, frames: list[OutFrame]) -> list[OutFrame]:
        """Merge `frames` in; what may go out now."""
        merged = coalesce(self.held + frames)
        cut = 0
        for i in range(len(merged) - 1, -1, -1):
            m = merged[i].meta
            if m is None or m.cls == "lifecycle":
                cut = i + 1
                break
        out, self.held = merged[:cut], merged[cut:]
        if len(self.held) > self.limit:
            out, self.held = merged, []
        return out

    def rest(self) -> list[OutFrame]:
        out, self.held = self.held, []
        return out


def _as_replayed(frames: list[OutFrame]) -> list[OutFrame]:
    """Compact frames lose their coalescing meta when handed over: a replayed frame is never merged
    with live frames afterwards, and the writer counts it as replayed."""
    for f in frames:
        f.meta = None
    return frames


class Replayer:
    def __init__(
        self, hub: Hub, reader: StreamReader, *, max_concurrent: int = 8, batch: int = 256,
        tracer: Tracer | None = None, window: RecentWindow | None = None,
    ) -> None:
        self.hub = hub
        self.reader = reader
        self.batch = batch
        self.tracer = tracer
        self.window = window
        self.bounds = SharedBounds(reader)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._serial: dict[str, _Serial] = {}

    def start(
        self, conn: Connection, request_id: str | int | None, scopes: Sequence[str], since: int, *,
        compact: bool = False,
    ) -> None:
        """Queue a replay for the connection (replays of one connection run one after another)."""
        task = asyncio.create_task(self._run(conn, request_id, list(scopes), since, compact))
        task.add_done_callback(_log_failure)

    async def _run(
        self, conn: Connection, request_id: str | int | None, scopes: list[str], since: int, compact: bool
    ) -> None:
        serial = self._serial.setdefault(conn.id, _Serial())
        serial.users += 1
        try:
            async with serial.lock:
                await self._one(conn, request_id, scopes, since, compact)
        finally:
            serial.users -= 1
            if not serial.users:
                del self._serial[conn.id]

    async def _one(
        self, conn: Connection, request_id: str | int | None, scopes: list[str], since: int, compact: bool
    ) -> None:
        hub = self.hub
        plan = hub.begin_replay(conn, request_id, scopes, since)
        hub.presence.settle(conn, scopes)  # presence snapshots now queue behind the replay's `subscribed`
        if plan is None:
            return
        stats = ReplayStats(plan.recovered)
        try:
            if self.tracer is None:
                await self._replay(conn, request_id, plan, since, stats, compact)
            else:
                with tracing.replay_span(self.tracer, conn.channel.kind, plan.subs, since,
                                         until=plan.target, connection_id=conn.id) as span:
                    try:
                        await self._replay(conn, request_id, plan, since, stats, compact)
                    finally:
                        tracing.record_replay(span, stats.events, stats.recovered, stats.denied)
        except Exception as exc:
            log.warning("replay for connection %s failed: %s", conn.id, exc)
            hub.close(conn, CLOSE_INTERNAL, "replay failed: reconnect and resume from your cursor")
        finally:
            hub.end_replay(conn)

    async def _replay(
        self, conn: Connection, request_id: str | int | None, plan: ReplayPlan, since: int, stats: ReplayStats,
        compact: bool,
    ) -> None:
        hub = self.hub
        target, start = plan.target, plan.start
        bounds = await self.bounds.get()
        if target < since <= bounds.latest:
            # this instance lags the stream (the client came from one further ahead): nothing is lost;
            # skip what the client already has instead of calling it unrecovered
            stats.recovered = True
            hub.replay_lagging(conn, since)
        if not bounds.complete_after(start):
            stats.recovered = False  # the stream no longer holds everything after `since`
            start = bounds.earliest - 1
        earliest = bounds.earliest or bounds.latest + 1
        acks = [control("subscribed", id=request_id, scope=scope, seq=target, since=since,
                        recovered=stats.recovered, earliest=earliest) for scope in plan.subs]
        if not await hub.deliver_replayed(conn, acks) or start >= target:
            return
        inbox = plan.subs.get(INBOX)
        in_inbox = partial(hub.index.inbox.replayed, inbox) if isinstance(inbox, InboxSubscription) else None
        check = _Filter(plan.subs, hub.acl, conn.principal, in_inbox)
        squash = Compactor(self.batch) if compact else None
        pos: int | None = start
        replays = hub.metrics.replays
        if self.window is not None and in_inbox is None and self.window.covers(start):
            pos = await self._from_window(conn, check, start, target, stats, squash)
            if pos == target:
                replays.labels("window").inc()
        if pos is not None and pos < target:
            replays.labels("stream").inc()
            async with self._slots:
                pos = await self._from_stream(conn, check, pos, target, stats, squash)
        if pos is not None and squash is not None:
            await self._hand_over(conn, stats, _as_replayed(squash.rest()))

    async def _hand_over(self, conn: Connection, stats: ReplayStats, frames: list[OutFrame]) -> bool:
        if not frames:
            return True
        stats.events += len(frames)
        return await self.hub.deliver_replayed(conn, frames)

    async def _pass(
        self, conn: Connection, stats: ReplayStats, squash: Compactor | None, frames: list[OutFrame]
    ) -> bool:
        if squash is not None:
            frames = _as_replayed(squash.feed(frames))
        return await self._hand_over(conn, stats, frames)

    def _denied(self, stats: ReplayStats) -> None:
        self.hub.metrics.events_denied.inc()
        stats.denied += 1

    async def _from_window(
        self, conn: Connection, check: _Filter, pos: int, target: int, stats: ReplayStats, squash: Compactor | None,
    ) -> int | None:
        """Replay from memory; the position reached (`target`, or where the window no longer covers and
        JetStream takes over), None when the connection stopped replaying."""
        window = self.window
        assert window is not None
        subs = check.subs
        scope = next(iter(subs)) if len(subs) == 1 and not check.wildcard else None
        tenant = check.tenant
        n = self.batch
        while pos < target:
            entries = window.read(tenant, scope, pos, target, n)
            if entries is None:
                return pos  # evicted past our position meanwhile: the rest from JetStream
            if not entries:
                return target
            frames: list[OutFrame] = []
            for e in entries:
                ok = check.check(e.scope, e.kind, e.rid)
                if ok is None:
                    continue
                if not ok:
                    self._denied(stats)
                    continue
                frames.append(e.compactable() if squash is not None else e.replayed())
            pos = entries[-1].seq
            if conn.state is not ConnState.REPLAYING:
                return None
            if frames:
                if not await self._pass(conn, stats, squash, frames):
                    return None
            else:
                await asyncio.sleep(0)  # a long stretch of the tenant's other scopes: let others run
            if len(entries) < n:
                return target
        return pos

    async def _from_stream(
        self, conn: Connection, check: _Filter, pos: int, target: int, stats: ReplayStats, squash: Compactor | None,
    ) -> int | None:
        """Replay (pos, target] from JetStream; `target`, or None when the connection stopped replaying."""
        hub = self.hub
        prefix = hub.settings.subject_prefix
        subs = check.subs
        if len(subs) == 1 and check.in_inbox is not None:
            subject = inbox_subjects(prefix, check.tenant)
        elif len(subs) == 1 and not check.wildcard:
            subject = subject_for(prefix, check.tenant, next(iter(subs)))
        else:
            subject = tenant_subjects(prefix, check.tenant)
        async for batch in self.reader.read(subject, pos, upto=target, batch=self.batch):
            if conn.state is not ConnState.REPLAYING:
                return None
            frames: list[OutFrame] = []
            for ev in batch:
                try:
                    env = parse_event(ev.data, ev.subject, prefix)
                except InvalidEvent:
                    continue
                ok = check.check_event(env, ev.seq)
                if ok is None:
                    continue
                if not ok:
                    self._denied(stats)
                    continue
                f = replayed_frame(ev.seq, ev.data)
                if squash is not None:
                    f.meta = event_meta(env, ev.data)  # this connection's own frame: mergeable
                frames.append(f)
            if frames and not await self._pass(conn, stats, squash, frames):
                return None
        return target


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("replay task crashed", exc_info=task.exception())


__all__ = ["Compactor", "ReplayStats", "Replayer", "SharedBounds"]
