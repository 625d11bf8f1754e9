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
from typing import Any, TypeVar

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
from tests.support.platform import Platform, until_scopes
from tests.support.ports import free_port
from tests.support.procs import gateway_processes, nats_cluster, start_nats
from tests.support.wait import HANG_S, eventually

ADMIN = {"admins": ["user:alice"]}
SCOPES = ["conversation:c1", "process:p1"]
RETRYABLE = (nats.errors.Error, TimeoutError, OSError)
T = TypeVar("T")


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

    async def marker(self, scope: str = "conversation:c1") -> int:
        """After `stop`: one last event, which every client of these tests sees. Once a client has it, it
        has everything before it, and a duplicate or stray of anything earlier would have come first."""
        assert self._stop.is_set(), "stop the steady publishing first"
        return await self._publish_one(len(self.acked), scope)

    async def _publish_one(self, i: int, scope: str) -> int:
        """Publish logical event #i, retrying with the same event id until acked; record the ack."""
        loop = asyncio.get_running_loop()
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
                await asyncio.sleep(0.05)  # pacing of the retries, not a wait for anything
        if attempts > 1:
            self.retried_events += 1
        if ack.duplicate:
            self.duplicate_acks += 1
        self.acked.append((int(ack.seq), scope))
        self.acked_at[int(ack.seq)] = time.monotonic()
        return int(ack.seq)

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            await self._publish_one(i, self.scopes[i % len(self.scopes)])
            i += 1
            await asyncio.sleep(self.interval)  # the steady rate


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


def nats_call(call: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T | bool]]:
    """`call` as a condition for `eventually(..., ignore=RETRYABLE)`: retried until it succeeds (e.g. while
    a JetStream cluster elects its leaders); its result, or True for a result that is falsy."""
    async def attempt() -> T | bool:
        return (await call()) or True
    return attempt


async def readiness(http: str, status: int) -> dict[str, Any]:
    """Until /readyz answers `status`; returns its body."""
    last: list[object] = ["no answer"]
    async with httpx.AsyncClient(timeout=2) as c:

        async def answered() -> dict[str, Any] | None:
            r = await c.get(f"{http}/readyz")
            last[0] = (r.status_code, r.text)
            body: dict[str, Any] = r.json()
            return body if r.status_code == status else None

        body: dict[str, Any] | None = await eventually(
            answered, what=f"/readyz to answer {status}", interval=0.05, ignore=(httpx.HTTPError,),
            info=lambda: f"last /readyz answer: {last[0]}")
    assert body is not None
    return body


async def caught_up(recorders: Sequence[Recorder], expected: Callable[[Recorder], list[int]],
                    pub: SteadyPublisher) -> None:
    """After `pub.stop()`: publish the marker and wait until each client has its expected last event (the
    marker, for every client here). Anything extra (a duplicate, a stray) would have arrived before it."""
    await pub.marker()

    def done() -> bool:
        return all(not expected(r) or bool(r.seqs and r.seqs[-1] >= expected(r)[-1]) for r in recorders)

    await eventually(done, what="the clients to catch up", watch=[r.task for r in recorders],
                     info=lambda: "\n".join([r.summary() for r in recorders] + [f"published {len(pub.acked)}"]))


async def grant_admin(platform: Platform, token: str, *gateways: Any) -> None:
    """Make alice the org admin and wait until every gateway applied it (GET /v1/scopes says so).

    A client that subscribes before its gateway has the grant gets a pending subscription, which starts
    at the stream position of the grant: events published in between are (rightly) not its to see."""
    await platform.grant("acme.org", ADMIN)
    async with httpx.AsyncClient(timeout=2, headers={"Authorization": f"Bearer {token}"}) as c:
        for g in gateways:

            async def applied(http: str = g.http) -> bool:
                r = await c.get(f"{http}/v1/scopes")
                return r.status_code == 200 and r.json()["org_admin"] is True

            await eventually(applied, what=f"{g.http} to apply the admin grant", interval=0.05,
                             ignore=(httpx.HTTPError,))


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
        await grant_admin(platform, idp.mint("alice"), a, b)
        client = GatewayClient(a.ws, token=idp.mint("alice"), scopes=SCOPES, since=0)
        rec = Recorder(client, "client").start()
        pub = SteadyPublisher(platform.publisher, SCOPES).start()
        watch = [rec.task, pub.task]
        try:
            await eventually(lambda: len(rec.seqs) >= 100, what="100 events through gateway A", watch=watch,
                             info=rec.summary)
            assert client.connects == 1
            a.kill()  # SIGKILL: no close frame, no drain; A's sockets just die
            # A load balancer would now send the reconnect elsewhere: the client's next connect goes to B.
            # Set before the event loop runs again, so GatewayClient's own reconnect (with its cursor) does it.
            client.url = b.ws
            cursor_at_kill, published_at_kill = client.cursor, len(pub.acked)
            await eventually(lambda: client.connects == 2, what="the client to reconnect (to B)", watch=watch,
                             info=rec.summary)
            close_from_a = client.last_close
            await eventually(lambda: len(rec.seqs) >= published_at_kill + 150, what="150 more events through B",
                             watch=watch, info=rec.summary)
            await pub.stop()
            await caught_up([rec], lambda r: pub.seqs, pub)
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
                token = idp.mint("alice")
                await grant_admin(platform, token, g)
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
                    await eventually(lambda: len(every.seqs) >= 100 and len(one.seqs) >= 50,
                                     what="events before the outage", watch=watch, info=info)
                    await asyncio.to_thread(natsd.stop)
                    down_at = len(pub.acked)  # the server has exited: nothing can be acked until it is back
                    body = await readiness(g.http, 503)
                    assert body["nats_connected"] is False, body
                    # the outage: the publisher keeps trying (and failing) for a few attempts
                    failed_at_down = pub.failed_attempts
                    await eventually(lambda: pub.failed_attempts >= failed_at_down + 3,
                                     what="publish attempts failing during the outage", watch=watch, info=info)
                    assert len(pub.acked) <= down_at + 1, "acked while nats-server was down?"
                    await start_nats(natsd)
                    body = await readiness(g.http, 200)
                    assert all(body.values()), body
                    after = len(pub.acked)
                    # the gateway's ordered consumer must deliver again: new events reach both clients
                    await eventually(
                        lambda: len(pub.acked) >= after + 150 and every.seqs[-1] >= pub.acked[after + 100][0],
                        what="delivery after the restart", watch=watch, info=info)
                    await pub.stop()
                    await caught_up(recs, lambda r: pub.seqs if r is every else pub.seqs_of("conversation:c1"), pub)
                finally:
                    for r in recs:
                        await r.close()
                    with contextlib.suppress(Exception):
                        await pub.stop(5)
                assert pub.retried_events >= 1  # some events were published during the outage
                assert every.seqs == pub.seqs, diff(every.seqs, pub.seqs)
                assert one.seqs == pub.seqs_of("conversation:c1"), diff(one.seqs, pub.seqs_of("conversation:c1"))
                assert every.client.connects == 1 and one.client.connects == 1  # no client had to reconnect
                assert await stream_state(platform.js) == (len(pub.seqs), pub.seqs[-1])
                # How soon events flow once /readyz says 200 again (it must not wait for nats-py's heartbeat
                # check to notice the lost in-memory consumer) is measured by bench/resilience.py.
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(natsd.cleanup)


# --- 3. a 3-node JetStream cluster (R3 stream) loses a node while events are published -------------


async def _stream_leader(js: JetStreamContext, other_than: str | None = None) -> str:
    """The stream's leader, once it has one (not `other_than`) and every replica is current."""
    async def leader() -> str:  # "" until there is one
        c = (await js.stream_info("EVENTS")).cluster
        if c is not None and c.leader and c.leader != other_than and c.replicas and len(c.replicas) == 2 \
                and all(r.current for r in c.replicas):
            return str(c.leader)
        return ""

    what = "stream EVENTS to have a leader with current replicas" + (f" (not {other_than})" if other_than else "")
    return await eventually(leader, what=what, interval=0.1, ignore=RETRYABLE)


@pytest.mark.timeout(80)
async def test_cluster_node_killed_during_publishing_r3_stream_loses_nothing(idp: TestIdP, tmp_path: Any) -> None:
    with nats_cluster(tmp_path) as cluster:
        nc = await nats.connect(servers=cluster.urls, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                connect_timeout=2, error_cb=_quiet)
        try:
            js = nc.jetstream(timeout=2)
            await eventually(nats_call(js.account_info), what="a JetStream meta leader", interval=0.2,
                             ignore=RETRYABLE)
            await eventually(nats_call(lambda: js.add_stream(StreamConfig(
                name="EVENTS", subjects=["events.>"], storage=StorageType.FILE, num_replicas=3,
                duplicate_window=120.0))), what="the R3 stream to be created", interval=0.2, ignore=RETRYABLE)
            await eventually(nats_call(lambda: js.create_key_value(bucket="wsgateway-acl", history=1, replicas=3)),
                             what="the R3 ACL bucket to be created", interval=0.2, ignore=RETRYABLE)
            await _stream_leader(js)
            urls = ",".join(cluster.urls)
            async with run_gateway(urls, idp.issuer, audience=idp.audience, stream_replicas=3) as g1, \
                    run_gateway(urls, idp.issuer, audience=idp.audience, stream_replicas=3) as g2:
                platform = Platform(nc)
                await grant_admin(platform, idp.mint("alice"), g1, g2)
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
                for _ in range(12):  # each step-down elects another node; give up on g1's after a dozen
                    if leader == g1_node:
                        break
                    try:
                        await nc.request("$JS.API.STREAM.LEADER.STEPDOWN.EVENTS", b"", timeout=2)
                    except RETRYABLE:
                        leader = await _stream_leader(js)
                    else:
                        leader = await _stream_leader(js, other_than=leader)
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
                    await eventually(lambda: len(r1.seqs) >= 100 and len(r2.seqs) >= 100,
                                     what="events before the kill", watch=watch, info=info)
                    g2_node = node_of(g2)
                    killed_at = time.monotonic()
                    await asyncio.to_thread(cluster.node(victim).kill)
                    at_kill = len(pub.acked)
                    await eventually(lambda: len(pub.acked) >= at_kill + 150, timeout=45,
                                     what="publishing to resume after the kill", watch=watch, info=info)
                    publishing = time.monotonic() - killed_at
                    await eventually(lambda: all(r.seqs and r.seqs[-1] >= pub.acked[at_kill + 100][0] for r in recs),
                                     what="both clients to get events published after the kill", watch=watch,
                                     info=info)
                    delivering = time.monotonic() - killed_at
                    await pub.stop()
                    await caught_up(recs, lambda r: pub.seqs, pub)
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
                state = await eventually(nats_call(lambda: stream_state(js)), what="stream info", ignore=RETRYABLE)
                assert state == (len(pub.seqs), pub.seqs[-1])
        finally:
            await nc.close()


async def test_revocation_after_a_nats_restart_takes_effect(tmp_path: Any, idp: TestIdP) -> None:
    """The ACL watch is re-established with the connection: a revocation right after an outage reaches the
    client (that it is not left waiting for a consumer heartbeat timeout is measured by bench/resilience.py)."""
    from tests.support.wsclient import connect, recv, recv_type, welcome

    natsd = NatsProcess(free_port(), tmp_path / "nats")
    natsd.start()
    try:
        async with run_gateway(natsd.url, idp.issuer, audience=idp.audience) as g:
            platform = await Platform.connect(natsd.url)
            await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
            await until_scopes(g.http, idp.mint("mia"), ["conversation:c1"])
            ws = await connect(f"{g.ws}?scope=conversation:c1", idp.mint("mia"))
            await welcome(ws)
            assert (await recv_type(ws, "subscribed"))["scope"] == "conversation:c1"
            await platform.close()
            bus_nc = g.gateway.bus.nc
            assert bus_nc is not None
            natsd.stop()
            natsd.start()
            # after the restart: the gateway has reconnected and says it is ready again
            await eventually(lambda: bus_nc.stats["reconnects"] >= 1, what="the gateway to reconnect to NATS")
            await readiness(g.http, 200)
            platform = await Platform.connect(natsd.url)
            await platform.grant("acme.conversation.c1", {"members": ["user:someone-else"]})
            assert await recv(ws, HANG_S) == {"type": "revoked", "scope": "conversation:c1"}
            await ws.close()
            await platform.close()
    finally:
        natsd.cleanup()


@pytest.mark.timeout(60)
async def test_a_starting_gateway_asks_clients_to_retry_and_then_resumes_them(tmp_path: Any, idp: TestIdP) -> None:
    """Before its ACLs and stream position are loaded (here: NATS is not up yet) an instance would refuse
    every subscription or start it live instead of resuming it. It answers 1013 on the socket and 503 on
    the HTTP read APIs instead, and once NATS is there the same client resumes with nothing lost."""
    import websockets

    from tests.support.wsclient import connect, recv, recv_type, welcome

    natsd = NatsProcess(free_port(), tmp_path / "nats")
    token = idp.mint("mia")
    async with run_gateway(natsd.url, idp.issuer, audience=idp.audience, ready=False) as g:
        ws = await connect(f"{g.ws}?scope=conversation:c1&since=0", token)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013, closed.value
        assert "starting" in closed.value.rcvd.reason
        async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"}) as c:
            for path in ("/v1/history?scope=conversation:c1", "/v1/scopes", "/v1/inbox",
                         "/v1/presence?scope=conversation:c1", "/v1/sse?scope=conversation:c1"):
                r = await c.get(f"{g.http}{path}")
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", (path, r.text)
        await start_nats(natsd)
        try:
            platform = await Platform.connect(natsd.url)
            try:
                await readiness(g.http, 200)
                await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
                seqs = [await platform.publish("acme", "conversation:c1") for _ in range(3)]

                await until_scopes(g.http, token, ["conversation:c1"])
                ws = await connect(f"{g.ws}?scope=conversation:c1&since=0", token)
                await welcome(ws)
                sub = await recv_type(ws, "subscribed")
                assert sub["since"] == 0 and sub["recovered"] is True, sub
                assert [(await recv_type(ws, "event"))["seq"] for _ in seqs] == seqs
                await ws.close()
            finally:
                await platform.close()
        finally:
            natsd.stop()
