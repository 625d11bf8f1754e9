"""Reconnect storms through the real protocol: many clients resuming at once, served from the recent
in-memory window (or JetStream when the cursor is older), each getting exactly the events it missed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import STALLED_HEARTBEAT_S, RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import eventually
from tests.support.wsclient import connect, connect_slow, events, nothing_before, recv, recv_type, subscribe, welcome

ADMIN = {"admins": ["user:alice"]}
WINDOW = {"source": "window"}
STREAM = {"source": "stream"}


async def _resume(url: str, token: str) -> ClientConnection:
    ws = await connect(url, token)
    await welcome(ws)
    ack = await recv_type(ws, "subscribed")
    assert ack["recovered"] is True, ack
    return ws


async def _seqs_until(ws: ClientConnection, last: int) -> list[int]:
    """Event sequences up to and including `last` (nothing else may come in between)."""
    got: list[int] = []
    while not got or got[-1] < last:
        got.extend(f["seq"] for f in await events(ws, 1))
    return got


async def test_many_clients_resuming_one_scope_at_once_get_exactly_their_missing_events_in_order(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """60 clients of one scope resume at once while events keep flowing: 30 from the same cursor, 30 from
    cursors spread over the history; each gets exactly the events after its cursor, then live ones."""
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    history: list[int] = []
    for i in range(240):
        history.append(await platform.publish("acme", "conversation:c1"))
        if i % 4 == 0:
            await platform.publish("acme", "process:other")  # same tenant, not resumed
    cursors = [history[100]] * 30 + [history[i * 8] for i in range(30)]
    live: list[int] = []

    async def keep_publishing() -> None:  # during and after the storm of resumes
        while len(live) < 150:
            live.append(await platform.publish("acme", "conversation:c1"))

    pub = asyncio.create_task(keep_publishing())
    token = idp.mint("alice")
    clients = await asyncio.gather(*(
        _resume(f"{gw.ws}?scope=conversation:c1&since={c}", token) for c in cursors))
    await pub
    everything = history + live
    got = await asyncio.gather(*(_seqs_until(ws, everything[-1]) for ws in clients))
    for cursor, seqs in zip(cursors, got, strict=True):
        assert seqs == [s for s in everything if s > cursor]
    marker = await platform.publish("acme", "conversation:c1")
    for ws in clients:
        await nothing_before(ws, marker)  # no duplicate, nothing stray
        await ws.close()
    await gw.metric_reaches("wsgateway_replays_total", len(cursors), WINDOW)
    assert await gw.metric("wsgateway_replays_total", STREAM) == 0


async def test_several_scopes_and_wildcard_from_memory_keep_stream_order(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    scopes = ["conversation:a", "process:b", "agent:c"]
    seqs = [(scopes[i % 3], await platform.publish("acme", scopes[i % 3])) for i in range(90)]
    await platform.publish("other", "conversation:a")  # another tenant: never seen
    cursor = seqs[30][1]
    token = idp.mint("alice")
    two = await connect(f"{gw.ws}?scope=conversation:a&scope=agent:c&since={cursor}", token)
    await welcome(two)
    await recv_type(two, "subscribed")
    await recv_type(two, "subscribed")
    wild = await connect(f"{gw.ws}?scope=*&since={cursor}", token)
    await welcome(wild)
    await recv_type(wild, "subscribed")
    want_two = [s for scope, s in seqs if s > cursor and scope != "process:b"]
    assert [f["seq"] for f in await events(two, len(want_two))] == want_two
    want_all = [s for _, s in seqs if s > cursor]
    assert [f["seq"] for f in await events(wild, len(want_all))] == want_all
    marker = await platform.publish("acme", "conversation:a")
    await nothing_before(two, marker)
    await nothing_before(wild, marker)
    await gw.metric_reaches("wsgateway_replays_total", 2, WINDOW)
    await two.close()
    await wild.close()


async def test_cursor_older_than_the_window_is_read_from_jetstream(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """A window of a few events: a recent cursor is served from memory, an older one from JetStream, and
    both get the same complete range."""
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, replay_window_bytes=12_000) as g:
        seqs = [await platform.publish("acme", "conversation:c1") for _ in range(120)]
        token = idp.mint("alice")
        recent = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[-3]}", token)
        assert [f["seq"] for f in await events(recent, 2)] == seqs[-2:]
        await g.metric_reaches("wsgateway_replays_total", 1, WINDOW)
        old = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[9]}", token)
        assert [f["seq"] for f in await events(old, 110)] == seqs[10:]
        await g.metric_reaches("wsgateway_replays_total", 1, STREAM)
        marker = await platform.publish("acme", "conversation:c1")
        await nothing_before(old, marker)
        await nothing_before(recent, marker)
        await old.close()
        await recent.close()


async def test_window_off_still_resumes_from_jetstream(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, replay_window_bytes=0) as g:
        seqs = [await platform.publish("acme", "conversation:c1") for _ in range(20)]
        ws = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[4]}", idp.mint("alice"))
        assert [f["seq"] for f in await events(ws, 15)] == seqs[5:]
        await g.metric_reaches("wsgateway_replays_total", 1, STREAM)
        assert await g.metric("wsgateway_replays_total", WINDOW) == 0
        await ws.close()


async def _applied_revocation(g: RunningGateway, idp: TestIdP, scope: str) -> None:
    """The gateway has applied a revocation once a probe is refused the scope, or told it was revoked."""
    probe = await connect(g.ws, idp.mint("mia"))
    await welcome(probe)
    answer = await subscribe(probe, scope)
    if answer["type"] == "subscribed":
        assert await recv(probe) == {"type": "revoked", "scope": scope}
    else:
        assert answer["code"] == "forbidden", answer
    await probe.close()


async def test_permission_revoked_mid_replay_stops_that_scope_at_once(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """A replay from memory, held up by a client that stopped reading, while one of its scopes is revoked:
    what comes after the revocation has nothing of that scope, the other scope is complete, `revoked`
    comes after the replay."""
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    await platform.grant("acme.conversation.c2", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    pad = {"pad": "x" * 2000}  # 3,000 events of 2 KB: far more than the socket buffers hold
    both: list[tuple[str, int]] = []
    for _ in range(6):
        chunk = ["conversation:c1", "conversation:c2"] * 250
        both += zip(chunk, await asyncio.gather(*(platform.publish("acme", s, data=pad) for s in chunk)), strict=True)
    # every event dispatched before the client comes: all of them are the replay's (from memory), none a live
    # frame held behind it (queued before the revocation, such a frame still goes out after it)
    last = max(seq for _, seq in both)
    await gw.dispatched(last)
    ws = await connect_slow(f"{gw.ws}?scope=conversation:c1&scope=conversation:c2&since=0", idp.mint("mia"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    await recv_type(ws, "subscribed")
    first = await events(ws, 4)
    ws.transport.pause_reading()
    await platform.revoke("acme.conversation.c2")
    await _applied_revocation(gw, idp, "conversation:c2")
    ws.transport.resume_reading()
    got = first + await events(ws, 1500 - 4, timeout=60)  # fewer than c1's 1,500 and the c2 events sent before
    frames: list[dict[str, Any]] = []
    while True:
        frame = await recv(ws)
        if frame["type"] == "revoked":
            break
        frames.append(frame)
    got += frames
    seqs = [f["seq"] for f in got]
    c1 = sorted(s for scope, s in both if scope == "conversation:c1")
    c2 = sorted(s for scope, s in both if scope == "conversation:c2")
    assert [s for s in seqs if s in set(c1)] == c1  # complete and in order
    sent_c2 = [s for s in seqs if s in set(c2)]
    assert sent_c2 == c2[: len(sent_c2)] and len(sent_c2) < len(c2)  # a prefix, cut where it was revoked
    assert seqs == sorted(seqs)
    assert frame == {"type": "revoked", "scope": "conversation:c2"}
    marker = await platform.publish("acme", "conversation:c1")
    await platform.publish("acme", "conversation:c2")
    await nothing_before(ws, marker)
    await ws.close()


async def test_client_slow_during_a_shared_replay_gets_4429_and_the_others_are_unharmed(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, queue_max_messages=100,
                           heartbeat_s=STALLED_HEARTBEAT_S) as g:
        pad = {"pad": "y" * 2000}
        history = [await platform.publish("acme", "conversation:c1", data=pad) for _ in range(800)]
        token = idp.mint("alice")
        url = f"{g.ws}?scope=conversation:c1&since=0"
        slow = await connect_slow(url, token)
        await welcome(slow)
        await recv_type(slow, "subscribed")
        slow.transport.pause_reading()  # stops reading early in its replay
        fast = [await _resume(url, token) for _ in range(5)]
        for ws in fast:  # all of them replayed in full before any live event is published
            assert [f["seq"] for f in await events(ws, len(history))] == history
        live = [await platform.publish("acme", "conversation:c1") for _ in range(150)]  # over the slow one's bounds
        for ws in fast:
            assert [f["seq"] for f in await events(ws, len(live))] == live
        await g.metric_reaches("wsgateway_slow_client_disconnects_total", 1)
        slow.transport.resume_reading()
        seen: list[int] = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await recv(slow)
                if frame["type"] == "event":
                    seen.append(frame["seq"])
        assert slow.close_code == 4429
        assert seen == history[: len(seen)] and len(seen) < len(history)  # the replay's prefix, no live frame
        again = await _resume(f"{g.ws}?scope=conversation:c1&since={seen[-1]}", token)
        rest = [s for s in history + live if s > seen[-1]]
        assert [f["seq"] for f in await events(again, len(rest))] == rest
        await again.close()
        for ws in fast:
            await ws.close()


async def test_subscribe_frame_with_since_is_served_from_memory_too(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    seqs = [await platform.publish("acme", "agent:a1") for _ in range(10)]
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.send(json.dumps({"op": "subscribe", "id": "r", "scope": "agent:a1", "since": seqs[2]}))
    ack = await recv_type(ws, "subscribed")
    assert ack["recovered"] is True and ack["earliest"] == 1 and ack["seq"] == seqs[-1]
    assert [f["seq"] for f in await events(ws, 7)] == seqs[3:]
    await gw.metric_reaches("wsgateway_replays_total", 1, WINDOW)
    await ws.close()


async def test_replay_the_window_runs_past_continues_from_jetstream(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """A replay from memory held up by a client that stopped reading, while new events push the window
    past the replay's position: the rest of the range comes from JetStream, complete and in order."""
    await platform.grant("acme.org", ADMIN)
    pad = {"pad": "z" * 600}

    async def publish(n: int) -> list[int]:
        seqs: list[int] = []
        for _ in range(n // 500):
            seqs += await asyncio.gather(*(platform.publish("acme", "conversation:c1", data=pad) for _ in range(500)))
        return sorted(seqs)

    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience,
                           replay_window_bytes=9 * 2**20) as g:  # about 3,300 events of this size
        history = await publish(3000)  # 12 replay batches, far more than the socket buffers hold
        ws = await connect_slow(f"{g.ws}?scope=conversation:c1&since={history[0]}", idp.mint("alice"))
        await welcome(ws)
        await recv_type(ws, "subscribed")
        ws.transport.pause_reading()  # the replay stops after a batch or two
        live = await publish(4000)  # what the replay has not reached yet leaves the window
        await g.metric_reaches("wsgateway_events_received_total", len(history) + len(live))
        ws.transport.resume_reading()
        want = history[1:] + live
        assert [f["seq"] for f in await events(ws, len(want), timeout=60)] == want
        await g.metric_reaches("wsgateway_replays_total", 1, STREAM)
        assert await g.metric("wsgateway_replays_total", WINDOW) == 0
        await nothing_before(ws, await platform.publish("acme", "conversation:c1"))
        await ws.close()


async def test_a_freshly_started_instance_serves_older_cursors_from_memory(
    gw: RunningGateway, nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    """An instance started after the events were published reads the stream's newest events back into its
    window: a resume from before its start is served from memory (once that is done), complete either way."""
    await platform.grant("acme.org", ADMIN)
    seqs = [await platform.publish("acme", "conversation:c1") for _ in range(150)]
    await platform.publish("acme", "conversation:other")
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience) as g:
        token = idp.mint("alice")

        async def resume_once() -> bool:
            ws = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[19]}", token)
            assert [f["seq"] for f in await events(ws, 130)] == seqs[20:]
            await ws.close()
            return await g.metric("wsgateway_replays_total", WINDOW) > 0

        await eventually(resume_once, what="a resume served from the window")
        live = await platform.publish("acme", "conversation:c1")
        ws = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[-5]}", token)
        assert [f["seq"] for f in await events(ws, 5)] == [*seqs[-4:], live]
        await ws.close()


async def test_a_fresh_instance_with_a_small_window_keeps_the_newest_and_reads_older_from_jetstream(
    gw: RunningGateway, nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    seqs = [await platform.publish("acme", "conversation:c1") for _ in range(120)]
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, replay_window_bytes=12_000) as g:
        token = idp.mint("alice")

        async def recent_from_memory() -> bool:
            ws = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[-3]}", token)
            assert [f["seq"] for f in await events(ws, 2)] == seqs[-2:]
            await ws.close()
            return await g.metric("wsgateway_replays_total", WINDOW) > 0

        await eventually(recent_from_memory, what="a recent resume served from the window")
        streamed = await g.metric("wsgateway_replays_total", STREAM)
        old = await _resume(f"{g.ws}?scope=conversation:c1&since={seqs[9]}", token)
        assert [f["seq"] for f in await events(old, 110)] == seqs[10:]
        await g.metric_reaches("wsgateway_replays_total", streamed + 1, STREAM)
        await old.close()
