"""The bus: this instance's one JetStream ordered consumer, the ACL bucket watch, and NATS health.

Every instance reads every event (an ordered consumer is a broadcast, not a work queue), so any number
of instances run side by side. The bus never gives up: a failed first connection is retried with
backoff, a lost connection is re-established by nats-py, and the ordered consumer re-creates itself
from the last stream sequence it saw, so no event is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from opentelemetry.trace import Tracer

from gateway import provisioning, tracing
from gateway.config import Settings
from gateway.core.history import StreamReader
from gateway.core.hub import Hub
from gateway.core.presence_kv import PresenceSync
from gateway.core.window import ENTRY_OVERHEAD, Entry, RecentWindow
from gateway.events import InvalidEvent, parse_event
from gateway.logs import BackoffLog, safe_urls
from gateway.metrics import Metrics
from gateway.permissions import AclStore, watch_acl

log = logging.getLogger(__name__)


async def ensure_stream(js: JetStreamContext, settings: Settings) -> int:
    """Make sure the events stream exists (creating it when allowed); returns its last sequence."""
    subject = f"{settings.subject_prefix}.>"
    config = provisioning.stream_config(
        settings.stream, [subject], max_age_s=settings.stream_max_age_s, max_bytes=settings.stream_max_bytes,
        replicas=settings.stream_replicas,
    )
    try:
        info, created = await provisioning.ensure_stream(js, config, create=settings.create_stream)
    except NotFoundError:
        raise RuntimeError(
            f"JetStream stream {settings.stream!r} does not exist and stream creation is disabled"
        ) from None
    if created:
        log.info("created JetStream stream %s on %s", settings.stream, subject)
    elif subject not in (info.config.subjects or []):
        log.warning("stream %s does not list subject %s: events may be missed", settings.stream, subject)
    return int(info.state.last_seq)


async def ensure_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The ACL bucket, created (with the stream's replicas) when missing and creation is allowed."""
    config = provisioning.bucket_config(settings.acl_bucket, replicas=settings.stream_replicas)
    return await provisioning.open_bucket(js, config, create=settings.create_stream, what="ACL bucket")


class Bus:
    """Connects to NATS and feeds the hub; `ready` when connected, consuming and ACLs loaded."""

    def __init__(
        self, settings: Settings, hub: Hub, acl: AclStore, metrics: Metrics, *, tracer: Tracer | None = None,
        window: RecentWindow | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer  # None: tracing off, and the delivery path does no tracing work at all
        self.hub = hub
        self.window = window  # fed with every valid event in the step that dispatches it (core/window.py)
        self.acl = acl
        self.metrics = metrics
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.consuming = False
        self.started = False  # ACLs, inbox and stream position loaded once: clients may be served
        self.acl_ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PushSubscription | None = None
        self._kv: KeyValue | None = None
        self._recover_task: asyncio.Task[None] | None = None
        self._prefill_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_invalid_log = 0.0
        self._invalid_unlogged = 0
        self.presence = PresenceSync(settings, hub.presence, metrics)  # the presence bucket

    @property
    def ready(self) -> bool:
        return bool(self.nc and self.nc.is_connected and self.consuming and self.acl_ready.is_set())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="wsgateway-bus")

    async def stop(self) -> None:
        self._stopping = True
        await self.presence.stop()
        for t in (self._prefill_task, self._watchdog_task, self._recover_task, self._watch_task, self._task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        self.metrics.nats_connected.set(0)

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                await self._connect()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep trying: readiness tells the orchestrator meanwhile
                log.warning("NATS not ready (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                if self.nc is not None:
                    with contextlib.suppress(Exception):
                        await self.nc.close()
                    self.nc = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        s = self.settings
        # nats-py retries a failed connection forever and tells only error_cb; these lines are what an
        # operator sees meanwhile: the server (no credentials) and the cause, backing off (logs.BackoffLog).
        nc = NATS()
        failures = BackoffLog()
        errors = BackoffLog(first_interval_s=10.0)

        def server_url(connected: bool) -> str:
            """The server of the current (or, not connected, the last attempted) connection, without credentials."""
            uri = nc.connected_url if connected else None
            if uri is None:  # the server pool records when each server was last tried
                tried = [srv for srv in getattr(nc, "_server_pool", []) if getattr(srv, "last_attempt", None)]
                uri = max(tried, key=lambda srv: srv.last_attempt).uri if tried else None
            return safe_urls(uri.geturl()) if uri is not None else safe_urls(s.nats_url)

        async def disconnected() -> None:
            self.metrics.nats_connected.set(0)
            if not self._stopping:  # stop() drains the connection: that disconnect is no news
                log.warning("NATS disconnected from %s; reconnecting", server_url(False))

        async def reconnected() -> None:
            self.metrics.nats_connected.set(1)
            self.check_consumer("reconnected")  # a restarted server has lost our in-memory consumer
            if self._kv is not None:
                self._start_acl_watch(self._kv)  # ... and the ACL watch's: revocations must not wait for it
            self.presence.reconnected()
            failed = failures.reset()
            log.info("NATS reconnected to %s%s", server_url(True),
                     f" after {failed} failed attempt{'s' if failed != 1 else ''}" if failed else "")

        async def error(exc: Exception) -> None:
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not nc.is_connected:
                report = failures.failed()
                if report is not None:
                    count, next_s = report
                    log.warning("NATS connection to %s failed: %s; retrying every %.1fs (%d failed attempt%s since "
                                "the last report, next report in %.0fs at most)", server_url(False), cause,
                                nc.options.get("reconnect_time_wait", 0.5), count, "s" if count != 1 else "", next_s)
            else:
                report = errors.failed()
                if report is not None:
                    log.warning("NATS error on %s: %s (%d since the last report)", server_url(True), cause, report[0])

        await nc.connect(
            servers=s.nats_servers,
            name="wsgateway",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # annotated int; a float is slept as given
            connect_timeout=2,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            user_credentials=str(s.nats_credentials) if s.nats_credentials else None,
        )
        self.nc = nc
        failed = failures.reset()
        log.info("NATS connected to %s%s", server_url(True),
                 f" after {failed} failed attempt{'s' if failed != 1 else ''}" if failed else "")
        self.metrics.nats_connected.set(1)
        self.js = self.nc.jetstream()
        last = await ensure_stream(self.js, s)
        self._kv = await ensure_bucket(self.js, s)
        self._start_acl_watch(self._kv)
        await asyncio.wait_for(self.acl_ready.wait(), timeout=30)
        # The inbox's requests from the retained process events, before the live ones (gateway/core/inbox.py)
        await self.hub.index.inbox.load(StreamReader(self.js, s.stream), s.subject_prefix, last)
        await self.presence.start(self.js, lambda: bool(self.nc and self.nc.is_connected))
        # Start right after the stream's current end: the hub's cursor is exact from the first event.
        self.hub.skip(last)
        if self.window is not None:
            self.window.reset(self.hub.last_seq)
            if self.window.started:  # what came before this instance started: read back in the background
                self._prefill_task = asyncio.create_task(self._prefill(self.window, self.hub.last_seq),
                                                         name="wsgateway-window-prefill")
        self._sub = await self._subscribe(last + 1)
        self.consuming = True
        self.started = True
        self._watchdog_task = asyncio.create_task(self._watchdog(), name="wsgateway-consumer-watchdog")
        log.info("consuming %s.> from stream %s after seq %d", s.subject_prefix, s.stream, last)

    async def _prefill(self, window: RecentWindow, upto: int) -> None:
        """Fill the recent window with the stream's newest events up to `upto` (where consuming began),
        so resumes on a freshly started instance are served from memory too; a failure only means they
        read JetStream."""
        assert self.js is not None
        s = self.settings
        reader = StreamReader(self.js, s.stream)
        try:
            info = await self.js.stream_info(s.stream)
            st = info.state
            if not st.messages:
                return
            size = 3 * (st.bytes // st.messages) + ENTRY_OVERHEAD  # an entry's cost (core/window.py)
            start = max(int(st.first_seq) - 1, upto - window.max_bytes // max(1, size), 0)
            older: list[Entry] = []
            async for batch in reader.read(f"{s.subject_prefix}.>", start, upto=upto, batch=1024):
                for ev in batch:
                    try:
                        older.append(Entry(ev.seq, parse_event(ev.data, ev.subject, s.subject_prefix), ev.data))
                    except InvalidEvent:
                        continue  # never delivered, never replayed
            taken = window.prepend(older, start, upto)
            log.info("recent window: %d events read back from the stream (after seq %d)", taken, window.floor)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("recent window not filled from the stream (%s: %s): older cursors read JetStream",
                        type(exc).__name__, exc)

    def _start_acl_watch(self, kv: KeyValue) -> None:
        """(Re)start following the ACL bucket; a restart reloads every document and re-checks everything."""
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.create_task(
            watch_acl(kv, self.acl, self._acl_changed, self.acl_ready), name="wsgateway-acl-watch"
        )

    def _acl_changed(self, tenant: str | None) -> None:
        if tenant is None:
            self.hub.recheck_all()
        else:
            self.hub.recheck(tenant=tenant)

    async def _subscribe(self, start: int) -> JetStreamContext.PushSubscription:
        assert self.js is not None
        s = self.settings
        return await self.js.subscribe(
            f"{s.subject_prefix}.>",
            stream=s.stream,
            cb=self._on_msg,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                inactive_threshold=30.0,
            ),
            idle_heartbeat=2.0,
        )

    def check_consumer(self, why: str) -> None:
        """The consumer may be gone: not ready until it is verified, or re-created from the hub's cursor."""
        if self._stopping or self._sub is None or (self._recover_task and not self._recover_task.done()):
            return
        self.consuming = False
        self._recover_task = asyncio.create_task(self._recover(why), name="wsgateway-consumer-recover")

    async def _recover(self, why: str) -> None:
        delay = 0.1
        while not self._stopping:
            assert self._sub is not None
            try:
                try:
                    await self._sub.consumer_info()
                    self.consuming = True  # still there; a gap is the ordered consumer's own business
                    return
                except NotFoundError:
                    pass
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
                self._sub = await self._subscribe(self.hub.last_seq + 1)
                self.consuming = True
                log.warning("consumer re-created after seq %d (%s)", self.hub.last_seq, why)
                return
            except Exception as exc:
                log.warning("consumer check failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _watchdog(self, every: float = 1.0) -> None:
        """Catches a consumer lost WITHOUT a reconnect (e.g. its cluster node died) within `every` seconds.

        The same answer refreshes wsgateway_consumer_lag, which events alone only update when one arrives
        (a consumer that stopped receiving would otherwise show its last, stale lag)."""
        while not self._stopping:
            await asyncio.sleep(every)
            if self._sub is None or not self.consuming or not (self.nc and self.nc.is_connected):
                continue
            try:
                info = await self._sub.consumer_info()
                if info.num_pending is not None:
                    self.metrics.consumer_lag.set(info.num_pending)
            except NotFoundError:
                self.check_consumer("consumer gone")
            except Exception:
                pass

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        self.metrics.consumer_lag.set(meta.num_pending)
        if seq <= self.hub.last_seq:
            return  # redelivered after a consumer reset or re-creation: already handled, don't parse again
        self.metrics.events_received.inc()
        if self.tracer is not None:
            self._deliver_traced(self.tracer, msg, seq)
            return
        try:
            env = parse_event(msg.data, msg.subject, self.settings.subject_prefix)
        except InvalidEvent as exc:
            self._invalid(seq, msg.subject, exc)
            return
        if self.window is not None:
            self.window.add(seq, env, msg.data)
        self.hub.dispatch(seq, env, msg.data)

    def _deliver_traced(self, tracer: Tracer, msg: Msg, seq: int) -> None:
        """The untraced path above inside ONE `deliver` span per event, child of the publisher's span
        (never a span per connection: fan-out to thousands would cost more than the delivery)."""
        hub = self.hub
        with tracing.deliver_span(tracer, msg.headers, seq) as span:
            try:
                env = parse_event(msg.data, msg.subject, self.settings.subject_prefix)
            except InvalidEvent as exc:
                self._invalid(seq, msg.subject, exc)
                tracing.record_invalid(span, exc.reason)
                return
            if self.window is not None:
                self.window.add(seq, env, msg.data)
            denied, coalesced, closed = hub.denied_total, hub.coalesced_total, hub.slow_closed_total
            recipients = hub.dispatch(seq, env, msg.data)
            tracing.record_delivery(
                span, env, recipients, hub.denied_total - denied, hub.coalesced_total - coalesced,
                hub.slow_closed_total - closed,
            )

    def _invalid(self, seq: int, subject: str, exc: InvalidEvent) -> None:
        self.hub.skip(seq)
        self.metrics.events_invalid.labels(exc.reason).inc()
        self._log_invalid(seq, subject, exc)

    def _log_invalid(self, seq: int, subject: str, exc: InvalidEvent) -> None:
        now = time.monotonic()
        if now - self._last_invalid_log >= 1.0:
            more = f" (+{self._invalid_unlogged} more since last log)" if self._invalid_unlogged else ""
            log.warning("invalid event seq=%d subject=%s: %s: %s%s", seq, subject, exc.reason, exc.message, more)
            self._last_invalid_log = now
            self._invalid_unlogged = 0
        else:
            self._invalid_unlogged += 1
