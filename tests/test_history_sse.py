"""GET /v1/history and GET /v1/sse over real HTTP, against what a live WebSocket subscriber saw."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import HANG_S
from tests.support.wsclient import connect, events, recv_type, welcome

ADMIN = {"admins": ["user:alice"]}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_history_pages_equal_what_a_live_subscriber_saw(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(f"{gw.ws}?scope=conversation:c1", idp.mint("alice"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    for i in range(25):
        await platform.publish("acme", "conversation:c1", data={"i": i})
        await platform.publish("acme", "process:noise")
    live = await events(ws, 25)
    await ws.close()
    pages: list[dict[str, Any]] = []
    after = 0
    async with httpx.AsyncClient(base_url=gw.http, headers=_auth(idp.mint("alice"))) as c:
        while True:
            r = await c.get("/v1/history", params={"scope": "conversation:c1", "after": after, "limit": 10})
            assert r.status_code == 200
            body = r.json()
            if not body["events"]:
                assert body["next_after"] == after
                break
            pages.append(body)
            after = body["next_after"]
    assert [len(p["events"]) for p in pages] == [10, 10, 5]
    assert [e for p in pages for e in p["events"]] == [{"seq": f["seq"], "event": f["event"]} for f in live]
    assert pages[0]["earliest"] == 1 and pages[0]["latest"] == 50


async def test_history_with_access_token_query(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    seq = await platform.publish("acme", "agent:a1")
    async with httpx.AsyncClient(base_url=gw.http) as c:
        r = await c.get("/v1/history", params={"scope": "agent:a1", "access_token": idp.mint("alice")})
    assert r.status_code == 200 and [e["seq"] for e in r.json()["events"]] == [seq]


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"scope": "conversation:c1"}, 401, "unauthorized"),
        ({"scope": "conversation:secret"}, 403, "forbidden"),
        ({"scope": "*"}, 400, "bad_request"),
        ({"scope": "nope"}, 400, "bad_request"),
        ({"scope": "conversation:c1", "after": "-1"}, 400, "bad_request"),
        ({"scope": "conversation:c1", "limit": "0"}, 400, "bad_request"),
        ({"scope": "conversation:c1", "limit": "1001"}, 400, "bad_request"),
        ({"scope": "conversation:c1", "limit": "ten"}, 400, "bad_request"),
    ],
)
async def test_history_errors_are_clear_json(
    gw: RunningGateway, idp: TestIdP, platform: Platform, params: dict[str, str], status: int, code: str
) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    headers = {} if status == 401 else _auth(idp.mint("mia"))
    async with httpx.AsyncClient(base_url=gw.http, headers=headers) as c:
        r = await c.get("/v1/history", params=params)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


async def _sse_events(lines: AsyncIterator[str], n: int) -> list[dict[str, Any]]:
    """Parse Server-Sent Events from a response's line iterator until n have arrived."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    async for line in lines:
        if not line:
            if cur:
                out.append(cur)
                cur = {}
                if len(out) >= n:
                    return out
            continue
        field, _, value = line.partition(": ")
        cur[field] = json.loads(value) if field == "data" else value
    return out


async def test_sse_streams_live_events_with_ids_and_resumes_with_last_event_id(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    token = idp.mint("alice")
    async with httpx.AsyncClient(base_url=gw.http, timeout=10) as c:
        async with c.stream("GET", "/v1/sse", params={"scope": "process:p1", "access_token": token}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            head = await asyncio.wait_for(_sse_events(lines, 2), HANG_S)
            assert head[0]["event"] == "welcome" and head[1]["event"] == "subscribed"
            seqs = [await platform.publish("acme", "process:p1", data={"i": i}) for i in range(5)]
            got = await asyncio.wait_for(_sse_events(lines, 5), HANG_S)
        assert [int(e["id"]) for e in got] == seqs
        assert [e["data"]["event"]["data"]["i"] for e in got] == list(range(5))
        more = [await platform.publish("acme", "process:p1") for _ in range(3)]
        headers = {**_auth(token), "Last-Event-ID": str(seqs[2])}
        async with c.stream("GET", "/v1/sse", params={"scope": "process:p1"}, headers=headers) as r:
            frames = await asyncio.wait_for(_sse_events(r.aiter_lines(), 2 + 5), HANG_S)
    assert frames[1]["event"] == "subscribed" and frames[1]["data"]["recovered"] is True
    assert [int(e["id"]) for e in frames[2:]] == seqs[3:] + more


async def test_sse_requires_a_valid_token(gw: RunningGateway, idp: TestIdP) -> None:
    async with httpx.AsyncClient(base_url=gw.http) as c:
        r = await c.get("/v1/sse", params={"scope": "process:p1", "access_token": "garbage"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await c.get("/v1/sse", params={"scope": "bad scope"}, headers=_auth(idp.mint("alice")))
        assert r.status_code == 400


async def test_sse_stream_ends_after_the_close_event(gw: RunningGateway, idp: TestIdP) -> None:
    """When the token expires the server sends a `close` event and ends the response (no hanging stream)."""
    async with httpx.AsyncClient(base_url=gw.http, timeout=10) as c:
        params = {"scope": "process:p1", "access_token": idp.mint("alice", exp_in=1)}
        async with c.stream("GET", "/v1/sse", params=params) as r:
            frames = await asyncio.wait_for(_sse_events(r.aiter_lines(), 100), HANG_S)
    assert frames[-1]["event"] == "close" and frames[-1]["data"]["code"] == 4408
