"""Presence across instances: this instance's entries and heartbeat in the presence bucket, and the watch
that brings every other instance's into `Presence`.

The bucket (`WSGATEWAY_PRESENCE_BUCKET`, memory storage, history 1) holds two kinds of keys:

* `i.<instance>`: the instance's heartbeat, written every third of `WSGATEWAY_PRESENCE_TTL_S`;
* `m.<instance>.<tenant>.<kind>.<id>`: the instance's entry for one scope (its listed members with their
  connection counts, and the runs its consumer saw start), written when it changes (at most once per
  flush interval) and deleted when it becomes empty.

Every instance watches the whole bucket (one ordered consumer: the current value of every key first,
then every change as it happens), so a change reaches the other instances at once. An instance that is
not heard of (no heartbeat, no entry) for the TTL is dead: every instance drops its entries (its
members leave, within 4/3 of the TTL of the kill), and the first live instance by id deletes its keys
from the bucket. An instance that finds its own keys deleted (it was taken for dead, or the NATS
server lost the bucket's memory) writes them again; after a reconnect it writes everything again.
A graceful stop deletes this instance's keys, so its members leave at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from gateway import provisioning
from gateway.config import Settings
from gateway.core.presence import INSTANCE_RE, Entry, Key, Presence, kv_key, parse_kv_key
from gateway.logs import BackoffLog
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

CHUNK = 256  # writes in flight at once
PURGE_EVERY_S = 300.0  # delete markers older than the TTL are removed (by the first live instance) this often


async def ensure_presence_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    config = provisioning.presence_bucket_config(settings.presence_bucket, replicas=settings.stream_replicas)
    return await provisioning.open_bucket(js, config, create=settings.create_stream, what="presence bucket")


class PresenceSync:
    """The I/O side of presence: write this instance's entries and heartbeat, follow everyone else's."""

    def __init__(self, settings: Settings, presence: Presence, metrics: Metrics) -> None:
        self.settings = settings
        self.presence = presence
        self.metrics = metrics
        self.kv: KeyValue | None = None
        self.js: JetStreamContext | None = None
        self._pending: dict[str, bytes | None] = {}  # key -> value (None: delete), the latest wins
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected: Callable[[], bool] = lambda: True
        self._side: set[asyncio.Task[None]] = set()  # bucket writes running beside the heartbeat loop
        self._failures = BackoffLog()
        presence.publish = self._publish

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self, js: JetStreamContext, connected: Callable[[], bool]) -> None:
        """Create the bucket if allowed, write the heartbeat, read every instance's entries once, then follow.
        `connected` says whether NATS is reachable now (while it is not, nobody is taken for dead)."""
        for t in self._tasks:  # a retried start-up
            t.cancel()
        self.js = js
        self._connected = connected
        self.kv = await ensure_presence_bucket(js, self.settings)
        await self._heartbeat()
        loaded = asyncio.Event()
        self._restart_watch(loaded)
        await asyncio.wait_for(loaded.wait(), timeout=30)
        self._tasks = [
            asyncio.create_task(self._writer(), name="wsgateway-presence-writer"),
            asyncio.create_task(self._beat(), name="wsgateway-presence-heartbeat"),
        ]

    def reconnected(self) -> None:
        """After a NATS reconnect: follow the bucket again and write everything again (a restarted server has
        lost the memory bucket's contents); the others get a fresh TTL, since nobody was heard meanwhile."""
        if self.kv is None or self._stopping:
            return
        self.presence.grace(time.monotonic())
        self._restart_watch(asyncio.Event(), rewrite=True)

    async def stop(self) -> None:
        """Graceful: this instance's keys are deleted (the others' watches see its members and runs go at once),
        then purged with its heartbeat."""
        self._stopping = True
        for t in [*self._tasks, self._watch_task, *self._side]:  # no write of ours in flight after this
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._tasks = []
        if self.kv is not None and self._connected():  # NATS down: the others will find us dead instead
            self.presence.flush()
            self._pending = {k: None for k in self._pending}
            for key in self.presence.entries():
                self._pending[kv_key(self.presence.instance, key)] = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain(), timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._delete_instance(self.presence.instance), timeout=2)

    # --- writing ---------------------------------------------------------------------------------

    def _publish(self, key: Key, raw: bytes | None) -> None:
        self._pending[kv_key(self.presence.instance, key)] = raw
        self._wake.set()

    async def _writer(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()

    async def _drain(self) -> None:
        """Write what is pending, CHUNK writes in flight at once. While NATS is unreachable nothing is tried:
        the reconnect writes everything again. A failed write is retried (unless a newer value came meanwhile),
        its failures logged at most once per back-off interval."""
        kv = self.kv
        while self._pending and kv is not None and self._connected():
            batch = list(self._pending.items())[:CHUNK]
            for k, _ in batch:
                del self._pending[k]
            results = await asyncio.gather(*(self._write(kv, k, v) for k, v in batch), return_exceptions=True)
            failed = [(k, v) for (k, v), r in zip(batch, results, strict=True) if r is not None]
            for k, v in failed:
                self._pending.setdefault(k, v)
            self.metrics.presence_kv_writes.inc(len(batch) - len(failed))
            if not failed:
                self._failures.reset()
                continue
            self.metrics.presence_kv_errors.inc(len(failed))
            report = self._failures.failed()
            if report is not None:
                log.warning("presence: %d bucket write(s) failed (%r); retrying (%d failed rounds since the last "
                            "report)", len(failed), next(r for r in results if r is not None), report[0])
            await asyncio.sleep(0.5)

    @staticmethod
    async def _write(kv: KeyValue, key: str, value: bytes | None) -> None:
        if value is None:
            await kv.delete(key)
        else:
            await kv.put(key, value)

    async def _heartbeat(self) -> None:
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await self.kv.put(f"i.{self.presence.instance}", orjson.dumps({"t": time.time()}))

    async def _delete_instance(self, instance: str) -> None:
        """Remove an instance's keys from the bucket (no delete markers: the watchers drop it themselves)."""
        if self.js is None or self.kv is None:
            return
        stream = f"KV_{self.settings.presence_bucket}"
        prefix = f"$KV.{self.settings.presence_bucket}"
        await self.js.purge_stream(stream, subject=f"{prefix}.m.{instance}.>")
        await self.js.purge_stream(stream, subject=f"{prefix}.i.{instance}")

    async def _beat(self) -> None:
        """Every sixth of the TTL the sweep of dead instances, every third the heartbeat; a dead instance is
        dropped within TTL + TTL/6 of its last heartbeat, so within 4/3 of the TTL of its end. The bucket
        writes run beside the loop, so a slow NATS does not slow the sweep."""
        ttl = self.settings.presence_ttl_s
        tick = ttl / 6
        started = last_purge = last_tick = last_beat = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_tick > ttl:  # this loop was stalled: the others may have taken us for dead
                for key, raw in self.presence.entries().items():
                    self._publish(key, raw)
            last_tick = now
            if now - last_beat >= ttl / 3 - tick / 2:
                last_beat = now
                self._background(self._heartbeat())
            if not self._connected():  # nobody can be heard: nobody is taken for dead
                self.presence.grace(now)
                continue
            dead = self.presence.sweep(now)
            alive = self.presence.alive()
            self.metrics.presence_instances.set(len(alive))
            leader = alive[0] == self.presence.instance
            if dead:
                log.info("presence: instance(s) %s not heard of for %.1fs: their watchers left",
                         ", ".join(sorted(dead)), ttl)
                if leader:
                    for inst in dead:
                        self._background(self._delete_instance(inst))
            if leader and self.kv is not None and now - max(last_purge, started) > PURGE_EVERY_S:
                last_purge = now
                self._background(self.kv.purge_deletes(olderthan=max(1, int(ttl))))

    def _background(self, work: Coroutine[Any, Any, object]) -> None:
        """A bucket write beside the loop. A failure is not fatal: the next heartbeat comes a third of the TTL
        later, and a dead instance's leftover keys are dropped again, after the TTL, by whoever reads them."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                await work

        task = asyncio.create_task(run())
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    # --- following -------------------------------------------------------------------------------

    def _restart_watch(self, loaded: asyncio.Event, *, rewrite: bool = False) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.create_task(self._keep_following(loaded, rewrite), name="wsgateway-presence-watch")

    async def _keep_following(self, loaded: asyncio.Event, rewrite: bool) -> None:
        """Follow the bucket until stopped; a watch that fails (the bucket gone with a restarted server, a
        timeout) is started again, the bucket re-created if allowed and this instance's part written again."""
        delay = 0.2
        while not self._stopping:
            try:
                if rewrite:
                    assert self.js is not None
                    self.kv = await ensure_presence_bucket(self.js, self.settings)
                    await self._heartbeat()
                    for key, raw in self.presence.entries().items():
                        self._publish(key, raw)
                    self._wake.set()  # also what waited while NATS was unreachable (a delete, say)
                await self._follow(loaded)
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence: following the bucket failed (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            rewrite = True

    async def _follow(self, loaded: asyncio.Event) -> None:
        assert self.kv is not None
        watcher = await self.kv.watchall()
        presence = self.presence
        me = presence.instance
        try:
            async for entry in watcher:
                if entry is None:
                    presence.synced = True
                    loaded.set()
                    continue
                now = time.monotonic()
                deleted = entry.operation in ("DEL", "PURGE")
                key = entry.key
                if key.startswith("i."):
                    inst = key[2:]
                    if inst == me:
                        if deleted and not self._stopping:
                            asyncio.get_running_loop().create_task(self._heartbeat())
                    elif INSTANCE_RE.fullmatch(inst) and not deleted:
                        presence.heartbeat(inst, now)
                    continue
                parsed = parse_kv_key(key)
                if parsed is None:
                    continue
                inst, scope_key = parsed
                if inst == me:
                    # our own entry deleted by someone else (we were taken for dead): write it again
                    raw = presence.entry_of(scope_key) if deleted and not self._stopping else None
                    if raw is not None:
                        self._publish(scope_key, raw)
                    continue
                value = None if deleted or entry.value is None else Entry.decode(entry.value)
                presence.apply(inst, scope_key, value, now)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()


__all__ = ["PresenceSync", "ensure_presence_bucket"]
