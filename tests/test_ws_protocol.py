"""Client protocol v1 through a real WebSocket, real NATS JetStream and a real identity provider."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.gateway import STALLED_HEARTBEAT_S, RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import HANG_S, eventually
from tests.support.wsclient import (
    closed,
    connect,
    events,
    nothing_before,
    recv,
    recv_type,
    slow_and_fast,
    subscribe,
    welcome,
)

# every test under both of fan-out's loops, compiled and Python (tests/conftest.py, `fast_path`)
pytestmark = pytest.mark.usefixtures("fast_path")

ADMIN = {"admins": ["user:alice"]}


async def test_welcome_then_live_events_in_stream_order(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    hello = await welcome(ws)
    assert hello["principal"]["id"] == "user:alice"
    assert hello["principal"]["tenant"] == "acme"
    assert hello["heartbeat_s"] == gw.settings.heartbeat_s
    assert hello["connection_id"]
    ack = await subscribe(ws, "conversation:c1", rid="a")
    assert ack == {"type": "subscribed", "id": "a", "scope": "conversation:c1", "seq": ack["seq"]}
    seqs = [await platform.publish("acme", "conversation:c1", data={"fraction": i / 10}) for i in range(10)]
    got = await events(ws, 10)
    assert [f["seq"] for f in got] == seqs
    assert [f["event"]["data"]["fraction"] for f in got] == [i / 10 for i in range(10)]
    assert all(f["event"]["scope"] == "conversation:c1" and f["event"]["tenant"] == "acme" for f in got)
    await ws.close()


async def test_one_cursor_across_scopes_no_duplicates(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    """Overlapping subscriptions (two scopes plus `*`) still give each event once, in stream order."""
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    for i, scope in enumerate(["conversation:c1", "process:p1", "*"]):
        assert (await subscribe(ws, scope, rid=str(i)))["type"] == "subscribed"
    published = []
    for i in range(30):
        scope = ["conversation:c1", "process:p1", "agent:a9"][i % 3]
        published.append(await platform.publish("acme", scope))
    got = await events(ws, 30)
    assert [f["seq"] for f in got] == published
    await nothing_before(ws, await platform.publish("acme", "conversation:c1"))  # no duplicate of any of them
    await ws.close()


async def test_wildcard_sees_only_permitted_scopes(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:bob"]})
    await platform.grant("acme.process.p1", {"members": ["user:carol"]})
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("bob"))
    await welcome(ws)
    assert (await subscribe(ws, "*"))["type"] == "subscribed"
    await platform.publish("acme", "process:p1")
    await platform.publish("other", "conversation:c1")
    mine = await platform.publish("acme", "conversation:c1")
    got = await events(ws, 1)
    assert got[0]["seq"] == mine
    await nothing_before(ws, await platform.publish("acme", "conversation:c1"))
    assert await gw.metric("wsgateway_events_denied_total") >= 1
    await ws.close()


async def test_unsubscribe_stops_delivery(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await subscribe(ws, "process:p1")
    await platform.publish("acme", "process:p1")
    await events(ws, 1)
    await ws.send(json.dumps({"op": "unsubscribe", "id": 7, "scope": "process:p1"}))
    assert await recv(ws) == {"type": "unsubscribed", "id": 7, "scope": "process:p1"}
    assert (await subscribe(ws, "agent:marker"))["type"] == "subscribed"  # for the marker event below
    await platform.publish("acme", "process:p1")
    await nothing_before(ws, await platform.publish("acme", "agent:marker"))
    await ws.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_request"),
        ("[1,2]", "bad_request"),
        ('{"id": 1}', "bad_request"),
        ('{"op": "subscribe", "id": 1}', "bad_request"),
        ('{"op": "subscribe", "id": 1, "scope": "tenant:x"}', "bad_request"),
        ('{"op": "subscribe", "id": 1, "scope": "conversation:c1", "since": -3}', "bad_request"),
        ('{"op": "subscribe", "id": 1, "scope": "conversation:c1", "extra": true}', "bad_request"),
        ('{"op": "dance", "id": 1}', "bad_request"),
        ('{"op": "publish", "id": 1, "scope": "conversation:c1", "data": {}}', "read_only"),
        ('{"op": "send", "id": 1}', "read_only"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_lives(
    gw: RunningGateway, idp: TestIdP, platform: Platform, frame: str, code: str
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.send(frame)
    err = await recv_type(ws, "error")
    assert err["code"] == code and err["message"]
    # still usable
    await ws.send(json.dumps({"op": "ping", "id": "p"}))
    assert await recv(ws) == {"type": "pong", "id": "p"}
    await ws.close()


async def test_binary_frames_refused(gw: RunningGateway, idp: TestIdP) -> None:
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.send(b'{"op":"ping"}')
    assert (await recv_type(ws, "error"))["code"] == "bad_request"
    await ws.close()


async def test_client_that_keeps_sending_garbage_is_closed_1008(gw: RunningGateway, idp: TestIdP) -> None:
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    for _ in range(gw.settings.max_bad_frames + 1):
        await ws.send("garbage")
    code, reason = await closed(ws)
    assert code == 1008 and "bad frames" in reason


async def test_oversized_frame_closed_1009_others_unharmed(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    bystander = await connect(gw.ws, idp.mint("alice"))
    await welcome(bystander)
    await subscribe(bystander, "conversation:c1")
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.send(json.dumps({"op": "ping", "id": "x" * (gw.settings.max_frame_bytes + 10)}))
    code, _ = await closed(ws)
    assert code == 1009
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(bystander, 1))[0]["seq"] == seq
    await bystander.close()


async def test_invalid_events_are_counted_never_delivered(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await subscribe(ws, "*")
    good = {
        "id": "e1", "type": "process.progress", "tenant": "acme", "scope": "process:p1",
        "time": "2026-01-01T00:00:00Z", "data": {"fraction": 0.1},
    }
    await platform.publish_raw("events.acme.process.p1", b"{not json")
    await platform.publish_raw("events.acme.process.p1", json.dumps({**good, "scope": "process:p2"}).encode())
    await platform.publish_raw("events.acme.process.p1", json.dumps({**good, "tenant": "beta"}).encode())
    await platform.publish_raw("events.acme.process.p1", json.dumps({**good, "data": {"fraction": 7}}).encode())
    await platform.publish_raw("events.acme.process.p1", json.dumps({"id": "x"}).encode())
    ok = await platform.publish("acme", "process:p1")
    got = await events(ws, 1)
    assert got[0]["seq"] == ok
    assert await gw.metric("wsgateway_events_invalid_total") == 5
    assert await gw.metric("wsgateway_events_invalid_total", {"reason": "json"}) == 1
    assert await gw.metric("wsgateway_events_invalid_total", {"reason": "scope_mismatch"}) == 1
    assert await gw.metric("wsgateway_events_invalid_total", {"reason": "tenant_mismatch"}) == 1
    assert await gw.metric("wsgateway_events_invalid_total", {"reason": "data"}) == 1
    await ws.close()


async def test_unknown_event_types_pass_through_untouched(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await subscribe(ws, "agent:a1")
    body = (b'{"id":"u1","type":"future.thing","tenant":"acme","scope":"agent:a1",'
            b'"time":"2026-01-01T00:00:00Z","data":{"nested":{"x":[1,2,3]},"\\u00e9":"\xc3\xa9"},"newfield":1}')
    await platform.publish_raw("events.acme.agent.a1", body, msg_id="u1")
    frame = (await events(ws, 1))[0]
    assert frame["event"] == json.loads(body)
    await ws.close()


async def test_two_instances_deliver_identical_streams(
    nats_server: object, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    url = nats_server.url  # type: ignore[attr-defined]
    async with (
        run_gateway(url, idp.issuer, audience=idp.audience) as g1,
        run_gateway(url, idp.issuer, audience=idp.audience) as g2,
    ):
        clients = []
        for g in (g1, g2, g1, g2):
            ws = await connect(g.ws, idp.mint("alice"))
            await welcome(ws)
            await subscribe(ws, "conversation:c1")
            clients.append(ws)
        seqs = []
        for i in range(25):
            seqs.append(await platform.publish("acme", "conversation:c1", data={"fraction": i / 25}))
        streams = await asyncio.gather(*(events(ws, 25) for ws in clients))
        assert all([f["seq"] for f in s] == seqs for s in streams)
        assert all(s == streams[0] for s in streams)
        for ws in clients:
            await ws.close()


async def test_slow_client_closed_4429_others_unaffected(
    nats_server: object, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    url = nats_server.url  # type: ignore[attr-defined]
    async with run_gateway(url, idp.issuer, audience=idp.audience, queue_max_messages=50,
                           heartbeat_s=STALLED_HEARTBEAT_S) as g:
        slow, fast = await slow_and_fast(g.ws, idp.mint("alice"), "conversation:c1")
        # stop reading on the slow socket: pause its transport so the kernel buffers fill up
        slow.transport.pause_reading()
        # enough to overflow the kernel's socket buffers (several MB on loopback) and the queue
        big = "x" * 32_000
        n = 600
        reader = asyncio.create_task(events(fast, n, timeout=30))
        for _ in range(n):
            await platform.publish("acme", "conversation:c1", type="custom.blob", data={"blob": big})
        got = await reader
        assert len(got) == n
        assert await g.metric("wsgateway_slow_client_disconnects_total") == 1
        slow.transport.resume_reading()
        code, reason = await closed(slow)
        assert code == 4429 and "resume" in reason
        await fast.close()


async def test_graceful_shutdown_closes_1001(nats_server: object, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", ADMIN)
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience) as g:  # type: ignore[attr-defined]
        ws = await connect(g.ws, idp.mint("alice"))
        await welcome(ws)
        await subscribe(ws, "conversation:c1")
        g.server.should_exit = True
        code, reason = await closed(ws)
    assert code == 1001 and "shutting down" in reason


async def test_health_readiness_metrics(gw: RunningGateway) -> None:
    import httpx

    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{gw.http}/healthz")).json() == {"status": "ok"}
        ready = (await c.get(f"{gw.http}/readyz")).json()
        assert ready == {"ready": True, "nats_connected": True, "consumer_live": True,
                         "acl_loaded": True, "jwks_loaded": True}
    text = await gw.metrics_text()
    for name in ("wsgateway_connections", "wsgateway_auth_failures_total", "wsgateway_delivery_latency_seconds",
                 "wsgateway_events_received_total", "wsgateway_events_delivered_total",
                 "wsgateway_events_denied_total", "wsgateway_events_invalid_total",
                 "wsgateway_slow_client_disconnects_total", "wsgateway_nats_connected"):
        assert name in text, name
    assert await gw.metric("wsgateway_nats_connected") == 1


async def test_latency_and_delivery_metrics_count_deliveries(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    clients = []
    for _ in range(3):
        ws = await connect(gw.ws, idp.mint("alice"))
        await welcome(ws)
        await subscribe(ws, "process:p1")
        clients.append(ws)
    assert await gw.metric("wsgateway_connections") == 3
    for _ in range(4):
        await platform.publish("acme", "process:p1")
    for ws in clients:
        await events(ws, 4)
    assert await gw.metric("wsgateway_events_delivered_total") == 12
    assert await gw.metric("wsgateway_delivery_latency_seconds_count", {"kind": "process"}) == 12
    assert await gw.metric("wsgateway_events_received_total") == 4
    for ws in clients:
        await ws.close()


async def test_over_connection_limit_closes_4429(nats_server: object, idp: TestIdP) -> None:
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, max_connections=2) as g:  # type: ignore[attr-defined]
        first = [await connect(g.ws, idp.mint("alice")) for _ in range(2)]
        for ws in first:
            await welcome(ws)
        extra = await connect(g.ws, idp.mint("alice"))
        code, reason = await closed(extra)
        assert code == 4429 and "connection limit" in reason
        assert await g.metric("wsgateway_connection_attempts_total", {"outcome": "rejected"}) == 1
        await first[0].close()
        await g.metric_reaches("wsgateway_connections", 1)  # the closed one is counted out: room for another
        again = await connect(g.ws, idp.mint("alice"))
        await welcome(again)
        for ws in [*first[1:], again]:
            await ws.close()


async def test_keepalive_pings_reap_a_dead_peer(nats_server: object, idp: TestIdP) -> None:
    """A peer that completes the handshake and then never answers a ping is closed and forgotten."""
    import base64
    import os

    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, heartbeat_s=0.5) as g:  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {idp.mint('alice')}\r\n\r\n"
        ).encode())
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 101")
        await g.metric_reaches("wsgateway_connections", 1)
        # read (and ignore) whatever comes, never answering the pings: the server must give up on us
        data = b""
        try:
            async with asyncio.timeout(HANG_S):  # a hang guard: the server must end the connection by itself
                while chunk := await reader.read(4096):
                    data += chunk
        except ConnectionError:
            pass
        except TimeoutError:
            raise AssertionError(f"a peer that never answers a ping was not closed ({len(data)} bytes read)") from None
        assert b"\x89" in data, "expected at least one ping frame"
        await g.metric_reaches("wsgateway_connections", 0)  # forgotten (the socket's end is seen first, maybe)
        writer.close()


async def test_subscriptions_gauge_follows_subscribe_unsubscribe_and_disconnect(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    a = await connect(gw.ws, idp.mint("alice"))
    await welcome(a)
    for scope in ("conversation:c1", "process:p1", "*", "conversation:c1"):  # the repeat is not a new one
        await subscribe(a, scope)
    b = await connect(gw.ws, idp.mint("alice"))
    await welcome(b)
    await subscribe(b, "agent:a1")
    assert await gw.metric("wsgateway_subscriptions") == 4
    await a.send(json.dumps({"op": "unsubscribe", "id": 1, "scope": "process:p1"}))
    assert (await recv(a))["type"] == "unsubscribed"
    await a.send(json.dumps({"op": "unsubscribe", "id": 2, "scope": "process:p1"}))  # twice: no double count
    assert (await recv(a))["type"] == "unsubscribed"
    assert await gw.metric("wsgateway_subscriptions") == 3
    await a.close()
    await gw.metric_reaches("wsgateway_subscriptions", 1)
    await b.close()


QUERIES = [
    "", "scope=conversation:c1", "scope=a&scope=b&since=5", "since=1&since=2", "a", "a=", "=x", "&&a=1&&", "a==b",
    "scope=conversation%3Ac1", "x=a+b", "x=%E2%9C%93&x=%ZZ", "x=%ff", "access_token=abc.def.ghi&scope=s",
    "a=1;b=2", "é=ü", "a=%00", "presence=true&listed=false&compact=true",
]


@pytest.mark.parametrize("raw", QUERIES)
def test_the_url_query_is_read_as_starlette_reads_it(raw: str) -> None:
    """The handshake's own query reader (session.Query) and Starlette's QueryParams agree on every value."""
    from starlette.datastructures import QueryParams

    from gateway.edge.session import Query

    data = raw.encode("latin-1") if raw.isascii() else raw.encode("utf-8")
    ours, theirs = Query(data), QueryParams(data)
    for name in {*theirs.keys(), *ours._items, "scope", "since", "access_token", "a", "x", "", "é"}:
        assert ours.get(name) == theirs.get(name), name
        assert ours.getlist(name) == theirs.getlist(name), name


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet="ab=&%+;2F3Ac:é ", max_size=24))
def test_the_url_query_reader_agrees_with_starlette_on_anything(raw: str) -> None:
    from starlette.datastructures import QueryParams

    from gateway.edge.session import Query

    data = raw.encode("utf-8")
    ours, theirs = Query(data), QueryParams(data)
    for name in {*theirs.keys(), *ours._items}:
        assert ours.getlist(name) == theirs.getlist(name), (raw, name)
        assert ours.get(name) == theirs.get(name), (raw, name)


class _Recording(asyncio.Transport):
    """A transport that keeps what is written to it, each write apart (a socket cannot tell them apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.protocol: Any = None
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def test_the_101_and_the_first_frames_are_one_write(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    """An accepted connection's 101, its welcome and its URL subscription's answer leave in one write (one
    send, one segment for the client), through the protocols uvicorn makes for a new connection."""
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    server, t = gw.server, _Recording()
    proto = server.config.http_protocol_class(  # type: ignore[call-arg]
        server.config, server.server_state, server.lifespan.state, asyncio.get_running_loop())
    t.protocol = proto
    proto.connection_made(t)
    token = idp.mint("alice")
    proto.data_received(
        b"GET /v1/ws?scope=conversation:c1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
    try:
        # (at once when the token's key is known; after a JWKS fetch when an earlier test rotated the keys)
        await eventually(lambda: t.writes, what="the gateway's answer")
        head, _, frames = t.writes[0].partition(b"\r\n\r\n")  # the first write holds all of it
        assert head.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        texts = []
        while frames:
            assert frames[0] == 0x81, frames  # unmasked final text frames
            size, at = frames[1] & 0x7F, 2
            if size == 126:
                size, at = int.from_bytes(frames[2:4], "big"), 4
            texts.append(json.loads(frames[at:at + size]))
            frames = frames[at + size:]
        assert [f["type"] for f in texts] == ["welcome", "subscribed"], texts
        assert texts[1]["scope"] == "conversation:c1"
    finally:
        t.protocol.connection_lost(None)
