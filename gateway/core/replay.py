"""Resume: replay a subscription's missed events from JetStream, then hand over to live delivery.

The seam is exact. In one synchronous step the subscription is registered and the connection starts
*holding* live frames (the hub queues but does not write them), and T, the hub's current stream
position, is noted. Everything the scope has in (since, T] then comes from JetStream in order, with
permissions checked per event as they are now; every live event is > T and is already held. When the
replay reaches T the held frames are written: no gap, no duplicate, stream order throughout.

A replay is paced by the client: the next batch is pulled only after the previous one was handed to
the socket, and the held live frames count against the connection's queue bounds, so a client that
cannot keep up is closed with 4429 like any other slow client. A semaphore bounds how many replays
run at once, so a burst of reconnecting clients cannot starve live delivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from opentelemetry.trace import Tracer

from gateway import tracing
from gateway.core.history import StreamReader
from gateway.core.hub import Connection, Hub, OutFrame, Subscription, WildSubscription, control, encode
from gateway.events import InvalidEvent, parse_event
from gateway.protocol import WILDCARD, event_payload

log = logging.getLogger(__name__)

CLOSE_INTERNAL = 1011


class ReplayStats:
    """What one replay did: the `replay` span's attributes (filled in as the replay goes)."""

    __slots__ = ("denied", "events", "recovered")

    def __init__(self, recovered: bool) -> None:
        self.recovered = recovered
        self.events = 0  # event frames written
        self.denied = 0  # events of the subscribed scopes withheld by the permission check


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

    def start(self, conn: Connection, request_id: str | int | None, scopes: Sequence[str], since: int) -> None:
        """Queue a replay for the connection (replays of one connection run one after another)."""
        if conn.replay_lock is None:
            conn.replay_lock = asyncio.Lock()
        task = asyncio.create_task(self._run(conn, request_id, list(scopes), since))
        task.add_done_callback(_log_failure)

    async def _run(self, conn: Connection, request_id: str | int | None, scopes: list[str], since: int) -> None:
        assert conn.replay_lock is not None
        async with conn.replay_lock:
            if conn.closed:
                return
            hub = self.hub
            # --- synchronous: register, note T, start holding live frames -------------------------
            subs: dict[str, Subscription | WildSubscription] = {}
            for scope in scopes:
                sub = hub.add_subscription(conn, scope)
                if not hub.refuse(conn, request_id, scope, sub):
                    assert sub is not None
                    subs[scope] = sub
            if not subs:
                return
            target = hub.last_seq
            start = max(since, conn.last_seq)
            recovered = since >= conn.last_seq and since <= target
            prefix, conn.pending, conn.pending_bytes = conn.pending, [], 0
            conn.replaying += 1
            stats = ReplayStats(recovered)
            try:
                if self.tracer is None:
                    await self._replay(conn, request_id, subs, since, start, target, stats, prefix)
                else:
                    with tracing.replay_span(self.tracer, "sse" if conn.sse else "websocket", subs, since,
                                             until=target, connection_id=conn.id) as span:
                        try:
                            await self._replay(conn, request_id, subs, since, start, target, stats, prefix)
                        finally:
                            tracing.record_replay(span, stats.events, stats.recovered, stats.denied)
            except Exception as exc:
                log.warning("replay for connection %s failed: %s", conn.id, exc)
                hub.close(conn, CLOSE_INTERNAL, "replay failed: reconnect and resume from your cursor")
            finally:
                conn.replaying -= 1
                if conn.pending and not conn.closed and not conn.replaying:
                    hub.mark_dirty(conn)

    async def _replay(
        self, conn: Connection, request_id: str | int | None, subs: dict[str, Subscription | WildSubscription],
        since: int, start: int, target: int, stats: ReplayStats, prefix: list[OutFrame],
    ) -> None:
        hub = self.hub
        bounds = await self.reader.bounds()
        if since > target and since <= bounds.latest:
            # this instance lags the stream (the client came from one further ahead): nothing is lost;
            # skip what the client already has instead of calling it unrecovered
            stats.recovered = True
            conn.last_seq = max(conn.last_seq, since)
            conn.pending = [f for f in conn.pending if not f.seq or f.seq > since]
            conn.pending_bytes = sum(len(f.data) for f in conn.pending)
        if bounds.earliest and start + 1 < bounds.earliest and bounds.latest > start:
            stats.recovered = False  # the stream no longer holds everything after `since`
            start = bounds.earliest - 1
        earliest = bounds.earliest or bounds.latest + 1
        for scope in subs:
            prefix.append(control("subscribed", id=request_id, scope=scope, seq=target, since=since,
                                  recovered=stats.recovered, earliest=earliest))
        await self._write(conn, encode(conn, prefix))
        if start >= target:
            return
        tenant = conn.principal.tenant
        prefix_subject = hub.settings.subject_prefix
        wildcard = WILDCARD in subs
        if len(subs) == 1 and not wildcard:
            kind, _, rid = next(iter(subs)).partition(":")
            subject = f"{prefix_subject}.{tenant}.{kind}.{rid}"
        else:
            subject = f"{prefix_subject}.{tenant}.>"
        acl = hub.acl
        async with self._slots:
            async for batch in self.reader.read(subject, start, upto=target, batch=self.batch):
                if conn.closed:
                    return
                frames: list[OutFrame] = []
                for ev in batch:
                    try:
                        env = parse_event(ev.data, ev.subject, prefix_subject)
                    except InvalidEvent:
                        continue
                    sub = subs.get(env.scope)
                    if isinstance(sub, Subscription):
                        ok = sub.allowed  # as it is now: follows ACL changes during the replay
                    elif wildcard:
                        ok = acl.may_see(conn.principal, tenant, env.kind, env.resource_id)
                    else:
                        continue
                    if not ok:
                        hub.metrics.events_denied.inc()
                        stats.denied += 1
                        continue
                    frames.append(OutFrame(event_payload(ev.seq, ev.data), ev.seq))
                    if ev.seq > conn.last_seq:
                        conn.last_seq = ev.seq
                if frames:
                    await self._write(conn, encode(conn, frames), frames[-1].seq)
                    hub.metrics.events_replayed.inc(len(frames))
                    stats.events += len(frames)

    async def _write(self, conn: Connection, data: bytes, seq: int = 0) -> None:
        """Hand bytes to the socket once it has room (the client paces the replay)."""
        while not conn.closed and not conn.channel.writable:
            conn.drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(conn.drained, 1.0)  # woken by the hub's on-writable callback
            except TimeoutError:
                pass
            finally:
                conn.drained = None
        if not conn.closed:
            conn.channel.write(data)
            conn.written = max(conn.written, seq)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("replay task crashed", exc_info=task.exception())
