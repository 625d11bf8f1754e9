"""After its handshake a WebSocket session is a callback the protocol calls with each client frame
(`gateway.edge.session.ClientFrames`): no asyncio task, no coroutine frames per idle connection. These
tests hold it to the behaviour of the receive loop it replaced: frames answered one at a time, in order,
a `refresh` (which awaits the token check) included; frames that arrive before the session is ready are
not lost.
"""

from __future__ import annotations

import json

from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.rawws import TEXT, RawConnection, frame, open_websocket, upgrade_request
from tests.support.wait import eventually
from tests.support.wsclient import connect, events, recv, subscribe, welcome


def op(**fields: object) -> bytes:
    return frame(TEXT, json.dumps(fields).encode())


async def answers(conn: RawConnection, n: int) -> list[dict[str, object]]:
    out = []
    for _ in range(n):
        _, opcode, payload = await conn.read_frame()
        assert opcode == TEXT, (opcode, payload)
        out.append(json.loads(payload))
    return out


async def test_an_idle_connection_keeps_no_task_and_is_still_served(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.applied(idp, gw)
    clients = [await connect(gw.ws, idp.mint("alice")) for _ in range(10)]
    for ws in clients:
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
    tasks = gw.server.server_state.tasks  # uvicorn's set of its connections' ASGI tasks
    await eventually(lambda: not tasks, what="every handshake task to end", info=lambda: f"{len(tasks)} left")
    assert len(gw.gateway.hub.connections) == 10
    seq = await platform.publish("acme", "conversation:c1")
    for ws in clients:
        assert (await events(ws, 1))[0]["seq"] == seq
        await ws.send(json.dumps({"op": "ping", "id": "still"}))
        assert await recv(ws) == {"type": "pong", "id": "still"}
    for ws in clients[:5]:
        await ws.close()
    await eventually(lambda: len(gw.gateway.hub.connections) == 5, what="the closed ones to leave the hub")
    for ws in clients[5:]:
        await ws.close()


async def test_frames_around_refreshes_are_answered_in_order(gw: RunningGateway, idp: TestIdP) -> None:
    conn = await open_websocket(gw.port, idp.mint("alice", exp_in=60))
    try:
        assert (await answers(conn, 1))[0]["type"] == "welcome"
        await conn.send(  # one write: the gateway parses all of it at once, the refreshes await their checks
            op(op="ping", id="p1") + op(op="refresh", id="r1", token=idp.mint("alice", exp_in=600))
            + op(op="ping", id="p2") + op(op="refresh", id="r2", token="garbage") + op(op="ping", id="p3")
            + op(op="refresh", id="r3", token=idp.mint("alice", exp_in=900)) + op(op="ping", id="p4")
        )
        got = await answers(conn, 7)
        assert [(f["type"], f["id"]) for f in got] == [
            ("pong", "p1"), ("refreshed", "r1"), ("pong", "p2"), ("error", "r2"), ("pong", "p3"),
            ("refreshed", "r3"), ("pong", "p4"),
        ]
    finally:
        conn.close()


async def test_frames_sent_before_the_welcome_are_not_lost(gw: RunningGateway, idp: TestIdP) -> None:
    """A frame sent as soon as the 101 is read may arrive while the token is being checked: it waits in the
    protocol's inbox and is answered once the session is ready, after the welcome."""
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(upgrade_request(token=idp.mint("alice")))
        assert (await conn.response_head()).startswith(b"HTTP/1.1 101 ")
        await conn.send(op(op="ping", id="early") + op(op="ping", id="early2"))
        got = await answers(conn, 3)
        assert got[0]["type"] == "welcome"
        assert got[1:] == [{"type": "pong", "id": "early"}, {"type": "pong", "id": "early2"}]
    finally:
        conn.close()


async def test_a_disconnect_during_a_refresh_removes_the_connection(gw: RunningGateway, idp: TestIdP) -> None:
    conn = await open_websocket(gw.port, idp.mint("alice"))
    try:
        assert (await answers(conn, 1))[0]["type"] == "welcome"
        await conn.send(op(op="refresh", id="r", token=idp.mint("alice", exp_in=600)))
    finally:
        conn.close()
    await eventually(lambda: not gw.gateway.hub.connections, what="the connection to leave the hub")


async def test_an_idle_connection_answers_keepalives_without_a_wsproto_connection(
    nats_server: object, idp: TestIdP, platform: Platform
) -> None:
    """An idle subscriber's only traffic is the keepalive: the gateway's pings and the client's pongs. They are
    written and read without wsproto's Connection (none is made for such a connection: less memory and CPU per
    idle connection); the client stays connected through several of them and is served an event after."""
    from gateway.edge.transport import GatewayWSProtocol
    from tests.support.gateway import run_gateway

    await platform.grant("acme.org", {"admins": ["user:alice"]})
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, heartbeat_s=2.0) as g:  # type: ignore[attr-defined]
        await platform.applied(idp, g)
        # a client that answers pings (websockets' default) and offers no compression (a compressing client's
        # frames are wsproto's to read: its own messages arrive compressed)
        ws = await connect(g.ws, idp.mint("alice"), compression=None)
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
        (proto,) = [p for p in g.server.server_state.connections if isinstance(p, GatewayWSProtocol)]
        answered = []

        def pongs() -> bool:
            if proto.last_ping_rtt and (not answered or proto.ping_sent_at != answered[-1]):
                answered.append(proto.ping_sent_at)
            return len(answered) >= 3

        await eventually(pongs, what="three pings answered", info=lambda: f"{len(answered)} so far")
        assert proto.conn._connection is None, "a wsproto Connection was made for pings and pongs"  # type: ignore[union-attr]
        seq = await platform.publish("acme", "conversation:c1")
        assert (await events(ws, 1))[0]["seq"] == seq
        await ws.close()
