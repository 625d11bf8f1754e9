"""Presence through the real protocol: real nats-server, real gateways (two instances, and child processes
for the SIGKILL), real tokens.

A watcher keeps a client-side model (snapshot, then deltas applied in order) and the tests wait until the
model is the expected state: what a client would show, whatever the coalescing did to the frames.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from nats.js.errors import KeyNotFoundError, NoKeysError
from websockets.asyncio.client import ClientConnection

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import GatewayEndpoint, RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.procs import gateway_processes, start_nats
from tests.support.wait import HANG_S, eventually
from tests.support.wsclient import closed, connect, nothing_before, recv, recv_type, subscribe, welcome

ADMIN = {"admins": ["user:alice"]}
C1 = "conversation:c1"
FAST: dict[str, Any] = {"presence_flush_ms": 20}


class Watcher:
    """A client subscribed with `presence: true`: its model of the scope's presence, frame by frame."""

    def __init__(self, ws: ClientConnection, scope: str) -> None:
        self.ws = ws
        self.scope = scope
        self.members: dict[str, dict[str, Any]] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        self.count = 0
        self.snapshots = 0
        self.deltas = 0
        self.other: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str, token: str, scope: str = C1, **extra: Any) -> Watcher:
        ws = await connect(url, token)
        await welcome(ws)
        assert (await subscribe(ws, scope, presence=True, **extra))["type"] == "subscribed"
        w = cls(ws, scope)
        first = await recv_type(ws, "presence")  # the snapshot comes right after `subscribed`
        assert first.get("snapshot") is True, first
        w.apply(first)
        return w

    def apply(self, frame: dict[str, Any]) -> None:
        assert frame["type"] == "presence" and frame["scope"] == self.scope, frame
        if frame.get("snapshot"):
            self.snapshots += 1
            self.members = {m["id"]: m for m in frame["members"]}
            self.agents = {a["run_id"]: a for a in frame["agents"]}
        else:
            self.deltas += 1
            assert not ({"members", "agents", "snapshot"} & frame.keys()), frame
            for pid in frame.get("left", []):
                assert pid in self.members, (pid, frame)
                del self.members[pid]
            for m in frame.get("joined", []):
                assert m["id"] not in self.members, (m, frame)
                self.members[m["id"]] = m
            for rid in frame.get("agents_finished", []):
                del self.agents[rid]
            for a in frame.get("agents_started", []):
                self.agents[a["run_id"]] = a
        self.count = frame["count"]

    async def until(self, what: str, check: Any, timeout: float = HANG_S) -> None:
        """Apply presence frames until `check(self)` holds (other frames are kept in `other`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check(self):
            left = deadline - loop.time()
            assert left > 0, f"gave up waiting for {what}; members {sorted(self.members)}, count {self.count}"
            frame = await recv(self.ws, left)
            if frame["type"] == "presence":
                self.apply(frame)
            else:
                self.other.append(frame)

    async def members_are(self, *ids: str) -> None:
        want = set(ids)
        await self.until(f"members {sorted(want)}", lambda w: set(w.members) == want and w.count == len(want))


async def watching(url: str, token: str, scope: str = C1, **extra: Any) -> ClientConnection:
    """A plain subscriber of the scope (no presence frames): one more watcher."""
    ws = await connect(url, token)
    await welcome(ws)
    assert (await subscribe(ws, scope, **extra))["type"] == "subscribed"
    return ws


async def get_presence(g: GatewayEndpoint, token: str | None, scope: str = C1) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.get(f"{g.http}/v1/presence", params={"scope": scope}, headers=headers)


async def presence_ids(g: GatewayEndpoint, token: str, scope: str = C1) -> set[str]:
    r = await get_presence(g, token, scope)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["members"]}


async def test_snapshot_then_deltas_across_two_instances(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.grant("acme.conversation.c1", {"members": ["bob", "carol"]})
    url = nats_server.url
    async with (
        run_gateway(url, idp.issuer, audience=idp.audience, **FAST) as g1,
        run_gateway(url, idp.issuer, audience=idp.audience, **FAST) as g2,
    ):
        alice = await Watcher.open(g1.ws, idp.mint("alice"))
        assert alice.members == {} and alice.count == 0  # the snapshot: nobody (its own join follows)
        await alice.members_are("user:alice")
        bob = await watching(g2.ws, idp.mint("bob", extra={"name": "Bob B.", "picture": "https://img.example/b.png"}))
        # invalid profile claims are dropped, the member stays
        carol = await watching(g2.ws, idp.mint("carol", extra={"name": "x" * 200, "picture": "http://img.example/c"}))
        await alice.members_are("user:alice", "user:bob", "user:carol")
        assert alice.members["user:bob"] == {"id": "user:bob", "name": "Bob B.", "picture": "https://img.example/b.png"}
        assert alice.members["user:carol"] == {"id": "user:carol"}
        # a second connection of bob is the same member; one of them leaving leaves him listed
        bob2 = await watching(g1.ws, idp.mint("bob"))
        await carol.close()
        await alice.members_are("user:alice", "user:bob")
        await bob.close()
        # g2 knows bob2 (on g1) from g1's bucket entry, written on g1's next flush: wait for the members
        # themselves (a non-empty answer, as waited for before, could still lack him)
        await eventually(_ids_are(g2, idp.mint("alice"), {"user:alice", "user:bob"}), what="g2 to agree")
        await bob2.close()
        await alice.members_are("user:alice")
        # a watcher on the other instance starts from the same truth
        alice2 = await Watcher.open(g2.ws, idp.mint("alice"))
        await alice2.until("g2's snapshot to list alice", lambda w: set(w.members) == {"user:alice"})
        assert alice.other == [] and alice.snapshots == 1
        await alice.ws.close()
        await alice2.ws.close()


async def test_unlisted_watcher_receives_but_is_not_listed(
    gw: GatewayEndpoint, nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice", "user:erin", "user:dan"]})
    await platform.applied(idp, gw)
    alice = await Watcher.open(gw.ws, idp.mint("alice"))
    await alice.members_are("user:alice")
    erin = await Watcher.open(gw.ws, idp.mint("erin"), listed=False)  # watches without being listed
    await erin.until("erin's view of alice", lambda w: set(w.members) == {"user:alice"})
    dan = await watching(gw.ws, idp.mint("dan"))  # listed, after erin: erin's join would come first
    await alice.members_are("user:alice", "user:dan")
    await erin.members_are("user:alice", "user:dan")
    assert await presence_ids(gw, idp.mint("erin")) == {"user:alice", "user:dan"}
    # the URL form: ?scope=...&presence=true&listed=false
    ws = await connect(f"{gw.ws}?scope={C1}&presence=true&listed=false", idp.mint("erin"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    snap = await recv_type(ws, "presence")
    assert snap["snapshot"] is True and {m["id"] for m in snap["members"]} == {"user:alice", "user:dan"}
    bad = await connect(f"{gw.ws}?scope={C1}&listed=no", idp.mint("erin"))
    assert await closed(bad) == (4400, "listed must be true or false")
    await dan.close()
    await alice.members_are("user:alice")
    for w in (ws, alice.ws, erin.ws):
        await w.close()


async def test_killed_instance_members_disappear_and_come_back_once(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice", "user:bob"]})
    env: dict[str, Any] = {"presence_ttl_s": "1.5", "presence_flush_ms": "20"}
    async with gateway_processes(2, nats_server.url, idp.issuer, idp.audience, **env) as (a, b):
        alice = await Watcher.open(a.ws, idp.mint("alice"))
        bob = await watching(b.ws, idp.mint("bob"))
        await alice.members_are("user:alice", "user:bob")
        b.kill()  # no goodbye: bob's entry stays in the bucket until the others find b dead
        await alice.members_are("user:alice")
        assert await presence_ids(a, idp.mint("alice")) == {"user:alice"}
        del bob
        # bob reconnects to the survivor: listed once, not twice
        again = await watching(a.ws, idp.mint("bob"))
        await alice.members_are("user:alice", "user:bob")
        r = await get_presence(a, idp.mint("alice"))
        assert r.json()["count"] == 2 and [m["id"] for m in r.json()["members"]] == ["user:alice", "user:bob"]
        await again.close()
        await alice.ws.close()


async def test_graceful_restart_loses_and_doubles_nothing(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice", "user:bob"]})
    url = nats_server.url
    slow = {**FAST, "presence_ttl_s": 300}  # no TTL can explain a leave within the test: the stop's deletes do
    async with run_gateway(url, idp.issuer, audience=idp.audience, **slow) as g1:
        alice = await Watcher.open(g1.ws, idp.mint("alice"))
        async with run_gateway(url, idp.issuer, audience=idp.audience, **slow) as g2:
            await watching(g2.ws, idp.mint("bob"))
            await alice.members_are("user:alice", "user:bob")
        await alice.members_are("user:alice")  # g2 stopped: its members left at once (no TTL to wait for)
        async with run_gateway(url, idp.issuer, audience=idp.audience, **slow) as g3:
            assert await presence_ids(g3, idp.mint("bob")) == {"user:alice"}  # a new instance starts with the truth
            bob = await watching(g3.ws, idp.mint("bob"))
            await alice.members_are("user:alice", "user:bob")
            await bob.close()
            await alice.members_are("user:alice")
        await alice.ws.close()


async def test_revoked_user_leaves_and_stops_receiving(
    gw: GatewayEndpoint, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice", "user:dan"]})
    await platform.grant("acme.conversation.c1", {"members": ["bob"]})
    await platform.grant("acme.conversation.c2", {"members": ["bob"]})
    await platform.applied(idp, gw)
    alice = await Watcher.open(gw.ws, idp.mint("alice"))
    bob = await Watcher.open(gw.ws, idp.mint("bob"))
    assert (await subscribe(bob.ws, "conversation:c2", rid="c2"))["type"] == "subscribed"  # for the marker
    await alice.members_are("user:alice", "user:bob")
    await bob.members_are("user:alice", "user:bob")
    await platform.grant("acme.conversation.c1", {"members": []})  # bob loses c1
    await alice.members_are("user:alice")
    frame = await recv(bob.ws)
    assert frame == {"type": "revoked", "scope": C1}
    dan = await watching(gw.ws, idp.mint("dan"))  # a change bob must not hear of
    await alice.members_are("user:alice", "user:dan")
    await nothing_before(bob.ws, await platform.publish("acme", "conversation:c2"))
    assert (await get_presence(gw, idp.mint("bob"))).status_code == 403
    # access back: `subscribed`, then a fresh snapshot (bob missed the deltas), and bob is listed again
    await platform.grant("acme.conversation.c1", {"members": ["bob"]})
    assert (await recv(bob.ws))["type"] == "subscribed"
    snap = await recv_type(bob.ws, "presence")
    assert snap["snapshot"] is True and {m["id"] for m in snap["members"]} == {"user:alice", "user:dan"}
    bob.apply(snap)
    await bob.members_are("user:alice", "user:bob", "user:dan")
    await alice.members_are("user:alice", "user:bob", "user:dan")
    for ws in (dan, alice.ws, bob.ws):
        await ws.close()


async def test_get_presence_auth_and_parameters(gw: GatewayEndpoint, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["bob"]})
    await platform.applied(idp, gw)
    r = await get_presence(gw, None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized"
    r = await get_presence(gw, "x.y.z")
    assert r.status_code == 401
    for bad in ("", "*", "inbox", "tenant:x", "conversation:", "conversation:c1\n", "conversation:" + "a" * 129):
        r = await get_presence(gw, idp.mint("bob"), bad)
        assert r.status_code == 400, bad
        assert r.json() == {"error": {"code": "bad_request",
                                      "message": "scope must be <conversation|process|agent>:<id>"}}
    r = await get_presence(gw, idp.mint("mallory"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await get_presence(gw, idp.mint("bob", tenant="other"))
    assert r.status_code == 403
    r = await get_presence(gw, idp.mint("bob"))
    assert r.status_code == 200
    assert r.json() == {"tenant": "acme", "scope": C1, "count": 0, "members": [], "agents": []}


async def test_a_burst_of_joins_is_coalesced_and_exact(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """N clients join at once: the watcher gets at most one delta per flush interval (far fewer than N), and
    its final state is exactly the N + 1 members; the listed members are capped, the count is not."""
    n, interval_s, cap = 60, 0.5, 25
    await platform.grant("acme.org", {"admins": ["user:alice", *(f"user:u{i:03}" for i in range(n))]})
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience,
                           presence_flush_ms=interval_s * 1000, presence_max_members=cap) as g:
        alice = await Watcher.open(g.ws, idp.mint("alice"))
        await alice.members_are("user:alice")
        clients = []
        for i in range(n):  # connected first, so the burst is the subscriptions only
            ws = await connect(g.ws, idp.mint(f"u{i:03}"))
            await welcome(ws)
            clients.append(ws)
        start = time.monotonic()
        await asyncio.gather(*(ws.send(json.dumps({"op": "subscribe", "scope": C1})) for ws in clients))
        everyone = {"user:alice", *(f"user:u{i:03}" for i in range(n))}
        listed = set(sorted(everyone)[:cap])
        before = alice.deltas
        await alice.until("all of them", lambda w: w.count == n + 1 and set(w.members) == listed)
        elapsed = time.monotonic() - start
        deltas = alice.deltas - before
        assert deltas <= elapsed / interval_s + 2, (deltas, elapsed)  # at most one per flush interval
        assert deltas < n
        r = await get_presence(g, idp.mint("alice"))
        assert r.json()["count"] == n + 1 and {m["id"] for m in r.json()["members"]} == listed
        await g.metric_reaches("wsgateway_presence_members", n + 1)  # listed memberships on this process
        assert await g.metric("wsgateway_presence_snapshots_total") == 1  # alice's
        assert await g.metric("wsgateway_presence_deltas_total") == alice.deltas
        assert await g.metric("wsgateway_presence_kv_writes_total") >= 1
        await g.metric_reaches("wsgateway_presence_instances", 1)
        # everyone leaves at once: the same, down to alice alone
        before = alice.deltas
        await asyncio.gather(*(ws.close() for ws in clients))
        await alice.members_are("user:alice")
        assert alice.deltas - before < n
        await alice.ws.close()


async def test_agents_active_from_run_events(nats_server: NatsProcess, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    url = nats_server.url
    async with run_gateway(url, idp.issuer, audience=idp.audience, **FAST) as g1:
        alice = await Watcher.open(g1.ws, idp.mint("alice"))
        await platform.publish("acme", C1, "run.started", run_id="run-1", data={"agent_id": "researcher"})
        await platform.publish("acme", C1, "run.started", run_id="run-2", data={})
        await alice.until("two runs", lambda w: set(w.agents) == {"run-1", "run-2"})
        assert alice.agents["run-1"]["agent_id"] == "researcher" and alice.agents["run-1"]["since"]
        assert "agent_id" not in alice.agents["run-2"]
        # an instance started after run.started learns it from the others' entries (g1 writes its entry
        # to the bucket on its next flush, which may come after alice's view has the runs)
        async with run_gateway(url, idp.issuer, audience=idp.audience, **FAST) as g2:

            async def agents_on_g2() -> set[str]:
                return {a["run_id"] for a in (await get_presence(g2, idp.mint("alice"))).json()["agents"]}

            await eventually(lambda: _equals(agents_on_g2, {"run-1", "run-2"}), what="g2 to learn both runs")
            await platform.publish("acme", C1, "run.finished", run_id="run-1", data={"outcome": "success"})
            await alice.until("run-1 finished", lambda w: set(w.agents) == {"run-2"})
            await eventually(lambda: _equals(agents_on_g2, {"run-2"}), what="g2 to see run-1 finished")
        await alice.ws.close()


async def _equals(get: Any, want: object) -> bool:
    return bool(await get() == want)


def _ids_are(g: GatewayEndpoint, token: str, want: set[str]) -> Any:
    """A condition for `eventually`: GET /v1/presence on `g` answers 200 with exactly these members."""

    async def check() -> bool:
        r = await get_presence(g, token)
        return r.status_code == 200 and {m["id"] for m in r.json()["members"]} == want

    return check


async def test_presence_fields_are_checked(gw: GatewayEndpoint, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"scope": C1, "presence": "yes"}, "presence: Input should be a valid boolean"),
        ({"scope": C1, "listed": 0}, "listed: Input should be a valid boolean"),
        ({"scope": "*", "presence": True},
         "subscribe: Value error, presence is per resource scope: subscribe to the scope itself, not to *"),
        ({"scope": "inbox", "presence": True},
         "subscribe: Value error, presence is per resource scope: subscribe to the scope itself, not to inbox"),
    ]
    for extra, message in cases:
        await ws.send(json.dumps({"op": "subscribe", "id": "x", **extra}))
        assert await recv(ws) == {"type": "error", "id": "x", "code": "bad_request", "message": message}
    assert (await subscribe(ws, "*", listed=False))["type"] == "subscribed"  # `*` is never listed anyway
    await ws.close()
    bad = await connect(f"{gw.ws}?scope={C1}&presence=maybe", idp.mint("alice"))
    assert await closed(bad) == (4400, "presence must be true or false")


async def test_bucket_leftovers_and_garbage_heal(nats_server: NatsProcess, idp: TestIdP, platform: Platform) -> None:
    """An entry of an instance that never beats (a leftover) counts until the TTL, then goes, from the views and
    from the bucket; what is no entry is ignored."""
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, presence_ttl_s=1, **FAST) as g:
        alice = await Watcher.open(g.ws, idp.mint("alice"))
        await alice.members_are("user:alice")
        kv = await platform.js.key_value("wsgateway-presence")
        ghost = "0" * 32
        await kv.put(f"m.{'1' * 32}.acme.conversation.c1", b"not json")
        await kv.put(f"m.{'2' * 32}.acme.conversation.c1", b'{"m": [["user:x", null, null, true]]}')
        await kv.put("m.not-an-instance.acme.conversation.c1", b'{"m": [["user:y", null, null, 1]]}')
        await kv.put(f"m.{ghost}.acme.conversation.c1", b'{"m": [["user:ghost", "G", "javascript:x", 2]], "a": []}')
        await alice.members_are("user:alice", "user:ghost")
        assert alice.members["user:ghost"] == {"id": "user:ghost", "name": "G"}  # the bad picture is dropped
        await alice.members_are("user:alice")  # never heard of again: dead after the TTL

        async def ghost_keys() -> list[str]:
            return [k for k in await kv.keys() if ghost in k]  # alice's own keys are there: never NoKeysError

        await eventually(lambda: _equals(ghost_keys, []), what="the ghost's keys deleted from the bucket")
        assert alice.other == []
        await alice.ws.close()


async def test_nats_restart_presence_comes_back(idp: TestIdP, tmp_path: Any) -> None:
    """A leave while nats-server is down reaches the other instance once it is back, though the restarted
    server lost the memory bucket; later changes flow as before."""
    natsd = NatsProcess(free_port(), tmp_path / "nats")
    await start_nats(natsd)
    try:
        platform = await Platform.connect(natsd.url)
        await platform.grant("acme.org", {"admins": ["user:alice", "user:bob", "user:dan"]})
        await platform.close()
        async with (
            run_gateway(natsd.url, idp.issuer, audience=idp.audience, **FAST) as g1,
            run_gateway(natsd.url, idp.issuer, audience=idp.audience, **FAST) as g2,
        ):
            alice = await Watcher.open(g1.ws, idp.mint("alice"))
            bob = await watching(g2.ws, idp.mint("bob"))
            await alice.members_are("user:alice", "user:bob")
            await asyncio.to_thread(natsd.stop)
            await bob.close()  # while NATS is down: g2 cannot write it yet (and has nothing else to write)
            await start_nats(natsd)
            await alice.members_are("user:alice")
            dan = await watching(g2.ws, idp.mint("dan"))
            await alice.members_are("user:alice", "user:dan")
            for g in (g1, g2):  # one truth: nobody lost or doubled
                await eventually(_ids_are(g, idp.mint("alice"), {"user:alice", "user:dan"}),
                                 what="presence after the restart", ignore=(httpx.HTTPError,))
            await dan.close()
            await alice.members_are("user:alice")
            await alice.ws.close()
    finally:
        natsd.stop()


async def test_sse_presence_events_and_unlisted_stream(gw: GatewayEndpoint, idp: TestIdP, platform: Platform) -> None:
    """SSE takes `presence` and `listed` like the WebSocket URL: named `presence` events, and a stream that is
    not listed."""
    from tests.test_history_sse import _sse_events

    await platform.grant("acme.org", {"admins": ["user:alice", "user:bob"]})
    await platform.applied(idp, gw)
    alice = await Watcher.open(gw.ws, idp.mint("alice"))
    await alice.members_are("user:alice")
    params = {"scope": C1, "presence": "true", "listed": "false", "access_token": idp.mint("bob")}
    async with httpx.AsyncClient(base_url=gw.http, timeout=HANG_S) as c:
        assert (await c.get("/v1/sse", params={**params, "presence": "yes"})).status_code == 400
        async with c.stream("GET", "/v1/sse", params=params) as r:
            lines = r.aiter_lines()
            first = await asyncio.wait_for(_sse_events(lines, 3), HANG_S)
            assert [e["event"] for e in first] == ["welcome", "subscribed", "presence"]
            snap = first[2]["data"]
            assert snap["snapshot"] is True and [m["id"] for m in snap["members"]] == ["user:alice"]
            dan = await watching(gw.ws, idp.mint("bob"))  # bob's WebSocket is listed; his SSE stream is not
            await alice.members_are("user:alice", "user:bob")
            (delta,) = await asyncio.wait_for(_sse_events(lines, 1), HANG_S)
            assert delta["event"] == "presence" and delta["data"]["joined"] == [{"id": "user:bob"}]
            await dan.close()
            await alice.members_are("user:alice")  # the SSE stream (still open) never counted
    await alice.ws.close()


async def test_resume_then_snapshot_and_unsubscribe_leaves(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """With a cursor the snapshot comes after the replay's `subscribed` and events (the held live frames),
    then the client's own join; `unsubscribe` leaves the scope."""
    await platform.grant("acme.org", {"admins": ["user:alice", "user:bob"]})
    await platform.applied(idp, gw)
    alice = await Watcher.open(gw.ws, idp.mint("alice"))
    await alice.members_are("user:alice")
    seqs = [await platform.publish("acme", C1) for _ in range(3)]
    await gw.dispatched(seqs[-1])  # replayed, all three: one not yet dispatched would come live, after the snapshot
    ws = await connect(f"{gw.ws}?scope={C1}&since=0&presence=true", idp.mint("bob"))
    await welcome(ws)
    sub = await recv_type(ws, "subscribed")
    assert sub["since"] == 0 and sub["recovered"] is True
    got = [await recv_type(ws, "event") for _ in seqs]
    assert [f["seq"] for f in got] == seqs
    bob = Watcher(ws, C1)
    snap = await recv_type(ws, "presence")
    assert snap["snapshot"] is True
    bob.apply(snap)
    await bob.members_are("user:alice", "user:bob")
    await alice.members_are("user:alice", "user:bob")
    await ws.send(json.dumps({"op": "unsubscribe", "id": "u", "scope": C1}))
    assert await recv(ws) == {"type": "unsubscribed", "id": "u", "scope": C1}
    await alice.members_are("user:alice")
    await ws.close()
    await alice.ws.close()


async def test_the_bucket_entry_follows_every_join_and_leave(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """What other instances read of this one (its bucket entry) is exact after joins, second tabs, leaves and a
    name on the token: the members as encoded rows, each with its connection count, and nothing stale."""
    await platform.grant("acme.org", ADMIN)
    await platform.grant("acme.conversation.c1", {"members": ["bob", "carol"]})
    kv: Any = None  # the gateway makes the bucket when it starts

    async def entry() -> dict[str, Any] | None:
        try:
            keys = await kv.keys()
        except NoKeysError:
            return None
        for key in keys:
            if key.endswith(".acme.conversation.c1"):
                try:
                    got = await kv.get(key)
                except KeyNotFoundError:  # deleted
                    return None
                return json.loads(got.value) if got.value else None
        return None

    async def members() -> dict[str, list[Any]]:
        doc = await entry()
        return {} if doc is None else {m[0]: m for m in doc["m"]}

    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, **FAST) as g:
        kv = await platform.js.key_value("wsgateway-presence")
        await platform.applied(idp, g)
        alice = await Watcher.open(g.ws, idp.mint("alice", extra={"name": "Alice A."}))
        alice2 = await watching(g.ws, idp.mint("alice"))
        bob = await watching(g.ws, idp.mint("bob"))
        want = {"user:alice": ["user:alice", "Alice A.", None, 2], "user:bob": ["user:bob", None, None, 1]}
        await eventually(lambda: _equals(members, want), what="alice twice and bob in the entry")
        assert (await entry()) == {"m": list(want.values()), "a": []}  # the order they joined in, no "x"
        await alice2.close()
        want["user:alice"][3] = 1
        await eventually(lambda: _equals(members, want), what="alice's second tab gone from the entry")
        await bob.close()
        del want["user:bob"]
        await eventually(lambda: _equals(members, want), what="bob gone from the entry")
        carol = await watching(g.ws, idp.mint("carol"))
        want["user:carol"] = ["user:carol", None, None, 1]
        await eventually(lambda: _equals(members, want), what="carol in the entry")
        await carol.close()
        await alice.ws.close()
        await eventually(lambda: _equals(entry, None), what="the entry gone with its last member")
