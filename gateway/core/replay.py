"""Resume: read a subscription's missed events back from JetStream and hand them to the hub.

The seam is exact, and it is the hub's (`Hub.begin_replay`): in one synchronous step the subscriptions
are registered, the connection starts *holding* live frames, and T, the hub's current stream position,
is noted. Everything the scopes have in (since, T] then comes from JetStream in order, with
permissions checked per event as they are now; every live event is > T and is already held. When the
replay reaches T, `end_replay` releases the held frames: no gap, no duplicate, stream order throughout.

The replayer only reads and filters: it never writes to a channel or touches connection state. A
replay is paced by the client (`deliver_replayed` returns once a batch was handed to the channel), and
the held live frames count against the connection's queue bounds, so a client that cannot keep up is
closed with 4429 like any other slow client. A semaphore bounds how many replays read at once, so a
burst of reconnecting clients cannot starve live delivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial

from opentelemetry.trace import Tracer

from gateway import tracing
from gateway.core.connection import Connection, ConnState
from gateway.core.history import StreamReader
from gateway.core.hub import Hub, ReplayPlan
from gateway.core.inbox import InboxSubscription, inbox_subjects
from gateway.core.index import Subscription
from gateway.core.queue import OutFrame, control, replayed_frame
from gateway.events import InvalidEvent, parse_event, subject_for, tenant_subjects
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


class Replayer:
    def __init__(
        self, hub: Hub, reader: StreamReader, *, max_concurrent: int = 8, batch: int = 256,
        tracer: Tracer | None = None,
    ) -> None:
        self.hub = hub
        self.reader = reader
        self.batch = batch
        self.tracer = tracer
        self._slots = asyncio.Semaphore(max_concurrent)
        self._serial: dict[str, _Serial] = {}

    def start(self, conn: Connection, request_id: str | int | None, scopes: Sequence[str], since: int) -> None:
        """Queue a replay for the connection (replays of one connection run one after another)."""
        task = asyncio.create_task(self._run(conn, request_id, list(scopes), since))
        task.add_done_callback(_log_failure)

    async def _run(self, conn: Connection, request_id: str | int | None, scopes: list[str], since: int) -> None:
        serial = self._serial.setdefault(conn.id, _Serial())
        serial.users += 1
        try:
            async with serial.lock:
                await self._one(conn, request_id, scopes, since)
        finally:
            serial.users -= 1
            if not serial.users:
                del self._serial[conn.id]

    async def _one(self, conn: Connection, request_id: str | int | None, scopes: list[str], since: int) -> None:
        hub = self.hub
        plan = hub.begin_replay(conn, request_id, scopes, since)
        hub.presence.settle(conn, scopes)  # presence snapshots now queue behind the replay's `subscribed`
        if plan is None:
            return
        stats = ReplayStats(plan.recovered)
        try:
            if self.tracer is None:
                await self._replay(conn, request_id, plan, since, stats)
            else:
                with tracing.replay_span(self.tracer, conn.channel.kind, plan.subs, since,
                                         until=plan.target, connection_id=conn.id) as span:
                    try:
                        await self._replay(conn, request_id, plan, since, stats)
                    finally:
                        tracing.record_replay(span, stats.events, stats.recovered, stats.denied)
        except Exception as exc:
            log.warning("replay for connection %s failed: %s", conn.id, exc)
            hub.close(conn, CLOSE_INTERNAL, "replay failed: reconnect and resume from your cursor")
        finally:
            hub.end_replay(conn)

    async def _replay(
        self, conn: Connection, request_id: str | int | None, plan: ReplayPlan, since: int, stats: ReplayStats,
    ) -> None:
        hub = self.hub
        target, start = plan.target, plan.start
        bounds = await self.reader.bounds()
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
        tenant = conn.principal.tenant
        prefix = hub.settings.subject_prefix
        subs = plan.subs
        wildcard = WILDCARD in subs
        inbox = subs.get(INBOX)
        in_inbox = partial(hub.index.inbox.replayed, inbox) if isinstance(inbox, InboxSubscription) else None
        if len(subs) == 1 and in_inbox is not None:
            subject = inbox_subjects(prefix, tenant)
        elif len(subs) == 1 and not wildcard:
            subject = subject_for(prefix, tenant, next(iter(subs)))
        else:
            subject = tenant_subjects(prefix, tenant)
        acl = hub.acl
        async with self._slots:
            async for batch in self.reader.read(subject, start, upto=target, batch=self.batch):
                if conn.state is not ConnState.REPLAYING:
                    return
                frames: list[OutFrame] = []
                for ev in batch:
                    try:
                        env = parse_event(ev.data, ev.subject, prefix)
                    except InvalidEvent:
                        continue
                    sub = subs.get(env.scope)
                    if isinstance(sub, Subscription):
                        ok = sub.allowed  # as it is now: follows ACL changes during the replay
                    elif wildcard:
                        ok = acl.may_see(conn.principal, tenant, env.kind, env.resource_id)
                    elif in_inbox is not None and (mine := in_inbox(env, ev.seq)) is not None:
                        ok = mine
                    else:
                        continue
                    if not ok:
                        hub.metrics.events_denied.inc()
                        stats.denied += 1
                        continue
                    frames.append(replayed_frame(ev.seq, ev.data))
                if frames:
                    stats.events += len(frames)
                    if not await hub.deliver_replayed(conn, frames):
                        return


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("replay task crashed", exc_info=task.exception())


__all__ = ["ReplayStats", "Replayer"]
