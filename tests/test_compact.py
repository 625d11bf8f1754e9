"""Compact catch-up (`compact: true`) through the real protocol: a reload in the middle of a long answer
gets each message's, reasoning's and tool call's arguments deltas of the replayed range merged into one
frame (the coalescing rules), lifecycle events untouched, stream order and the newest `seq` kept;
WebSocket subscribe frame and URL, SSE and the history API; bad values refused clearly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import HANG_S
from tests.support.wsclient import closed, connect, events, nothing_before, recv, recv_type, welcome
from tests.test_history_sse import _sse_events

ADMIN = {"admins": ["user:alice"]}
SCOPE = "conversation:c1"
DELTAS = {"run.message.delta": "message_id", "run.reasoning.delta": "message_id",
          "run.tool_call.args.delta": "tool_call_id"}

Published = list[tuple[int, str, dict[str, Any]]]


async def _long_answer(platform: Platform, g: RunningGateway) -> tuple[Published, int]:
    """A run with a 600-delta message, reasoning, a tool call and a second message still being written;
    returns what was published and a cursor in the middle of the first message, once `g` has dispatched it
    all (so a resume replays, and merges, the whole range instead of getting its tail live)."""
    out: Published = []

    async def pub(type_: str, data: dict[str, Any]) -> None:
        out.append((await platform.publish("acme", SCOPE, type=type_, data=data, run_id="r1"), type_, data))

    await pub("run.started", {"agent_id": "a1"})
    await pub("run.message.started", {"message_id": "m1"})
    for i in range(600):  # more than two replay batches (256): merged across them
        await pub("run.message.delta", {"message_id": "m1", "delta": f"w{i} "})
    await pub("run.message.finished", {"message_id": "m1"})
    await pub("run.reasoning.started", {"message_id": "r1"})
    for i in range(40):
        await pub("run.reasoning.delta", {"message_id": "r1", "delta": f"think{i} "})
    await pub("run.reasoning.finished", {"message_id": "r1"})
    await pub("run.tool_call.started", {"tool_call_id": "t1", "name": "search"})
    for i in range(30):
        await pub("run.tool_call.args.delta", {"tool_call_id": "t1", "delta": f'"a{i}",'})
    await pub("run.tool_call.args.finished", {"tool_call_id": "t1"})
    await pub("run.tool_call.finished", {"tool_call_id": "t1", "result": {"hits": 3}})
    await pub("run.message.started", {"message_id": "m2"})
    for i in range(300):
        await pub("run.message.delta", {"message_id": "m2", "delta": f"v{i} "})
    await g.dispatched(out[-1][0])
    return out, out[101][0]  # after m1's 100th delta


def _expected(published: Published, cursor: int) -> list[tuple[int, str, int, str | None]]:
    """(seq, type, events it stands for, delta text) as compact catch-up must give them: every unbroken
    run of deltas of one stream merged, with the last one's seq; everything else as published."""
    out: list[tuple[int, str, int, str | None]] = []
    last_key: tuple[str, str] | None = None
    for seq, type_, data in published:
        if seq <= cursor:
            continue
        if type_ not in DELTAS:
            out.append((seq, type_, 1, None))
            last_key = None
            continue
        key = (type_, data[DELTAS[type_]])
        if key == last_key:
            _, _, n, text = out[-1]
            out[-1] = (seq, type_, n + 1, f"{text}{data['delta']}")
        else:
            out.append((seq, type_, 1, data["delta"]))
            last_key = key
    return out


def _frames(got: list[dict[str, Any]]) -> list[tuple[int, str, int, str | None]]:
    return [(f["seq"], f["event"]["type"], f.get("coalesced", 1), f["event"]["data"].get("delta"))
            for f in got]


async def _compact_over_ws(g: RunningGateway, idp: TestIdP, platform: Platform, *, url_form: bool) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, g)
    published, cursor = await _long_answer(platform, g)
    want = _expected(published, cursor)
    assert len(want) == 11  # merged: m1, the reasoning, the arguments, m2; and 7 lifecycle events
    token = idp.mint("alice")
    if url_form:
        ws = await connect(f"{g.ws}?scope={SCOPE}&since={cursor}&compact=true", token)
        await welcome(ws)
    else:
        ws = await connect(g.ws, token)
        await welcome(ws)
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "scope": SCOPE, "since": cursor, "compact": True}))
    ack = await recv_type(ws, "subscribed")
    assert ack["recovered"] is True and ack["seq"] == published[-1][0]
    got = await events(ws, len(want))
    assert _frames(got) == want
    merged = got[0]["event"]
    assert merged["data"] == {"message_id": "m1", "delta": "".join(f"w{i} " for i in range(100, 600))}
    assert merged["run_id"] == "r1" and merged["scope"] == SCOPE
    assert got[-1]["event"]["data"]["delta"] == "".join(f"v{i} " for i in range(300))
    # the live range is untouched: each delta its own frame, nothing merged, nothing doubled
    live = [await platform.publish("acme", SCOPE, type="run.message.delta", data={"message_id": "m2", "delta": d},
                                   run_id="r1") for d in ("x", "y")]
    tail = await events(ws, 2)
    assert [(f["seq"], f.get("coalesced"), f["event"]["data"]["delta"]) for f in tail] == [
        (live[0], None, "x"), (live[1], None, "y")]
    await nothing_before(ws, await platform.publish("acme", SCOPE))
    await ws.close()


@pytest.mark.parametrize("window", ["memory", "jetstream"])
async def test_compact_subscribe_frame_merges_the_replayed_deltas_of_a_long_answer(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform, window: str
) -> None:
    """Served from the recent window and, with the window off, from JetStream: the same frames."""
    size = 64 * 2**20 if window == "memory" else 0
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, replay_window_bytes=size) as g:
        await _compact_over_ws(g, idp, platform, url_form=False)
        source = "window" if window == "memory" else "stream"
        await g.metric_reaches("wsgateway_replays_total", 1, {"source": source})


async def test_compact_on_the_connection_url(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await _compact_over_ws(gw, idp, platform, url_form=True)


async def test_without_compact_the_replay_has_every_delta(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    published, cursor = await _long_answer(platform, gw)
    ws = await connect(f"{gw.ws}?scope={SCOPE}&since={cursor}&compact=false", idp.mint("alice"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    rest = [p for p in published if p[0] > cursor]
    got = await events(ws, len(rest))
    assert [(f["seq"], f.get("coalesced")) for f in got] == [(p[0], None) for p in rest]
    await ws.close()


async def test_compact_sse_resume(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    published, cursor = await _long_answer(platform, gw)
    want = _expected(published, cursor)
    params = {"scope": SCOPE, "since": str(cursor), "compact": "true", "access_token": idp.mint("alice")}
    async with httpx.AsyncClient(base_url=gw.http) as c, c.stream("GET", "/v1/sse", params=params) as r:
        assert r.status_code == 200
        frames = await asyncio.wait_for(_sse_events(r.aiter_lines(), 2 + len(want)), HANG_S)
    assert frames[1]["event"] == "subscribed" and frames[1]["data"]["recovered"] is True
    got = [f["data"] for f in frames[2:]]
    assert [int(f["id"]) for f in frames[2:]] == [w[0] for w in want]
    assert _frames(got) == want


async def test_compact_history_pages(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    published, cursor = await _long_answer(platform, gw)
    headers = {"Authorization": f"Bearer {idp.mint('alice')}"}
    async with httpx.AsyncClient(base_url=gw.http, headers=headers) as c:
        params = {"scope": SCOPE, "after": str(cursor), "limit": "1000", "compact": "true"}
        body = (await c.get("/v1/history", params=params)).json()
        plain = (await c.get("/v1/history", params={**params, "compact": "false"})).json()
    assert body["next_after"] == plain["next_after"] == published[-1][0]
    assert _frames(body["events"]) == _expected(published, cursor)
    assert len(plain["events"]) == len([p for p in published if p[0] > cursor])
    assert all("coalesced" not in e for e in plain["events"])


async def test_bad_compact_values_are_refused_clearly(gw: RunningGateway, idp: TestIdP) -> None:
    token = idp.mint("alice")
    for bad in ("yes", "True", "1", "", "true%0A", "%20true"):
        ws = await connect(f"{gw.ws}?scope={SCOPE}&since=0&compact={bad}", token)
        code, reason = await closed(ws)
        assert code == 4400 and "compact must be true or false" in reason, (bad, reason)
    ws = await connect(gw.ws, token)
    await welcome(ws)
    for bad_value in ("true", 1, None):
        await ws.send(json.dumps({"op": "subscribe", "id": 7, "scope": SCOPE, "since": 0, "compact": bad_value}))
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "bad_request" and err["id"] == 7, err
        assert err["message"].startswith("compact:"), err
    await ws.close()
    async with httpx.AsyncClient(base_url=gw.http, headers={"Authorization": f"Bearer {token}"}) as c:
        for path, params in (("/v1/history", {"scope": SCOPE}), ("/v1/sse", {"scope": SCOPE})):
            r = await c.get(path, params={**params, "compact": "yes"})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"] == {"code": "bad_request", "message": "compact must be true or false"}
