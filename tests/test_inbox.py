"""The inbox (scope `inbox`, GET /v1/inbox) through the real protocol: real nats-server, test IdP, gateways
on free ports, events published through the package's Publisher (tests/support/platform.py)."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from gateway.client import GatewayClient
from gateway.devtools.natsproc import NatsProcess
from gateway.sdk.inbox import InboxView
from tests.support.gateway import GatewayEndpoint, RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import HANG_S, eventually
from tests.support.wsclient import closed, connect, events, nothing_before, recv, recv_type, welcome
from tests.test_history_sse import _sse_events

USERS = ["mia", "sam", "zoe", "nick"]
ACLS: dict[str, dict[str, Any]] = {
    "acme.project.ops": {"viewers": ["group:ops"]},
    "acme.process.p1": {"project": "ops", "members": ["user:mia"]},  # mia (member), sam (group ops, viewer)
    "acme.process.p2": {"members": ["mia", "nick"]},  # mia and nick
    "acme.conversation.c1": {"members": ["user:mia"]},
    "acme.agent.marker": {"members": [f"user:{u}" for u in USERS]},  # the marker every test user sees
}
GROUPS = {"sam": ("ops",)}
MARKER = "agent:marker"


def token(idp: TestIdP, sub: str) -> str:
    return idp.mint(sub, groups=GROUPS.get(sub, ()))


async def ask(platform: Platform, scope: str, rid: str, assignees: list[str], **extra: Any) -> int:
    return await platform.publish("acme", scope, type="process.input_required",
                                  data={"request_id": rid, "prompt": f"{rid}?", "assignees": assignees, **extra})


async def answer(platform: Platform, scope: str, rid: str, by: str = "mia") -> int:
    return await platform.publish("acme", scope, type="process.input_received",
                                  data={"request_id": rid, "by": by, "value": True})


async def get_inbox(g: GatewayEndpoint, tok: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    async with httpx.AsyncClient(base_url=g.http, headers=headers) as c:
        return await c.get("/v1/inbox", params=params)


async def open_ids(g: GatewayEndpoint, tok: str) -> list[str]:
    r = await get_inbox(g, tok)
    assert r.status_code == 200, r.text
    return [e["event"]["data"]["request_id"] for e in r.json()["requests"]]


async def acls_applied(g: GatewayEndpoint, idp: TestIdP) -> None:
    """Every ACL document is in the gateway's copy (each user lists exactly what ACLS gives them)."""
    want = {"mia": 4, "sam": 2, "zoe": 1, "nick": 2}

    async def done() -> bool:
        async with httpx.AsyncClient(base_url=g.http) as c:
            for sub, n in want.items():
                r = await c.get("/v1/scopes", headers={"Authorization": f"Bearer {token(idp, sub)}"})
                if len(r.json()["scopes"]) != n:
                    return False
        return True

    await eventually(done, what="the gateway to hold every ACL document", interval=0.05)


async def grant_all(platform: Platform) -> None:
    for key, doc in ACLS.items():
        await platform.grant(key, doc)


async def inbox_socket(g: GatewayEndpoint, idp: TestIdP, sub: str, extra: str = MARKER,
                       since: int | None = None) -> ClientConnection:
    """A connection subscribed to `inbox` and `extra` on its URL (resuming with `since`)."""
    url = f"{g.ws}?scope=inbox,{extra}" + (f"&since={since}" if since is not None else "")
    ws = await connect(url, token(idp, sub))
    await welcome(ws)
    acks = [await recv_type(ws, "subscribed"), await recv_type(ws, "subscribed")]
    assert {a["scope"] for a in acks} == {"inbox", extra}
    return ws


def rids(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["event"]["type"].rpartition(".")[2], f["event"]["data"].get("request_id", f["event"]["scope"]))
            for f in frames]


@pytest.fixture
async def ready(gw: RunningGateway, idp: TestIdP, platform: Platform) -> RunningGateway:
    await grant_all(platform)
    await acls_applied(gw, idp)
    return gw


async def test_assignment_by_user_and_by_group_and_an_unrelated_user_sees_nothing(
    ready: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    socks = {sub: await inbox_socket(ready, idp, sub) for sub in ("mia", "sam", "zoe")}
    q1 = await ask(platform, "process:p1", "q1", ["mia"])  # bare name: user:mia
    q2 = await ask(platform, "process:p1", "q2", ["group:ops"])  # sam, through his group
    await platform.publish("acme", "process:p1", type="process.progress", data={"fraction": 0.5})  # not inbox
    await ask(platform, "process:p1", "q3", ["user:nick"])  # nick may not see p1: nobody gets it
    marker = await platform.publish("acme", MARKER)
    assert [f["seq"] for f in await events(socks["mia"], 1)] == [q1]
    assert [f["seq"] for f in await events(socks["sam"], 1)] == [q2]
    for ws in socks.values():
        await nothing_before(ws, marker)
    assert await open_ids(ready, token(idp, "mia")) == ["q1"]
    assert await open_ids(ready, token(idp, "sam")) == ["q2"]
    assert await open_ids(ready, token(idp, "zoe")) == []
    assert await open_ids(ready, token(idp, "nick")) == []  # assigned, but may not see the process
    body = (await get_inbox(ready, token(idp, "mia"))).json()
    assert body["tenant"] == "acme" and body["principal"] == "user:mia" and body["seq"] >= marker
    assert body["requests"][0]["seq"] == q1 and body["next_after"] == q1
    assert body["requests"][0]["event"]["data"]["prompt"] == "q1?"
    for ws in socks.values():
        await ws.close()


async def test_empty_assignees_reach_everyone_who_may_see_the_process(
    ready: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    socks = {sub: await inbox_socket(ready, idp, sub) for sub in USERS}
    anyone = await ask(platform, "process:p1", "anyone", [])
    marker = await platform.publish("acme", MARKER)
    for sub in ("mia", "sam"):  # member, and viewer of its project through a group
        assert [f["seq"] for f in await events(socks[sub], 1)] == [anyone]
    for ws in socks.values():
        await nothing_before(ws, marker)
    for sub in USERS:
        assert await open_ids(ready, token(idp, sub)) == (["anyone"] if sub in ("mia", "sam") else [])
    for ws in socks.values():
        await ws.close()


async def test_answer_completion_and_expiry_resolve_requests(
    ready: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    mia, sam, nick = [await inbox_socket(ready, idp, s) for s in ("mia", "sam", "nick")]
    await ask(platform, "process:p1", "a1", ["mia"])
    await ask(platform, "process:p1", "a2", ["group:ops"])
    await ask(platform, "process:p2", "b1", ["mia", "nick"])
    await ask(platform, "process:p2", "past", ["mia"], expires_at="2020-01-01T00:00:00Z")
    later = await ask(platform, "process:p2", "later", ["mia"], expires_at="2999-01-01T00:00:00Z")
    await ready.dispatched(later)  # GET /v1/inbox answers from what the gateway has read of the stream
    assert await open_ids(ready, token(idp, "mia")) == ["a1", "b1", "later"]  # expired: not open
    await answer(platform, "process:p1", "a1")
    await answer(platform, "process:p1", "unknown")  # answers nothing anybody was asked: nobody gets it
    await platform.publish("acme", "process:p2", type="process.completed", data={})
    await platform.publish("acme", "process:p1", type="process.stage_changed", data={"stage": "x", "index": 0,
                                                                                       "total": 1})
    marker = await platform.publish("acme", MARKER)
    assert rids(await events(mia, 6)) == [
        ("input_required", "a1"), ("input_required", "b1"), ("input_required", "past"),
        ("input_required", "later"), ("input_received", "a1"), ("completed", "process:p2"),
    ]
    await nothing_before(mia, marker)
    assert rids(await events(sam, 1)) == [("input_required", "a2")]  # a1 was not his: nor is its answer
    await nothing_before(sam, marker)
    assert rids(await events(nick, 2)) == [("input_required", "b1"), ("completed", "process:p2")]
    await nothing_before(nick, marker)
    assert await open_ids(ready, token(idp, "mia")) == []
    assert await open_ids(ready, token(idp, "sam")) == ["a2"]
    assert await open_ids(ready, token(idp, "nick")) == []
    failed = await platform.publish("acme", "process:p1", type="process.failed", data={"error": "gave up"})
    marker = await platform.publish("acme", MARKER)
    for ws in (mia, sam):  # both were asked something in p1 (mia's a1 answered already: its end is hers too)
        assert [f["seq"] for f in await events(ws, 1)] == [failed]
        await nothing_before(ws, marker)
    await nothing_before(nick, marker)  # nick was asked nothing in p1
    assert await open_ids(ready, token(idp, "sam")) == []
    for ws in (mia, sam, nick):
        await ws.close()


async def test_a_revoked_process_leaves_the_inbox(ready: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    live = await inbox_socket(ready, idp, "mia")
    q = await ask(platform, "process:p2", "r1", ["mia"])
    assert [f["seq"] for f in await events(live, 1)] == [q]
    # a connection that subscribes after the request was asked: the request is in its inbox (GET) too
    late = await inbox_socket(ready, idp, "mia")
    assert await open_ids(ready, token(idp, "mia")) == ["r1"]
    await platform.grant("acme.process.p2", {"members": ["nick"]})  # mia loses the process
    for ws in (live, late):
        assert await recv(ws) == {"type": "revoked", "scope": "process:p2"}
    assert await open_ids(ready, token(idp, "mia")) == []
    assert await open_ids(ready, token(idp, "nick")) == []  # not his request
    await ask(platform, "process:p2", "r2", [])  # everyone who may see p2: nick only now
    await answer(platform, "process:p2", "r1")
    marker = await platform.publish("acme", MARKER)
    for ws in (live, late):
        await nothing_before(ws, marker)
    assert await open_ids(ready, token(idp, "nick")) == ["r2"]
    for ws in (live, late):
        await ws.close()


async def test_resume_with_since_loses_nothing_doubles_nothing_in_order_with_another_scope(
    ready: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    ws = await inbox_socket(ready, idp, "mia", extra="conversation:c1")
    first = await ask(platform, "process:p1", "s1", ["mia"])
    assert [f["seq"] for f in await events(ws, 1)] == [first]
    await ws.close()
    expected: list[int] = []  # everything of mia's inbox and conversation:c1 after `first`, in stream order
    for i in range(30):
        match i % 6:
            case 0:
                expected.append(await ask(platform, "process:p1", f"m{i}", ["mia"]))
            case 1:
                await ask(platform, "process:p1", f"o{i}", ["group:ops"])  # sam's, not mia's
            case 2:
                expected.append(await platform.publish("acme", "conversation:c1"))
            case 3:
                expected.append(await answer(platform, "process:p1", f"m{i - 3}"))
            case 4:
                await platform.publish("acme", "process:p1", type="process.progress", data={"fraction": 0.1})
            case _:
                expected.append(await ask(platform, "process:p2", f"e{i}", []))
    ws = await inbox_socket(ready, idp, "mia", extra="conversation:c1", since=first)
    live = await ask(platform, "process:p2", "after-resume", ["mia"])
    got = [f["seq"] for f in await events(ws, len(expected) + 1)]
    assert got == [*expected, live]
    await nothing_before(ws, await platform.publish("acme", "conversation:c1"))
    ids = await open_ids(ready, token(idp, "mia"))
    assert ids == ["s1", "e5", "e11", "e17", "e23", "e29", "after-resume"]  # every m was answered
    await ws.close()


async def test_two_instances_and_a_restarted_one_agree(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await grant_all(platform)
    url = nats_server.url
    async with (
        run_gateway(url, idp.issuer, audience=idp.audience) as g1,
        run_gateway(url, idp.issuer, audience=idp.audience) as g2,
    ):
        for g in (g1, g2):
            await acls_applied(g, idp)
        socks = [(sub, await inbox_socket(g, idp, sub)) for g in (g1, g2) for sub in ("mia", "sam")]
        for i in range(12):
            rid = f"t{i}"
            await ask(platform, ["process:p1", "process:p2"][i % 2], rid, [["mia"], ["group:ops"], []][i % 3])
            if i % 4 == 3:
                await answer(platform, "process:p1", f"t{i - 3}")
        last = await platform.publish("acme", "process:p2", type="process.cancelled", data={})
        marker = await platform.publish("acme", MARKER)
        streams: dict[str, list[list[dict[str, Any]]]] = {"mia": [], "sam": []}
        for sub, ws in socks:
            frames: list[dict[str, Any]] = []
            while not frames or frames[-1]["seq"] != marker:
                frames.extend(await events(ws, 1))
            streams[sub].append(frames)
        for sub in ("mia", "sam"):
            assert streams[sub][0] == streams[sub][1], sub
        assert [f["seq"] for f in streams["mia"][0]][-2:] == [last, marker]  # the cancel settles mia's p2 ones

        async def caught_up(g: GatewayEndpoint) -> bool:
            return bool((await get_inbox(g, token(idp, "mia"))).json()["seq"] >= marker)

        lists = {}
        for g in (g1, g2):
            await eventually(partial(caught_up, g), what="the gateway to have read the marker")
            lists[g.port] = {sub: (await get_inbox(g, token(idp, sub))).json()["requests"] for sub in USERS}
        assert lists[g1.port] == lists[g2.port]
        assert [e["event"]["data"]["request_id"] for e in lists[g1.port]["mia"]] == ["t2", "t6"]
        assert [e["event"]["data"]["request_id"] for e in lists[g1.port]["sam"]] == ["t2", "t10"]
        for _, ws in socks:
            await ws.close()
    # a gateway started afterwards builds the same inbox from the stream alone
    async with run_gateway(url, idp.issuer, audience=idp.audience) as g3:
        for sub in USERS:
            assert (await get_inbox(g3, token(idp, sub))).json()["requests"] == lists[g1.port][sub]
        # and a resume on it from before all of it replays what the live instances delivered
        ws = await inbox_socket(g3, idp, "mia", since=0)
        frames = []
        while not frames or frames[-1]["seq"] != marker:
            frames.extend(await events(ws, 1))
        assert frames == streams["mia"][0]
        await ws.close()


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 401),
        ({"limit": "0"}, 400),
        ({"limit": "1001"}, 400),
        ({"limit": "ten"}, 400),
        ({"after": "-1"}, 400),
        ({"after": "\u00b2"}, 400),
        ({"after": "1" * 25}, 400),
    ],
)
async def test_bad_input_is_a_clear_4xx(gw: RunningGateway, idp: TestIdP, params: dict[str, str], status: int) -> None:
    r = await get_inbox(gw, None if status == 401 else token(idp, "mia"), **params)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == ("unauthorized" if status == 401 else "bad_request")
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert (await get_inbox(gw, "not-a-jwt")).status_code == 401


async def test_inbox_is_no_resource_scope(gw: RunningGateway, idp: TestIdP) -> None:
    """`inbox` is a subscription scope only: not a history scope, not a page cursor, and exactly `inbox`."""
    auth = {"Authorization": f"Bearer {token(idp, 'mia')}"}
    async with httpx.AsyncClient(base_url=gw.http, headers=auth) as c:
        assert (await c.get("/v1/history", params={"scope": "inbox"})).status_code == 400
        assert (await c.get("/v1/scopes", params={"after": "inbox"})).status_code == 400
    for bad in ("inbox2", "inbox%0A", "INBOX", "inbox:x"):
        ws = await connect(f"{gw.ws}?scope={bad}", token(idp, "mia"))
        code, reason = await closed(ws)
        assert code == 4400 and "bad scope" in reason


async def test_inbox_over_server_sent_events(ready: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    params = {"scope": "inbox", "access_token": token(idp, "sam")}
    async with httpx.AsyncClient(base_url=ready.http, timeout=10) as c, c.stream("GET", "/v1/sse", params=params) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        head = await asyncio.wait_for(_sse_events(lines, 2), HANG_S)
        assert head[1]["event"] == "subscribed" and head[1]["data"]["scope"] == "inbox"
        await ask(platform, "process:p1", "x1", ["mia"])  # not sam's
        mine = await ask(platform, "process:p1", "x2", ["group:ops"])
        done = await answer(platform, "process:p1", "x2", by="sam")
        got = await asyncio.wait_for(_sse_events(lines, 2), HANG_S)
    assert [int(e["id"]) for e in got] == [mine, done]


def test_the_registry_keeps_at_most_max_requests_oldest_forgotten_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, like tests/test_queue.py: the registry is a data structure fed with validated events."""
    from gateway.core import inbox as inbox_module
    from gateway.events import parse_event
    from gateway.permissions import AclStore
    from gateway.principal import Principal

    monkeypatch.setattr(inbox_module, "MAX_REQUESTS", 3)
    acl = AclStore()
    acl.apply("acme.process.p1", b'{"members": ["mia"]}')
    registry = inbox_module.Inbox(acl)
    mia = Principal(subject="mia", tenant="acme", expires_at=0)

    def feed(seq: int, etype: str, data: dict[str, Any]) -> None:
        raw = orjson.dumps({"id": f"e{seq}", "type": etype, "tenant": "acme", "scope": "process:p1",
                            "time": "2026-01-01T00:00:00Z", "data": data})
        registry.observe(seq, parse_event(raw, "events.acme.process.p1"), raw)

    for seq in range(1, 6):
        feed(seq, "process.input_required", {"request_id": f"q{seq}", "prompt": "?", "assignees": ["mia"]})
    assert [r.seq for r in registry.open_for(mia)] == [3, 4, 5]  # q1 and q2 forgotten
    feed(6, "process.input_received", {"request_id": "q4", "by": "mia"})
    feed(6, "process.input_received", {"request_id": "q4", "by": "mia"})  # idempotent
    assert [r.seq for r in registry.open_for(mia)] == [3, 5]
    feed(7, "process.input_required", {"request_id": "q5", "prompt": "again?", "assignees": ["mia"]})  # asked anew
    assert [r.seq for r in registry.open_for(mia)] == [7]  # q3 forgotten (the oldest), q5 replaced by its new ask
    registry.prune("acme", earliest=8)
    assert registry.open_for(mia) == [] and registry.requests == {} and registry.open == {}


async def test_the_python_sdk_keeps_the_inbox_from_get_then_the_scope(
    ready: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """GET /v1/inbox, then GatewayClient on `inbox` from its `seq`: InboxView ends where GET /v1/inbox is."""
    await ask(platform, "process:p1", "before", ["mia"])
    await ready.dispatched(await ask(platform, "process:p2", "old", ["mia"]))  # both in the gateway's inbox
    view = InboxView()
    body = (await get_inbox(ready, token(idp, "mia"))).json()
    view.load(body)
    assert [q["event"]["data"]["request_id"] for q in view.open()] == ["before", "old"]
    async with GatewayClient(ready.ws, token=token(idp, "mia"), scopes=["inbox"], since=body["seq"]) as client:
        await answer(platform, "process:p1", "before")
        await ask(platform, "process:p1", "soon", ["mia"], expires_at="2020-01-01T00:00:00Z")  # already expired
        await ask(platform, "process:p2", "new", [])
        last = await platform.publish("acme", "process:p2", type="process.input_received",
                                      data={"request_id": "old", "by": "nick"})
        async for frame in client.frames():
            view.apply(frame)
            if frame["type"] == "event" and frame["seq"] == last:
                break
    assert [q["event"]["data"]["request_id"] for q in view.open()] == ["new"]  # "soon" is hidden: expired
    assert view.open() == (await get_inbox(ready, token(idp, "mia"))).json()["requests"]
    assert view.apply({"type": "revoked", "scope": "process:p2"}) and view.open() == []


async def test_a_gateway_starts_on_a_stream_without_process_events(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """The start-up load reads nothing (and must not wait for anything) when no process event is stored."""
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience):
        pass  # creates the stream
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    for _ in range(3):
        await platform.publish("acme", "conversation:c1")
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience) as g:
        body = (await get_inbox(g, token(idp, "mia"))).json()
        assert body["requests"] == [] and body["seq"] >= 3


async def test_a_gateway_starts_on_a_stream_whose_head_was_purged(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """Retention removed the oldest events (here: a purge): the start-up load still ends at once, with the
    requests the stream holds, instead of waiting for events that are gone."""
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience):
        pass  # creates the stream
    await platform.grant("acme.org", {"admins": ["user:mia"]})
    await platform.publish("acme", "process:p1", "process.input_required",
                           data={"request_id": "old", "prompt": "gone?", "assignees": ["user:mia"]})
    for _ in range(3):
        last = await platform.publish("acme", "conversation:c1")
    await platform.js.purge_stream("EVENTS", seq=last)  # keeps only the last event: no process event
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience) as g:
        body = (await get_inbox(g, token(idp, "mia"))).json()
        assert body["requests"] == [] and body["seq"] == last and body["earliest"] == last
