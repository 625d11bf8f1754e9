"""Faults that lossless resume must survive, with real processes: a gateway SIGKILLed mid-stream, a
nats-server restarted under its clients, a JetStream cluster losing a node while events are published.

The client in every test is the package's `GatewayClient` (reconnect with `?since=<cursor>`, de-dup by
seq), so that is what these tests prove. The publisher publishes at a steady rate throughout and retries
a publish that failed with the SAME event id (the `Nats-Msg-Id`) until JetStream acks it, so every
logical event is stored once; "exactly the published sequence" means: the seqs the application received
equal the seqs of the publisher's acks, in order, each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import nats
import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from gateway.client import GatewayClient
from gateway.devtools.natsproc import NatsProcess
from gateway.sdk.publisher import Publisher, new_event_id
from tests.support.gateway import run_gateway, scrape_metric
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.procs import gateway_processes, nats_cluster, start_nats

ADMIN = {"admins": ["user:alice"]}
SCOPES = ["conversation:c1", "process:p1"]
RETRYABLE = (nats.errors.Error, TimeoutError, OSError)


async def _quiet(exc: Exception) -> None:
    """error_cb for the test's own NATS connections: connection errors during an outage are expected."""


# --- helpers ------------------------------------------------------------------------------------


class SteadyPublisher:
    """One logical event every `interval` seconds (alternating scopes) until stopped. A failed publish
    is retried with the same event id until acked; `acked` holds (seq, scope) in publish order."""

    def __init__(
        self, publisher: Publisher, scopes: Sequence[str], *, interval: float = 0.005,
        attempt_timeout: float = 1.0, max_stall: float = 30.0,
    ) -> None:
        self.publisher = publisher
        self.scopes = list(scopes)
        self.interval = interval
        self.attempt_timeout = attempt_timeout
        self.max_stall = max_stall
        self.acked: list[tuple[int, str]] = []
        self.acked_at: dict[int, float] = {}  # seq -> monotonic time of its ack
        self.failed_attempts = 0  # publishes that raised (and were retried)
        self.retried_events = 0  # logical events that needed more than one attempt
        self.duplicate_acks = 0  # retries answered "duplicate": an earlier attempt had been stored
        self.last_error: BaseException | None = None
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def seqs(self) -> list[int]:
        return [s for s, _ in self.acked]

    def seqs_of(self, scope: str) -> list[int]:
        return [s for s, sc in self.acked if sc == scope]

    def start(self) -> SteadyPublisher:
        self.task = asyncio.create_task(self._run(), name="steady-publisher")
        return self

    async def stop(self, timeout: float = 40.0) -> None:
        """Stop after the event in flight is acked (never abandons an unacked event)."""
        self._stop.set()
        if self.task is not None:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        i = 0
        while not self._stop.is_set():
            scope = self.scopes[i % len(self.scopes)]
            event_id = new_event_id()
            deadline = loop.time() + self.max_stall
            attempts = 0
            while True:
                attempts += 1
                try:
                    ack = await self.publisher.publish(
                        tenant="acme", scope=scope, type="test.tick", data={"i": i}, event_id=event_id,
                        timeout=self.attempt_timeout,
                    )
                    break
                except RETRYABLE as exc:
                    self.failed_attempts += 1
                    self.last_error = exc
                    if loop.time() > deadline:
                        raise AssertionError(f"event #{i} not acked within {self.max_stall}s: {exc!r}") from exc
                    await asyncio.sleep(0.05)
            if attempts > 1:
                self.retried_events += 1
            if ack.duplicate:
                self.duplicate_acks += 1
            self.acked.append((int(ack.seq), scope))
            self.acked_at[int(ack.seq)] = time.monotonic()
            i += 1
            await asyncio.sleep(self.interval)


class Recorder:
    """Runs a GatewayClient and records the seqs of the event frames the application is handed."""

    def __init__(self, client: GatewayClient, name: str) -> None:
        self.client = client
        self.name = name
        self.seqs: list[int] = []
        self.received_at: dict[int, float] = {}  # seq -> monotonic time the application got it
        self.controls: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Recorder:
        self.task = asyncio.create_task(self._run(), name=f"recorder-{self.name}")
        return self

    async def _run(self) -> None:
        async for frame in self.client.frames():
            if frame["type"] == "event":
                self.seqs.append(int(frame["seq"]))
                self.received_at[self.seqs[-1]] = time.monotonic()
            else:
                self.controls.append(frame)

    def summary(self) -> str:
        c = self.client
        return (f"{self.name}: {len(self.seqs)} events (last {self.seqs[-1] if self.seqs else None}), "
                f"connects={c.connects}, last_close={c.last_close}, url={c.url}")

    async def close(self) -> None:
        await self.client.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, 5)


async def until(
    cond: Callable[[], bool], timeout: float, what: str, *, watch: Sequence[asyncio.Task[Any] | None] = (),
    info: Callable[[], str] = lambda: "",
) -> float:
    """Poll `cond` until true (returns the seconds it took); fails early if a watched task died."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        for t in watch:
            if t is not None and t.done():
                exc = None if t.cancelled() else t.exception()
                raise AssertionError(f"{t.get_name()} ended while waiting for {what}: {exc!r}\n{info()}")
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{info()}")
        await asyncio.sleep(0.02)
    return loop.time() - start


async def until_ok(call: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Retry a NATS call until it succeeds (e.g. while a JetStream cluster elects its leaders)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            if loop.time() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout}s: {exc!r}") from exc
            await asyncio.sleep(0.2)


async def readyz(http: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=2) as c:
        r = await c.get(f"{http}/readyz")
        return r.status_code, r.json()


async def wait_readiness(http: str, status: int, timeout: float) -> tuple[float, dict[str, Any]]:
    """Poll /readyz until it answers `status`; returns (seconds it took, body)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    last: tuple[int, dict[str, Any]] | str = "no answer"
    while True:
        with contextlib.suppress(httpx.HTTPError):
            last = await readyz(http)
            if last[0] == status:
                return loop.time() - start, last[1]
        if loop.time() - start > timeout:
            raise AssertionError(f"/readyz did not answer {status} within {timeout}s; last: {last}")
        await asyncio.sleep(0.05)


async def caught_up(recorders: Sequence[Recorder], expected: Callable[[Recorder], list[int]], timeout: float,
                    pub: SteadyPublisher) -> None:
    """Wait until each client has (at least) its expected last event, then a little longer for strays."""
    def done() -> bool:
        return all(not expected(r) or (r.seqs and r.seqs[-1] >= expected(r)[-1]) for r in recorders)

    await until(done, timeout, "the clients to catch up", watch=[r.task for r in recorders],
                info=lambda: "\n".join([r.summary() for r in recorders] + [f"published {len(pub.acked)}"]))
    await asyncio.sleep(0.3)  # anything extra (a duplicate, a stray) would arrive now


def worst_latency(pub: SteadyPublisher, rec: Recorder, since: float) -> float:
    """The longest ack-to-application delay of the events acked after `since` (monotonic)."""
    return max((rec.received_at[s] - t for s, t in pub.acked_at.items() if t >= since and s in rec.received_at),
               default=0.0)


class ReadinessLog:
    """Samples in-process gateways' readiness every 50 ms (to tell how long they said "ready" while stalled)."""

    def __init__(self, gateways: dict[str, Any]) -> None:
        self.gateways = gateways
        self.samples: list[tuple[float, str, bool]] = []
        self.task = asyncio.create_task(self._run(), name="readiness-log")

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            for name, g in self.gateways.items():
                self.samples.append((now, name, all(g.gateway.readiness().values())))
            await asyncio.sleep(0.05)

    def ready_share(self, name: str, start: float, end: float) -> float:
        window = [ok for t, n, ok in self.samples if n == name and start <= t <= end]
        return sum(window) / len(window) if window else 1.0

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def worst_delivery_after(pub: SteadyPublisher, rec: Recorder, since: float) -> tuple[float, float]:
    """Of the events acked after `since`, the longest ack-to-application delay, and when that event arrived."""
    seq, acked = max(((s, t) for s, t in pub.acked_at.items() if t >= since and s in rec.received_at),
                     key=lambda st: rec.received_at[st[0]] - st[1])
    return rec.received_at[seq] - acked, rec.received_at[seq]


def diff(got: list[int], want: list[int]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    return (f"got {len(got)}, want {len(want)}; missing {missing[:20]}{'...' if len(missing) > 20 else ''}; "
            f"extra {extra[:20]}; ordered={got == sorted(got)}")


async def stream_state(js: JetStreamContext) -> tuple[int, int]:
    info = await js.stream_info("EVENTS")
    return int(info.state.messages), int(info.state.last_seq)


# --- 1. a gateway process SIGKILLed mid-stream; the client resumes on another instance ------------


@pytest.mark.timeout(60)
async def test_gateway_sigkilled_mid_stream_client_resumes_on_second_instance(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    async with gateway_processes(2, nats_server.url, idp.issuer, idp.audience) as (a, b):
        await platform.grant("acme.org", ADMIN)
        client = GatewayClient(a.ws, token=idp.mint("alice"), scopes=SCOPES, since=0)
        rec = Recorder(client, "client").start()
        pub = SteadyPublisher(platform.publisher, SCOPES).start()
        watch = [rec.task, pub.task]
        try:
            await until(lambda: len(rec.seqs) >= 100, 20, "100 events through gateway A", watch=watch,
                        info=rec.summary)
            assert client.connects == 1
            a.kill()  # SIGKILL: no close frame, no drain; A's sockets just die
            # A load balancer would now send the reconnect elsewhere: the client's next connect goes to B.
            # Set before the event loop runs again, so GatewayClient's own reconnect (with its cursor) does it.
            client.url = b.ws
            cursor_at_kill, published_at_kill = client.cursor, len(pub.acked)
            await until(lambda: client.connects == 2, 10, "the client to reconnect (to B)", watch=watch,
                        info=rec.summary)
            close_from_a = client.last_close
            await until(lambda: len(rec.seqs) >= published_at_kill + 150, 20, "150 more events through B",
                        watch=watch, info=rec.summary)
            await pub.stop()
            await caught_up([rec], lambda r: pub.seqs, 20, pub)
        finally:
            await rec.close()
            with contextlib.suppress(Exception):
                await pub.stop(5)
        assert not a.alive
        assert rec.seqs == pub.seqs, diff(rec.seqs, pub.seqs)
        assert client.connects == 2, rec.summary()
        assert close_from_a is not None and close_from_a[0] == 1006, close_from_a  # abnormal: no close frame
        assert cursor_at_kill is not None and cursor_at_kill < pub.seqs[-1]
        # B served the resumed connection, and replayed what A never delivered
        assert await scrape_metric(b.http, "wsgateway_connection_attempts_total", {"outcome": "accepted"}) == 1
        assert await scrape_metric(b.http, "wsgateway_events_replayed_total") > 0
        assert await stream_state(platform.js) == (len(pub.seqs), pub.seqs[-1])


# --- 2. nats-server restarted (same port, same store) under connected clients --------------------


@pytest.mark.timeout(60)
async def test_nats_restart_same_store_gateway_recovers_by_itself_and_clients_lose_nothing(
    idp: TestIdP, tmp_path: Any
) -> None:
    natsd = NatsProcess(free_port(), tmp_path / "nats")
    await start_nats(natsd)
    try:
        nc = await nats.connect(natsd.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1, connect_timeout=2,
                                error_cb=_quiet)
        platform = Platform(nc)
        try:
            async with run_gateway(natsd.url, idp.issuer, audience=idp.audience) as g:
                await platform.grant("acme.org", ADMIN)
                token = idp.mint("alice")
                every = Recorder(GatewayClient(g.ws, token=token, scopes=["*"], since=0), "all").start()
                one = Recorder(GatewayClient(g.ws, token=token, scopes=["conversation:c1"], since=0), "c1").start()
                pub = SteadyPublisher(platform.publisher, SCOPES, attempt_timeout=0.5).start()
                recs = [every, one]
                watch = [every.task, one.task, pub.task]

                def info() -> str:
                    return "\n".join([r.summary() for r in recs] + [
                        f"published {len(pub.acked)} (failed attempts {pub.failed_attempts}, "
                        f"last error {pub.last_error!r})",
                        f"gateway readiness {g.gateway.readiness()}"])

                try:
                    await until(lambda: len(every.seqs) >= 100 and len(one.seqs) >= 50, 20,
                                "events before the outage", watch=watch, info=info)
                    await asyncio.to_thread(natsd.stop)
                    down_at = len(pub.acked)  # the server has exited: nothing can be acked until it is back
                    took, body = await wait_readiness(g.http, 503, 5)
                    assert body["nats_connected"] is False, body
                    await asyncio.sleep(1.5)  # the outage: the publisher keeps trying
                    assert len(pub.acked) <= down_at + 1, "acked while nats-server was down?"
                    await start_nats(natsd)
                    restarted = time.monotonic()
                    back, body = await wait_readiness(g.http, 200, 20)
                    ready_again = time.monotonic()
                    assert all(body.values()), body
                    after = len(pub.acked)
                    # the gateway's ordered consumer must deliver again: new events reach both clients
                    await until(lambda: len(pub.acked) >= after + 150 and every.seqs[-1] >= pub.acked[after + 100][0],
                                25, "delivery after the restart", watch=watch, info=info)
                    delivering = time.monotonic() - restarted
                    await pub.stop()
                    await caught_up(recs, lambda r: pub.seqs if r is every else pub.seqs_of("conversation:c1"),
                                    20, pub)
                finally:
                    for r in recs:
                        await r.close()
                    with contextlib.suppress(Exception):
                        await pub.stop(5)
                stall = max(worst_latency(pub, r, ready_again) for r in recs)
                print(f"\n[nats restart] 503 after {took:.2f}s; 200 again {back:.2f}s after start; "
                      f"delivering {delivering:.2f}s after start; failed publish attempts {pub.failed_attempts}, "
                      f"retried events {pub.retried_events}, duplicate acks {pub.duplicate_acks}; "
                      f"worst delay of an event acked after /readyz=200: {stall:.2f}s")
                assert pub.retried_events >= 1  # some events were published during the outage
                assert every.seqs == pub.seqs, diff(every.seqs, pub.seqs)
                assert one.seqs == pub.seqs_of("conversation:c1"), diff(one.seqs, pub.seqs_of("conversation:c1"))
                assert every.client.connects == 1 and one.client.connects == 1  # no client had to reconnect
                assert await stream_state(platform.js) == (len(pub.seqs), pub.seqs[-1])
                # Ready means delivering: once /readyz says 200 (`consumer_live: true`) again, live events must
                # flow, not wait for the client library to notice, heartbeats later, that the consumer is gone.
                assert stall < 1.0, (
                    f"/readyz answered 200 (consumer_live: true) {back:.2f}s after nats-server came back, but events "
                    f"acked after that reached the clients only up to {stall:.2f}s later: the ordered consumer died "
                    f"with the server (it is an in-memory R1 consumer) and was re-created only when nats-py's "
                    f"heartbeat check (2 x idle_heartbeat) noticed")
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(natsd.cleanup)


# --- 3. a 3-node JetStream cluster (R3 stream) loses a node while events are published -------------


async def _stream_leader(js: JetStreamContext, timeout: float = 20.0) -> str:
    """The stream's leader, once it has one and every replica is current."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(*RETRYABLE):
            c = (await js.stream_info("EVENTS")).cluster
            if c is not None and c.leader and c.replicas and len(c.replicas) == 2 \
                    and all(r.current for r in c.replicas):
                return c.leader
        if loop.time() > deadline:
            raise AssertionError("stream EVENTS has no leader with current replicas")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(80)
async def test_cluster_node_killed_during_publishing_r3_stream_loses_nothing(idp: TestIdP, tmp_path: Any) -> None:
    with nats_cluster(tmp_path) as cluster:
        nc = await nats.connect(servers=cluster.urls, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                connect_timeout=2, error_cb=_quiet)
        try:
            js = nc.jetstream(timeout=2)
            await until_ok(js.account_info, 30, "JetStream meta leader")
            await until_ok(lambda: js.add_stream(StreamConfig(
                name="EVENTS", subjects=["events.>"], storage=StorageType.FILE, num_replicas=3,
                duplicate_window=120.0)), 20, "create the R3 stream")
            await until_ok(lambda: js.create_key_value(bucket="wsgateway-acl", history=1, replicas=3), 20,
                           "create the R3 ACL bucket")
            await _stream_leader(js)
            urls = ",".join(cluster.urls)
            async with run_gateway(urls, idp.issuer, audience=idp.audience, stream_replicas=3) as g1, \
                    run_gateway(urls, idp.issuer, audience=idp.audience, stream_replicas=3) as g2:
                platform = Platform(nc)
                await platform.grant("acme.org", ADMIN)
                by_port = {n.port: n.server_name for n in cluster.nodes}

                def node_of(g: Any) -> str:
                    bus_nc = g.gateway.bus.nc
                    return by_port.get(bus_nc.connected_url.port, "?") if bus_nc and bus_nc.connected_url else "?"

                # The victim is the stream leader: publishes fail until a new one is elected (and a gateway's
                # ordered consumer, an in-memory R1 consumer, dies with it if it was placed there). Leadership is
                # first stepped over to gateway 1's node (bounded tries), so the same kill cuts gateway 1's NATS
                # connection too.
                g1_node = node_of(g1)
                leader = await _stream_leader(js)
                deadline = asyncio.get_running_loop().time() + 12
                while leader != g1_node and asyncio.get_running_loop().time() < deadline:
                    with contextlib.suppress(*RETRYABLE):
                        await nc.request("$JS.API.STREAM.LEADER.STEPDOWN.EVENTS", b"", timeout=2)
                    await asyncio.sleep(0.5)
                    leader = await _stream_leader(js)
                victim = leader
                homes = sorted(ci.cluster.leader or "?" for ci in await js.consumers_info("EVENTS") if ci.cluster)
                token = idp.mint("alice")
                r1 = Recorder(GatewayClient(g1.ws, token=token, scopes=["*"], since=0), "client@g1").start()
                r2 = Recorder(GatewayClient(g2.ws, token=token, scopes=["*"], since=0), "client@g2").start()
                pub = SteadyPublisher(platform.publisher, SCOPES, attempt_timeout=1.0, max_stall=40).start()
                recs = [r1, r2]
                watch = [r1.task, r2.task, pub.task]
                readiness = ReadinessLog({"g1": g1, "g2": g2})

                def info() -> str:
                    return "\n".join([r.summary() for r in recs] + [
                        f"published {len(pub.acked)} (failed attempts {pub.failed_attempts}, "
                        f"last error {pub.last_error!r})",
                        f"g1 on {node_of(g1)} ready={g1.gateway.readiness()}",
                        f"g2 on {node_of(g2)} ready={g2.gateway.readiness()}"])

                try:
                    await until(lambda: len(r1.seqs) >= 100 and len(r2.seqs) >= 100, 20,
                                "events before the kill", watch=watch, info=info)
                    g2_node = node_of(g2)
                    killed_at = time.monotonic()
                    await asyncio.to_thread(cluster.node(victim).kill)
                    at_kill = len(pub.acked)
                    await until(lambda: len(pub.acked) >= at_kill + 150, 40, "publishing to resume after the kill",
                                watch=watch, info=info)
                    publishing = time.monotonic() - killed_at
                    await until(lambda: all(r.seqs and r.seqs[-1] >= pub.acked[at_kill + 100][0] for r in recs),
                                30, "both clients to get events published after the kill", watch=watch, info=info)
                    delivering = time.monotonic() - killed_at
                    await pub.stop()
                    await caught_up(recs, lambda r: pub.seqs, 30, pub)
                finally:
                    await readiness.close()
                    for r in recs:
                        await r.close()
                    with contextlib.suppress(Exception):
                        await pub.stop(5)
                stalls = []
                for name, r in (("g1", r1), ("g2", r2)):
                    delay, got_at = worst_delivery_after(pub, r, killed_at)
                    stalls.append(f"{name}: worst post-kill event delivered {delay:.2f}s after its ack, gateway "
                                  f"ready {readiness.ready_share(name, killed_at, got_at):.0%} of the time until then")
                print(f"\n[cluster] killed stream leader {victim} (g1 on {g1_node}, g2 on {g2_node}, "
                      f"consumers on {homes}); "
                      f"publishing again after {publishing:.2f}s, both clients delivering after {delivering:.2f}s; "
                      f"{'; '.join(stalls)}; failed publish attempts {pub.failed_attempts}, retried events "
                      f"{pub.retried_events}, duplicate acks {pub.duplicate_acks}; now g1 on {node_of(g1)}, "
                      f"g2 on {node_of(g2)}")
                assert pub.failed_attempts >= 1  # the kill interrupted publishing (no stream leader for a while)
                assert r1.seqs == pub.seqs, diff(r1.seqs, pub.seqs)
                assert r2.seqs == pub.seqs, diff(r2.seqs, pub.seqs)
                assert r1.seqs == r2.seqs
                assert node_of(g1) != victim
                assert await until_ok(lambda: stream_state(js), 10, "stream info") == (len(pub.seqs), pub.seqs[-1])
        finally:
            await nc.close()


async def test_revocation_after_a_nats_restart_takes_effect_at_once(tmp_path: Any, idp: TestIdP) -> None:
    """The ACL watch is re-established with the connection: a revocation right after an outage is not
    left waiting for a consumer heartbeat timeout."""
    from tests.support.wsclient import connect, recv, recv_type, welcome

    natsd = NatsProcess(free_port(), tmp_path / "nats")
    natsd.start()
    try:
        async with run_gateway(natsd.url, idp.issuer, audience=idp.audience) as g:
            platform = await Platform.connect(natsd.url)
            await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
            ws = await connect(f"{g.ws}?scope=conversation:c1", idp.mint("mia"))
            await welcome(ws)
            assert (await recv_type(ws, "subscribed"))["scope"] == "conversation:c1"
            await platform.close()
            natsd.stop()
            natsd.start()
            async with httpx.AsyncClient() as c:
                for _ in range(200):
                    if (await c.get(f"{g.http}/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            platform = await Platform.connect(natsd.url)
            t0 = time.monotonic()
            await platform.grant("acme.conversation.c1", {"members": ["user:someone-else"]})
            assert await recv(ws, 10) == {"type": "revoked", "scope": "conversation:c1"}
            took = time.monotonic() - t0
            assert took < 2.0, f"revocation took {took:.1f}s after the restart"
            await ws.close()
            await platform.close()
    finally:
        natsd.cleanup()
