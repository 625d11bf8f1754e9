"""GET /v1/agui over real HTTP (real nats-server, test IdP, gateway): the AG-UI mapping as SSE, its auth and
parameter checks, and joins and resumes in the middle of a message that start with the snapshot prelude."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import HANG_S

ADMIN = {"admins": ["user:alice"]}
VECTORS = json.loads((Path(__file__).parent / "agui_vectors.json").read_text())["cases"]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Block(dict[str, Any]):
    """One SSE block: `id`, `data` (parsed), `comment` (parsed JSON of a `: {...}` line)."""


async def _blocks(lines: AsyncIterator[str], until: Any) -> list[Block]:
    """SSE blocks until `until(block)` is true for one (that one included)."""
    out: list[Block] = []
    cur = Block()
    async for line in lines:
        if line:
            field, _, value = line.partition(": ")
            if field == "":
                cur["comment"] = json.loads(value) if value.startswith("{") else value
            elif field == "data":
                cur["data"] = json.loads(value)
            else:
                cur[field] = value
            continue
        if cur:
            out.append(cur)
            if until(cur):
                return out
            cur = Block()
    raise AssertionError(f"stream ended after {out}")


def _agui(blocks: list[Block]) -> list[dict[str, Any]]:
    return [b["data"] for b in blocks if "data" in b]


def _is(kind: str) -> Any:
    return lambda b: b.get("data", {}).get("type") == kind


async def _publish(platform: Platform, scope: str, events: list[dict[str, Any]]) -> list[int]:
    return [await platform.publish("acme", scope, type=e["type"], run_id=e.get("run_id"), data=e["data"])
            for e in events]


async def test_a_run_streams_as_the_vectors_say_with_ids(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    case = VECTORS[0]
    async with httpx.AsyncClient(base_url=gw.http, headers=_auth(idp.mint("alice")), timeout=HANG_S) as c:
        async with c.stream("GET", "/v1/agui", params={"scope": "conversation:c1"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            seqs = await _publish(platform, "conversation:c1", case["events"])
            blocks = await asyncio.wait_for(_blocks(r.aiter_lines(), _is("RUN_FINISHED")), HANG_S)
    comments = [b["comment"]["type"] for b in blocks if "comment" in b]
    assert comments[:2] == ["welcome", "subscribed"]
    want = [{**e, "threadId": "conversation:c1"} if "threadId" in e else e for group in case["out"] for e in group]
    assert _agui(blocks) == want
    # the last AG-UI event of each gateway event carries its stream sequence
    ids = [int(b["id"]) for b in blocks if "id" in b and "data" in b]
    assert ids == seqs


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
async def test_every_vector_through_the_real_server(
    gw: RunningGateway, idp: TestIdP, platform: Platform, case: dict[str, Any]
) -> None:
    """Published (so every vector is an event the gateway accepts), then streamed: `fold` before the stream
    opens (its prelude), `events` after; the AG-UI events are the vector's, in order."""
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    scope = case["thread"]
    await _publish(platform, scope, case["fold"])
    want = [e for group in case["out"] for e in group]
    async with httpx.AsyncClient(base_url=gw.http, headers=_auth(idp.mint("alice")), timeout=HANG_S) as c:
        async with c.stream("GET", "/v1/agui", params={"scope": scope}) as r:
            seqs = await _publish(platform, scope, case["events"])
            blocks = await asyncio.wait_for(_blocks(r.aiter_lines(), lambda b: b.get("id") == str(seqs[-1])), HANG_S)
    assert _agui(blocks) == want


async def test_join_mid_message_gets_the_prelude_and_resume_mid_message_too(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    scope = "conversation:c2"
    run = "run-1"
    head = [
        {"type": "conversation.message.created", "data": {"message_id": "m-0", "role": "user", "content": "Hi"}},
        {"type": "run.started", "run_id": run, "data": {}},
        {"type": "run.message.started", "run_id": run, "data": {"message_id": "m-1"}},
        {"type": "run.message.delta", "run_id": run, "data": {"message_id": "m-1", "delta": "Hel"}},
    ]
    await _publish(platform, scope, head)
    token = idp.mint("alice")
    async with httpx.AsyncClient(base_url=gw.http, headers=_auth(token), timeout=HANG_S) as c:
        # a consumer joins in the middle of the message: the prelude makes the deltas valid
        async with c.stream("GET", "/v1/agui", params={"scope": scope}) as r:
            lines = r.aiter_lines()
            first = await asyncio.wait_for(_blocks(lines, _is("TEXT_MESSAGE_START")), HANG_S)
            assert _agui(first) == [
                {"type": "RUN_STARTED", "threadId": scope, "runId": run},
                {"type": "MESSAGES_SNAPSHOT", "messages": [{"id": "m-0", "role": "user", "content": "Hi"},
                                                           {"id": "m-1", "role": "assistant", "content": "Hel"}]},
                {"type": "TEXT_MESSAGE_START", "messageId": "m-1", "role": "assistant"},
            ]
            seq_lo = (await _publish(platform, scope, [
                {"type": "run.message.delta", "run_id": run, "data": {"message_id": "m-1", "delta": "lo"}}]))[0]
            got = await asyncio.wait_for(_blocks(lines, _is("TEXT_MESSAGE_CONTENT")), HANG_S)
            assert got[-1]["id"] == str(seq_lo)
            assert got[-1]["data"] == {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m-1", "delta": "lo"}
        # ... it drops here, in the middle of the message; the run goes on
        await _publish(platform, scope, [
            {"type": "run.message.delta", "run_id": run, "data": {"message_id": "m-1", "delta": ", world"}},
            {"type": "run.message.finished", "run_id": run, "data": {"message_id": "m-1"}},
            {"type": "run.finished", "run_id": run, "data": {"outcome": "success"}},
        ])
        # and resumes with Last-Event-ID: a fresh AG-UI stream, the snapshot as of that event, then the rest
        async with c.stream("GET", "/v1/agui", params={"scope": scope},
                            headers={"Last-Event-ID": str(seq_lo)}) as r:
            blocks = await asyncio.wait_for(_blocks(r.aiter_lines(), _is("RUN_FINISHED")), HANG_S)
    assert _agui(blocks) == [
        {"type": "RUN_STARTED", "threadId": scope, "runId": run},
        {"type": "MESSAGES_SNAPSHOT", "messages": [{"id": "m-0", "role": "user", "content": "Hi"},
                                                   {"id": "m-1", "role": "assistant", "content": "Hello"}]},
        {"type": "TEXT_MESSAGE_START", "messageId": "m-1", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m-1", "delta": ", world"},
        {"type": "TEXT_MESSAGE_END", "messageId": "m-1"},
        {"type": "RUN_FINISHED", "threadId": scope, "runId": run, "outcome": {"type": "success"}},
    ]
    subscribed = next(b["comment"] for b in blocks if b.get("comment", {}).get("type") == "subscribed")
    assert subscribed["recovered"] is True


async def test_events_that_map_to_nothing_still_move_the_cursor(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    async with httpx.AsyncClient(base_url=gw.http, headers=_auth(idp.mint("alice")), timeout=HANG_S) as c:
        async with c.stream("GET", "/v1/agui", params={"scope": "process:p1"}) as r:
            seq = await platform.publish("acme", "process:p1", type="process.progress", data={"fraction": 0.1})
            blocks = await asyncio.wait_for(_blocks(r.aiter_lines(), lambda b: b.get("id") == str(seq)), HANG_S)
    assert blocks[-1] == {"id": str(seq)}  # between runs AG-UI has nothing to say: an `id:` alone


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({"scope": "conversation:c1"}, None, 401, "unauthorized"),
        ({"scope": "conversation:secret"}, {}, 403, "forbidden"),
        ({}, {}, 400, "bad_request"),
        ({"scope": "*"}, {}, 400, "bad_request"),
        ({"scope": "nope"}, {}, 400, "bad_request"),
        ({"scope": "conversation:c1\n"}, {}, 400, "bad_request"),
        ({"scope": ["conversation:c1", "conversation:c1"]}, {}, 400, "bad_request"),
        ({"scope": "conversation:c1,conversation:c1"}, {}, 400, "bad_request"),
        ({"scope": "conversation:c1", "since": "-1"}, {}, 400, "bad_request"),
        ({"scope": "conversation:c1"}, {"Last-Event-ID": "1e3"}, 400, "bad_request"),
        ({"scope": "conversation:c1"}, {"Last-Event-ID": "٣".encode()}, 400, "bad_request"),
        ({"scope": "conversation:c1"}, {"Last-Event-ID": "9" * 40}, 400, "bad_request"),
    ],
)
async def test_errors_are_clear_json(
    gw: RunningGateway, idp: TestIdP, platform: Platform,
    params: dict[str, Any], headers: dict[str, Any] | None, status: int, code: str,
) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    auth = {} if headers is None else {**_auth(idp.mint("mia")), **headers}
    async with httpx.AsyncClient(base_url=gw.http) as c:
        r = await c.get("/v1/agui", params=params, headers=auth)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"


async def test_a_revocation_ends_the_deliveries(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c3", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    async with httpx.AsyncClient(base_url=gw.http, headers=_auth(idp.mint("mia")), timeout=HANG_S) as c:
        async with c.stream("GET", "/v1/agui", params={"scope": "conversation:c3"}) as r:
            lines = r.aiter_lines()
            seq = await platform.publish("acme", "conversation:c3", type="run.started", run_id="r", data={})
            got = await asyncio.wait_for(_blocks(lines, _is("RUN_STARTED")), HANG_S)
            assert got[-1]["id"] == str(seq)
            await platform.revoke("acme.conversation.c3")
            blocks = await asyncio.wait_for(
                _blocks(lines, lambda b: b.get("comment", {}).get("type") == "revoked"), HANG_S)
    assert blocks[-1]["comment"]["scope"] == "conversation:c3"



async def test_over_the_connection_limit_is_503(nats_server: Any, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, max_connections=1) as g:
        async with httpx.AsyncClient(base_url=g.http, headers=_auth(idp.mint("alice")), timeout=HANG_S) as c:
            async with c.stream("GET", "/v1/agui", params={"scope": "agent:a"}) as first:
                assert first.status_code == 200
                await asyncio.wait_for(_blocks(first.aiter_lines(), lambda b: "comment" in b), HANG_S)
                r = await c.get("/v1/agui", params={"scope": "agent:a"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "over_limit"
