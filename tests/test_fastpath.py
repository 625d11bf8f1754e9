"""The per-delivery loops of fan-out (gateway/core/fastpath.py), in-process: the compiled ones and the Python
fallback, each test under both, and the two against each other on the same random workload.

The end-to-end tests of delivery (tests/test_ws_protocol.py, test_resume.py, test_shutdown_replay.py and the
hub part of test_queue.py) run under both loops too: the `fast_path` fixture of tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from typing import Any

import orjson
import pytest
import uvloop

from gateway.config import Settings
from gateway.core import fastpath
from gateway.core.channel import sse_encode, websocket_encode
from gateway.core.connection import Connection, ConnState
from gateway.core.hub import Hub
from gateway.core.queue import OutFrame, control
from gateway.events import parse_event
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.principal import Principal
from tests.support.gateway import RunningGateway

SCOPE = "conversation:c1"
PRINCIPAL = Principal(subject="u", tenant="t", expires_at=4e9)


class Flag:
    def __init__(self) -> None:
        self.on = True


class Recording:
    """A channel that records every write (WebSocket by default, SSE with `sse=True`)."""

    kind = "websocket"

    def __init__(self, *, sse: bool = False) -> None:
        self.on_writable = self.on_lost = self.on_shutdown = None
        self.flag = Flag()
        self.frames_are_wire = not sse
        self.encode = sse_encode if sse else websocket_encode
        self.writes: list[bytes] = []
        self.closed_with: int | None = None

    @property
    def writable(self) -> bool:
        return self.flag.on

    def write(self, data: bytes) -> bool:
        self.writes.append(data)
        return True

    def fast_path(self) -> tuple[Any, Flag]:
        return self.write, self.flag

    def close(self, code: int, reason: str = "") -> None:
        self.closed_with = code

    def seqs(self) -> list[int]:
        wire = b"".join(self.writes)
        return [int(chunk.split(b",", 1)[0]) for chunk in wire.split(b'{"type":"event","seq":')[1:]]


@pytest.fixture(params=["c", "python"])
def loops(request: pytest.FixtureRequest) -> fastpath.Loops:
    if request.param == "c" and not fastpath.AVAILABLE:
        pytest.fail("gateway.core._fastpath is not built: `pip install -e .` builds it (needs gcc and Python headers)")
    return fastpath.select(request.param == "c")


def conn(ch: Recording | None = None, state: ConnState = ConnState.LIVE) -> Connection:
    c = Connection(ch or Recording(), PRINCIPAL, f"c{random.random()}")  # type: ignore[arg-type]
    c.move(ConnState.LIVE)
    if state is ConnState.REPLAYING:
        c.move(state)
    return c


def frame(seq: int, text: str = "x") -> OutFrame:
    return OutFrame(b'{"type":"event","seq":%d,"event":{"t":"%s"}}' % (seq, text.encode()), seq, None, 1.0)


def test_the_compiled_loops_are_built_and_chosen_by_the_setting() -> None:
    assert fastpath.AVAILABLE, "gateway.core._fastpath is not built: `pip install -e .` builds it"
    acl = AclStore()
    fast = Hub(Settings(jwks_url="http://127.0.0.1:9/jwks"), Metrics(), acl)
    slow = Hub(Settings(jwks_url="http://127.0.0.1:9/jwks", fast_path=False), Metrics(), acl)
    assert fast.writer.fast and fast.fan_out is not fastpath.fan_out_py
    assert not slow.writer.fast and slow.fan_out is fastpath.fan_out_py


def test_allowed_lists_the_connections_of_the_allowed_subscriptions_in_order(loops: Any) -> None:
    from gateway.core.index import Subscription

    conns = [conn() for _ in range(5)]
    subs = {Subscription(c, SCOPE, "conversation", "c1", i % 2 == 0): None for i, c in enumerate(conns)}
    assert loops.allowed(subs) == [conns[0], conns[2], conns[4]]
    assert loops.allowed({}) == []


def test_fan_out_queues_each_event_once_per_connection_and_marks_it_dirty_once(loops: Any) -> None:
    fan_out = loops.fan_out
    a, b, c = conn(), conn(), conn()
    dirty: list[Connection] = []
    f5 = frame(5)
    size = len(f5.data)
    assert fan_out([a, b, a, c], 5, f5, size, 100, 10**6, dirty) == (3, [])  # `a` twice: a scope and `*`
    assert dirty == [a, b, c] and all(x.dirty for x in dirty)
    assert [x.frames for x in (a, b, c)] == [[f5]] * 3 and a.nbytes == size and a.last_seq == 5
    assert fan_out([a, b], 5, f5, size, 100, 10**6, dirty) == (0, [])  # redelivered: already queued
    f6 = frame(6)
    assert fan_out([b], 6, f6, len(f6.data), 100, 10**6, dirty) == (1, [])
    assert dirty == [a, b, c]  # b was dirty already
    assert b.frames == [f5, f6] and b.nbytes == size + len(f6.data) and b.last_seq == 6


def test_fan_out_returns_the_connections_over_their_bounds(loops: Any) -> None:
    fan_out = loops.fan_out
    a, b = conn(), conn()
    dirty: list[Connection] = []
    for seq in (1, 2):
        f = frame(seq)
        assert fan_out([a, b], seq, f, len(f.data), 2, 10**6, dirty) == (2, [])
    f = frame(3)
    assert fan_out([a, b], 3, f, len(f.data), 2, 10**6, dirty) == (2, [a, b])  # 3 frames > 2
    c = conn()
    big = frame(4, "y" * 2000)
    assert fan_out([c], 4, big, len(big.data), 100, 1024, dirty) == (1, [c])  # bytes > 1024


def test_flush_live_writes_each_connection_its_frames_in_one_write_and_counts_deliveries(loops: Any) -> None:
    fan_out, flush_live = loops.fan_out, loops.flush_live
    chans = [Recording(), Recording(), Recording()]
    a, b, c = (conn(ch) for ch in chans)
    dirty: list[Connection] = []
    f1, f2 = frame(1), frame(2)
    fan_out([a, b, c], 1, f1, len(f1.data), 100, 10**6, dirty)
    fan_out([a, c], 2, f2, len(f2.data), 100, 10**6, dirty)
    pong = control("pong")
    c.push(pong)  # a control frame behind the events: written, not counted as a delivery
    touched: list[OutFrame] = []
    assert flush_live(dirty, ConnState.LIVE, touched) == []
    assert [ch.writes for ch in chans] == [[f1.data + f2.data], [f1.data], [f1.data + f2.data + pong.data]]
    assert touched == [f1, f2] and (f1.sent, f2.sent) == (3, 2)
    assert all(not x.dirty and x.frames == [] and x.nbytes == 0 for x in (a, b, c))
    assert (a.written, b.written, c.written) == (2, 1, 2)


def test_flush_live_keeps_the_frames_of_a_channel_without_room(loops: Any) -> None:
    fan_out, flush_live = loops.fan_out, loops.flush_live
    ch = Recording()
    a = conn(ch)
    dirty: list[Connection] = []
    f1 = frame(1)
    fan_out([a], 1, f1, len(f1.data), 100, 10**6, dirty)
    ch.flag.on = False
    touched: list[OutFrame] = []
    assert flush_live(dirty, ConnState.LIVE, touched) == []
    assert ch.writes == [] and a.frames == [f1] and a.nbytes == len(f1.data) and not a.dirty and touched == []
    assert a.written == 0 and f1.sent == 0


def test_flush_live_hands_back_the_connections_that_are_not_live_with_their_frames_held(loops: Any) -> None:
    fan_out, flush_live = loops.fan_out, loops.flush_live
    ch = Recording()
    a, r = conn(), conn(ch, ConnState.REPLAYING)
    dirty: list[Connection] = []
    f1 = frame(1)
    fan_out([a, r], 1, f1, len(f1.data), 100, 10**6, dirty)
    touched: list[OutFrame] = []
    assert flush_live(dirty, ConnState.LIVE, touched) == [r]
    assert ch.writes == [] and r.frames == [f1] and not r.dirty and f1.sent == 1  # a's delivery only


def test_flush_live_encodes_for_a_channel_whose_frames_are_not_its_wire_form(loops: Any) -> None:
    fan_out, flush_live = loops.fan_out, loops.flush_live
    ch = Recording(sse=True)
    a = conn(ch)
    dirty: list[Connection] = []
    f1, f2 = frame(1), frame(2)
    fan_out([a], 1, f1, len(f1.data), 100, 10**6, dirty)
    fan_out([a], 2, f2, len(f2.data), 100, 10**6, dirty)
    flush_live(dirty, ConnState.LIVE, [])
    assert ch.writes == [sse_encode([f1, f2])]


def test_the_loops_hold_no_references_they_do_not_own(loops: Any) -> None:
    fan_out, flush_live = loops.fan_out, loops.flush_live
    conns = [conn() for _ in range(50)]
    f = frame(1)

    def counts() -> list[int]:
        return [sys.getrefcount(f), *map(sys.getrefcount, conns)]

    before = counts()
    for _ in range(3):
        dirty: list[Connection] = []
        fan_out(conns, f.seq, f, len(f.data), 100, 10**6, dirty)
        flush_live(dirty, ConnState.LIVE, [])
        del dirty
        f.seq += 1
        f.sent = 0
        for ch in [x.channel for x in conns]:
            ch.writes.clear()  # type: ignore[attr-defined]
    assert counts() == before


def test_the_compiled_loops_refuse_what_is_not_a_connection_or_a_frame() -> None:
    allowed, fan_out, flush_live, _ = fastpath.select(True)
    assert fan_out is not fastpath.fan_out_py, "gateway.core._fastpath is not built"
    with pytest.raises(TypeError):
        allowed({object(): None})
    with pytest.raises(TypeError):
        fan_out([object()], 1, frame(1), 10, 100, 10**6, [])
    with pytest.raises(TypeError):
        flush_live([object()], ConnState.LIVE, [])
    a = conn()
    a.frames = [b"not a frame"]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        flush_live([a], ConnState.LIVE, [])


class World:
    """Connections on recording channels, driven by one implementation of the loops."""

    def __init__(self, n: int, loops: fastpath.Loops) -> None:
        self.fan_out, self.flush_live = loops.fan_out, loops.flush_live
        self.chans = [Recording(sse=i % 7 == 3) for i in range(n)]
        self.conns = [conn(ch) for ch in self.chans]
        self.dirty: list[Connection] = []
        self.deliveries = 0
        self.slow: list[int] = []

    def event(self, seq: int, targets: list[int], bounds: tuple[int, int]) -> None:
        f = frame(seq, "z" * (seq % 50))
        n, slow = self.fan_out([self.conns[i] for i in targets], seq, f, len(f.data), *bounds, self.dirty)
        self.slow.extend(self.conns.index(c) for c in slow)
        self.deliveries += n

    def flush(self) -> list[tuple[int, int]]:
        touched: list[OutFrame] = []
        dirty, self.dirty = self.dirty, []
        rest = self.flush_live(dirty, ConnState.LIVE, touched)
        assert rest == []
        counted = [(f.seq, f.sent) for f in touched]
        for f in touched:
            f.sent = 0
        return counted

    def state(self) -> list[Any]:
        return [(c.last_seq, c.written, c.nbytes, c.dirty, [f.seq for f in c.frames], ch.writes)
                for c, ch in zip(self.conns, self.chans, strict=True)]


@pytest.mark.parametrize("seed", range(5))
def test_the_compiled_and_the_python_loops_agree_on_a_random_workload(seed: int) -> None:
    assert fastpath.AVAILABLE, "gateway.core._fastpath is not built"
    rng = random.Random(seed)
    worlds = [World(40, fastpath.select(True)), World(40, fastpath.select(False))]
    for seq in range(1, 400):
        targets = rng.sample(range(40), rng.randint(0, 40))
        targets += rng.sample(targets, min(len(targets), rng.randint(0, 3)))  # some twice (a scope and `*`)
        bounds = (rng.randint(1, 30), rng.randint(1024, 20_000))
        if rng.random() < 0.1:
            i = rng.randrange(40)
            for w in worlds:
                w.chans[i].flag.on = not w.chans[i].flag.on
        for w in worlds:
            w.event(seq, targets, bounds)
        if rng.random() < 0.3:
            assert worlds[0].flush() == worlds[1].flush()
        assert worlds[0].state() == worlds[1].state()
    assert worlds[0].deliveries == worlds[1].deliveries > 0 and worlds[0].slow == worlds[1].slow


# --- the hub over both loops ----------------------------------------------------------------------


def _hub(fast: bool, **settings: Any) -> Hub:
    acl = AclStore()
    acl.apply("t.org", orjson.dumps({"admins": ["user:u"]}))
    return Hub(Settings(jwks_url="http://127.0.0.1:9/jwks", fast_path=fast, **settings), Metrics(), acl)


def _dispatch(hub: Hub, seq: int, scope: str = SCOPE) -> int:
    raw = orjson.dumps({"id": f"e{seq}", "type": "test.tick", "tenant": "t", "scope": scope,
                        "time": "2026-01-01T00:00:00Z", "data": {}})
    return hub.dispatch(seq, parse_event(raw, "events.t." + scope.replace(":", ".")), raw)


@pytest.mark.parametrize("fast", [True, False], ids=["c", "python"])
async def test_hub_delivers_in_order_once_per_connection_and_counts_deliveries(fast: bool) -> None:
    hub = _hub(fast)
    chans = [Recording() for _ in range(3)]
    conns = [hub.open(ch, PRINCIPAL, f"c{i}") for i, ch in enumerate(chans)]
    for c in conns:
        hub.index.add(c, SCOPE)
    hub.index.add(conns[0], "*")  # a scope and `*`: still once
    for seq in range(1, 6):
        assert _dispatch(hub, seq) == 3
        if seq % 2:
            hub.writer.flush()
    hub.writer.flush()
    assert [ch.seqs() for ch in chans] == [[1, 2, 3, 4, 5]] * 3
    assert hub.metrics.events_delivered._value.get() == 15
    assert all(c.written == 5 and not c.frames for c in conns)


@pytest.mark.parametrize("fast", [True, False], ids=["c", "python"])
async def test_hub_closes_a_connection_over_its_bounds_4429_and_others_keep_receiving(fast: bool) -> None:
    hub = _hub(fast, queue_max_messages=4)
    stuck, fine = Recording(), Recording()
    s, f = hub.open(stuck, PRINCIPAL, "s"), hub.open(fine, PRINCIPAL, "f")
    hub.index.add(s, SCOPE)
    hub.index.add(f, SCOPE)
    stuck.flag.on = False  # never drains
    for seq in range(1, 8):
        _dispatch(hub, seq)
        hub.writer.flush()
    assert stuck.closed_with == 4429 and s.state is ConnState.CLOSED and stuck.writes == []
    assert fine.seqs() == list(range(1, 8)) and hub.slow_closed_total == 1


@pytest.mark.parametrize("fast", [True, False], ids=["c", "python"])
async def test_hub_holds_live_frames_while_replaying_and_releases_them_after(fast: bool) -> None:
    from gateway.core.queue import replayed_frame

    hub = _hub(fast)
    ch = Recording()
    hub.skip(3)
    c = hub.open(ch, PRINCIPAL, "c")
    plan = hub.begin_replay(c, None, [SCOPE], since=1)
    assert plan is not None
    _dispatch(hub, 4)
    hub.writer.flush()
    assert ch.seqs() == []  # held
    assert await hub.deliver_replayed(c, [replayed_frame(2, b"{}"), replayed_frame(3, b"{}")])
    assert ch.seqs() == [2, 3]
    hub.end_replay(c)
    hub.writer.flush()
    assert ch.seqs() == [2, 3, 4] and c.written == 4


async def test_a_gateway_runs_the_loops_the_fast_path_fixture_chose(fast_path: str, gw: RunningGateway) -> None:
    """The mechanism the delivery tests rely on: WSGATEWAY_FAST_PATH reaches the gateway they start."""
    assert gw.gateway.hub.writer.fast is (fast_path == "c")


# --- the direct write to a uvloop TCP transport's socket --------------------------------------------


class _Peer(asyncio.Protocol):
    """The server side of a loopback TCP connection: keeps its transport."""

    def __init__(self, made: asyncio.Future[asyncio.Transport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(transport)  # type: ignore[arg-type]


async def _pair() -> tuple[asyncio.Transport, socket.socket, asyncio.AbstractServer]:
    """A uvloop TCP transport (server side) and the client's plain socket, which reads nothing yet."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    server = await loop.create_server(lambda: _Peer(made), "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2])
    client.setblocking(False)
    return await made, client, server


def test_direct_sends_on_the_socket_and_falls_back_to_the_transport_in_order() -> None:
    """The Sink writes what the kernel takes and gives the transport the rest; once the transport holds
    bytes, everything goes behind them; the peer reads one stream, in order, complete."""
    _, _, _, direct = fastpath.select(True)
    assert direct is not fastpath.direct_py, "gateway.core._fastpath is not built"

    async def scenario() -> None:
        transport, client, server = await _pair()
        sink: Any = direct(transport.write)
        assert type(sink).__name__ == "Sink"
        chunks = [b"%08d" % i + b"x" * 992 for i in range(8000)]  # 8 MB: far more than the socket buffers
        got = bytearray()
        for i, chunk in enumerate(chunks):
            sink(chunk)
            if i == 100:
                assert transport.get_write_buffer_size() == 0  # so far the kernel took everything
        assert transport.get_write_buffer_size() > 0  # the peer read nothing: the transport holds the rest
        loop = asyncio.get_running_loop()
        while len(got) < 8000 * 1000:  # read as the loop delivers (no polling): the transport writes meanwhile
            chunk = await loop.sock_recv(client, 1 << 20)
            assert chunk, f"EOF after {len(got)} bytes"
            got += chunk
        assert bytes(got) == b"".join(chunks)
        client.close()
        server.close()

    uvloop.run(scenario())


def test_direct_writes_nothing_on_the_socket_of_a_closing_transport() -> None:
    _, _, _, direct = fastpath.select(True)

    async def scenario() -> None:
        transport, client, server = await _pair()
        sink: Any = direct(transport.write)
        sink(b"before")
        transport.close()
        sink(b"after")  # the transport's own write decides (uvloop ignores writes after close)
        got = bytearray()
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(client, 1 << 16):  # until EOF: the transport's close is the marker
            got += chunk
        assert bytes(got) == b"before"
        client.close()
        server.close()

    uvloop.run(scenario())


async def test_direct_leaves_any_other_write_alone(loops: Any) -> None:
    transport, client, server = await _pair()  # the test's own loop: asyncio's, not uvloop
    assert loops.direct(transport.write) == transport.write
    assert loops.direct(len) is len
    client.close()
    server.close()
    transport.close()
