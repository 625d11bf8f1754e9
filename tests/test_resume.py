"""Lossless resume through the real protocol: replay from JetStream, exact seam to live, recovery flags."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats
import pytest
from nats.js.api import StreamConfig
from websockets.exceptions import ConnectionClosed

from gateway.client import GatewayClient
from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import STALLED_HEARTBEAT_S, RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import eventually
from tests.support.wsclient import (
    connect,
    connect_stalled,
    events,
    nothing_before,
    recv,
    recv_type,
    subscribe,
    welcome,
)

# every test under both of fan-out's loops, compiled and Python (tests/conftest.py, `fast_path`)
pytestmark = pytest.mark.usefixtures("fast_path")

ADMIN = {"admins": ["user:alice"]}


async def test_since_replays_then_goes_live_with_no_gap_or_duplicate_under_load(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    history = [await platform.publish("acme", "conversation:c1") for _ in range(300)]
    for _ in range(50):
        await platform.publish("acme", "process:other")  # not in the scope
    cursor = history[99]
    live: list[int] = []

    async def keep_publishing() -> None:  # 400 live events, published before, during and after the replay
        while len(live) < 400:
            live.append(await platform.publish("acme", "conversation:c1"))

    pub = asyncio.create_task(keep_publishing(), name="live-publisher")
    await eventually(lambda: len(live) >= 20, what="live publishing under way", watch=[pub])
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.send(json.dumps({"op": "subscribe", "id": "r", "scope": "conversation:c1", "since": cursor}))
    ack = await recv_type(ws, "subscribed")
    assert ack["recovered"] is True and ack["since"] == cursor and ack["earliest"] == 1
    await pub
    expected = [s for s in history if s > cursor] + live
    got = [f["seq"] for f in await events(ws, len(expected), timeout=30)]
    assert got == expected
    await nothing_before(ws, await platform.publish("acme", "conversation:c1"))  # no duplicate, no stray
    assert await gw.metric("wsgateway_events_replayed_total") >= 200
    await ws.close()


async def test_url_since_resumes_several_scopes_as_one_ordered_stream(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    seqs = []
    for i in range(60):
        seqs.append((["conversation:a", "process:b", "agent:c"][i % 3], await platform.publish(
            "acme", ["conversation:a", "process:b", "agent:c"][i % 3])))
    cursor = seqs[20][1]
    ws = await connect(f"{gw.ws}?scope=conversation:a&scope=process:b&since={cursor}", idp.mint("alice"))
    await welcome(ws)
    acks = [await recv_type(ws, "subscribed"), await recv_type(ws, "subscribed")]
    assert {a["scope"] for a in acks} == {"conversation:a", "process:b"}
    expected = [s for scope, s in seqs if s > cursor and scope != "agent:c"]
    assert [f["seq"] for f in await events(ws, len(expected))] == expected
    # later subscriptions on a cursor connection resume too
    await platform.publish("acme", "agent:c")
    ws_seq = await platform.publish("acme", "conversation:a")
    assert (await events(ws, 1))[0]["seq"] == ws_seq
    await ws.close()


async def test_replay_rechecks_permissions_per_event(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    await platform.grant("acme.conversation.c2", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    mine = [await platform.publish("acme", scope) for scope in ["conversation:c1", "conversation:c2"] * 5]
    await platform.revoke("acme.conversation.c2")  # access as it is NOW decides
    # the gateway has applied the revocation once a probe is refused c2, or is told it was revoked
    probe = await connect(gw.ws, idp.mint("mia"))
    await welcome(probe)
    answer = await subscribe(probe, "conversation:c2")
    if answer["type"] == "subscribed":
        assert await recv(probe) == {"type": "revoked", "scope": "conversation:c2"}
    else:
        assert answer["code"] == "forbidden", answer
    await probe.close()
    ws = await connect(gw.ws, idp.mint("mia"))
    await welcome(ws)
    await ws.send(json.dumps({"op": "subscribe", "id": 1, "scope": "*", "since": 0}))
    assert (await recv_type(ws, "subscribed"))["recovered"] is True
    assert [f["seq"] for f in await events(ws, 5)] == mine[0::2]
    await nothing_before(ws, await platform.publish("acme", "conversation:c1"))  # nothing of c2 came
    await ws.close()


async def test_purged_history_says_recovered_false_and_earliest(idp: TestIdP) -> None:
    with NatsProcess() as natsd:
        nc = await nats.connect(natsd.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"], max_msgs=50))
        platform = Platform(nc)
        async with run_gateway(natsd.url, idp.issuer, audience=idp.audience) as g:
            await platform.grant("acme.org", ADMIN)
            await platform.applied(idp, g)
            seqs = [await platform.publish("acme", "conversation:c1") for _ in range(100)]
            ws = await connect(g.ws, idp.mint("alice"))
            await welcome(ws)
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "scope": "conversation:c1", "since": 10}))
            ack = await recv_type(ws, "subscribed")
            assert ack["recovered"] is False
            assert ack["earliest"] == 51
            assert [f["seq"] for f in await events(ws, 50)] == seqs[50:]
            await ws.close()
        await nc.close()


async def test_cursor_ahead_of_the_stream_is_not_recovered(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    await platform.publish("acme", "conversation:c1")
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.send(json.dumps({"op": "subscribe", "id": 1, "scope": "conversation:c1", "since": 99999}))
    assert (await recv_type(ws, "subscribed"))["recovered"] is False
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(ws, 1))[0]["seq"] == seq
    await ws.close()


async def test_bad_since_on_url_closes_4400(gw: RunningGateway, idp: TestIdP) -> None:
    from tests.support.wsclient import closed

    ws = await connect(f"{gw.ws}?since=-1", idp.mint("alice"))
    code, reason = await closed(ws)
    assert code == 4400 and "since" in reason
    ws = await connect(f"{gw.ws}?scope=bogus", idp.mint("alice"))
    assert (await closed(ws))[0] == 4400


async def test_client_helper_reconnects_with_its_cursor(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """Drop the connection mid-stream while publishing continues: the app sees exactly what was published."""
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    client = GatewayClient(gw.ws, token=idp.mint("alice"), scopes=["conversation:c1", "process:p1"], since=0)
    published: list[int] = []
    received: list[int] = []

    async def publish() -> None:
        for i in range(300):
            published.append(await platform.publish("acme", ["conversation:c1", "process:p1"][i % 2]))
            await asyncio.sleep(0.002)  # pacing: the drops happen while publishing goes on

    async def consume() -> None:
        async for frame in client.frames():
            if frame["type"] == "event":
                received.append(frame["seq"])
                if len(received) in (40, 150):
                    await client.drop()
                if len(received) == 300:
                    return

    pub = asyncio.create_task(publish())
    await asyncio.wait_for(consume(), 60)
    await pub
    assert received == published
    assert client.connects == 3
    await client.close()


async def test_slow_client_coalesced_then_closed_and_resume_has_every_lifecycle_event(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """10,000 events to a client that reads nothing: coalesced, then 4429; others keep flowing; the resumed
    client has every lifecycle event, and merged deltas carry all the text they replace."""
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, queue_max_messages=400,
                           heartbeat_s=STALLED_HEARTBEAT_S) as g:
        slow = await connect_stalled(f"{g.ws}?scope=conversation:c1", idp.mint("alice"))
        fast = await connect(f"{g.ws}?scope=conversation:c1", idp.mint("alice"))
        await welcome(fast)
        await recv_type(fast, "subscribed")
        lifecycle: list[int] = []
        published: list[int] = []
        fast_got: list[dict] = []

        async def read_fast() -> None:
            while len(fast_got) < 10_000:
                fast_got.append(await recv(fast))

        reader = asyncio.create_task(read_fast())
        run = 0
        while len(published) < 10_000:
            r = f"run{run}"
            run += 1
            kw = {"run_id": r}
            seq = await platform.publish("acme", "conversation:c1", type="run.message.started",
                                         data={"message_id": r}, **kw)
            lifecycle.append(seq)
            published.append(seq)
            for _ in range(min(40, 9_999 - len(published))):
                published.append(await platform.publish("acme", "conversation:c1", type="run.message.delta",
                                                        data={"message_id": r, "delta": "abc "},
                                                        **kw))
            if len(published) < 10_000:
                seq = await platform.publish("acme", "conversation:c1", type="run.message.finished",
                                             data={"message_id": r}, **kw)
                lifecycle.append(seq)
                published.append(seq)
        await asyncio.wait_for(reader, 60)
        # the fast client got everything, in order, while the slow one still read nothing: the slow one
        # did not hold it up (its latency beside a slow client is measured by bench/resilience.py)
        assert [f["seq"] for f in fast_got] == published
        assert await g.metric("wsgateway_events_coalesced_total") > 0
        assert await g.metric("wsgateway_slow_client_disconnects_total") == 1
        slow.transport.resume_reading()
        got: list[dict] = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await recv(slow)
                if frame["type"] == "event":
                    got.append(frame)
        assert slow.close_code == 4429
        cursor = got[-1]["seq"]
        again = await connect(f"{g.ws}?scope=conversation:c1&since={cursor}", idp.mint("alice"))
        await welcome(again)
        await recv_type(again, "subscribed")
        rest = [f["seq"] for f in await events(again, sum(1 for s in published if s > cursor), timeout=30)]
        assert rest == [s for s in published if s > cursor]  # the resume itself is complete, not coalesced
        assert set(lifecycle) <= {f["seq"] for f in got} | set(rest)
        await again.close()
        await fast.close()


async def test_coalescing_merges_deltas_and_drops_superseded_snapshots_keeping_lifecycle(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """A client that falls behind, then catches up before its queue overflows, gets fewer frames that mean
    the same: merged deltas with the full text, only the newest snapshot, every lifecycle event in order."""
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, queue_max_messages=200,
                           heartbeat_s=STALLED_HEARTBEAT_S) as g:
        slow = await connect_stalled(f"{g.ws}?scope=conversation:c1", idp.mint("alice"))
        published: list[tuple[int, str]] = []
        kw = {"run_id": "r1"}

        async def pub(type_: str, data: dict) -> None:
            data = {**data, "pad": "p" * 600}  # enough bytes to get past the kernel's socket buffers
            published.append((await platform.publish("acme", "conversation:c1", type=type_, data=data, **kw), type_))

        await pub("run.started", {})
        for i in range(60):
            await pub("run.message.started", {"message_id": f"m{i}"})
            for k in range(8):
                await pub("run.message.delta", {"message_id": f"m{i}", "delta": f"{i}.{k} "})
                await pub("run.state.snapshot", {"state": {"i": i, "k": k}})
            await pub("run.message.finished", {"message_id": f"m{i}"})
        await pub("run.finished", {"outcome": "success"})
        await g.metric_reaches("wsgateway_events_received_total", len(published))  # all of it is queued now
        assert await g.metric("wsgateway_events_coalesced_total") > 0
        slow.transport.resume_reading()
        got = []
        while not got or got[-1]["seq"] != published[-1][0]:
            got.extend(await events(slow, 1))
        lifecycle = [s for s, t in published if t not in ("run.message.delta", "run.state.snapshot")]
        assert [f["seq"] for f in got if f["event"]["type"] not in ("run.message.delta", "run.state.snapshot")] \
            == lifecycle
        assert [f["seq"] for f in got] == sorted(f["seq"] for f in got)
        assert len(got) < len(published)
        text: dict[str, str] = {}
        for f in got:
            if f["event"]["type"] == "run.message.delta":
                d = f["event"]["data"]
                text[d["message_id"]] = text.get(d["message_id"], "") + d["delta"]
        assert text == {f"m{i}": "".join(f"{i}.{k} " for k in range(8)) for i in range(60)}
        assert any(f.get("coalesced", 1) > 1 for f in got)
        snaps = [f["event"]["data"]["state"] for f in got if f["event"]["type"] == "run.state.snapshot"]
        assert snaps[-1] == {"i": 59, "k": 7}
        assert len(snaps) < 60 * 8
        assert await g.metric("wsgateway_slow_client_disconnects_total") == 0
        await slow.close()


async def test_large_replay_does_not_stall_live_delivery_to_others(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    body = {"blob": "z" * 400}
    for _ in range(20):  # 20,000 retained events, published in pipelined chunks
        await asyncio.gather(*(platform.publish("acme", "conversation:big", data=body) for _ in range(1000)))
    live = await connect(f"{gw.ws}?scope=process:live", idp.mint("alice"))
    await welcome(live)
    await recv_type(live, "subscribed")
    replayer = await connect(f"{gw.ws}?scope=conversation:big&since=0", idp.mint("alice"))
    await welcome(replayer)
    await recv_type(replayer, "subscribed")
    got = 0
    during_replay = 0  # live events that reached the other client before the replay had ended

    async def drain_replay() -> None:
        nonlocal got
        while got < 20_000:
            frame = await recv(replayer, 30)
            got += frame["type"] == "event"

    task = asyncio.create_task(drain_replay())
    while got < 15_000:  # while the replay is running, live events still flow to the other client
        seq = await platform.publish("acme", "process:live")
        assert (await events(live, 1, timeout=30))[0]["seq"] == seq
        during_replay += got < 20_000
        if task.done():
            break
    await asyncio.wait_for(task, 60)
    assert got == 20_000
    # live events arrived while the replay was still running (how late: bench/resilience.py)
    assert during_replay >= 3, "the replay finished before live delivery could be observed"
    await live.close()
    await replayer.close()
