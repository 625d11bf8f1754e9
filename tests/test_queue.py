"""The per-connection queue, coalescing and the connection state machine, in-process (no nats-server).

Coalescing is table-driven: each case is a queue written in a small notation and the queue it must
become. Notation: `d:<stream>:<text>` a delta of a message stream, `l` a lifecycle event, `s:<run>` a
state snapshot, `x:<run>` a state delta, `c` a control frame, `o` any other event. Every event gets the
next sequence number in the order written; in the expected queue, `d:<stream>:<text>@<seq>x<count>`
is a merged delta with the newest seq and the number of events it stands for, other tokens are written
as in the input followed by `@<seq>`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.core.channel import sse_encode, websocket_encode
from gateway.core.connection import Connection, ConnState, StateError
from gateway.core.queue import Bounds, EventMeta, OutFrame, SendQueue, coalesce, control, replayed_frame, shrink
from gateway.principal import Principal

SCOPE = "conversation:c1"


def frames(spec: str) -> list[OutFrame]:
    out: list[OutFrame] = []
    seq = 0
    for token in spec.split():
        kind, *rest = token.split(":")
        if kind == "c":
            out.append(control("pong"))
            continue
        seq += 1
        data: dict[str, Any] = {}
        key: tuple[str, ...] | None = None
        cls = {"d": "delta", "l": "lifecycle", "s": "snapshot", "x": "state_delta", "o": "other"}[kind]
        if kind == "d":
            data = {"message_id": rest[0], "delta": rest[1]}
            key = (SCOPE, "run.message.delta", rest[0])
        elif kind in ("s", "x"):
            key = (SCOPE, rest[0])
        raw = orjson.dumps({"type": token, "scope": SCOPE, "data": data})
        f = OutFrame(b'{"type":"event","seq":%d,"event":%s}' % (seq, raw), seq, None, float(seq),
                     EventMeta(cls, key, raw))
        out.append(f)
    return out


def notation(queue: list[OutFrame]) -> str:
    words: list[str] = []
    for f in queue:
        if f.meta is None:
            words.append("c")
            continue
        env = orjson.loads(f.meta.raw)
        if f.meta.cls == "delta":
            words.append(f"d:{env['data']['message_id']}:{env['data']['delta']}@{f.seq}x{f.count}")
        else:
            words.append(f"{env['type']}@{f.seq}")
    return " ".join(words)


CASES = [
    # consecutive deltas of one stream merge into one, newest seq, count of the events merged
    ("d:m:a d:m:b d:m:c", "d:m:abc@3x3"),
    # two streams interleaved: each merges separately, in the position of its newest chunk
    ("d:m:a d:n:x d:m:b d:n:y", "d:m:ab@3x2 d:n:xy@4x2"),
    # a lifecycle event is a barrier: nothing merges across it
    ("d:m:a l d:m:b", "d:m:a@1x1 l@2 d:m:b@3x1"),
    # so is a control frame
    ("d:m:a c d:m:b", "d:m:a@1x1 c d:m:b@2x1"),
    # a snapshot supersedes earlier snapshots and state deltas of its run; later state deltas stay
    ("s:r1 x:r1 x:r1 s:r1 x:r1", "s:r1@4 x:r1@5"),
    # ... of its run only
    ("s:r1 x:r2 s:r1", "x:r2@2 s:r1@3"),
    # other events and lifecycle events are never dropped
    ("o o l o", "o@1 o@2 l@3 o@4"),
    # nothing to do
    ("", ""),
]


@pytest.mark.parametrize(("queue", "expected"), CASES, ids=[c[0] or "empty" for c in CASES])
def test_coalesce(queue: str, expected: str) -> None:
    assert notation(coalesce(frames(queue))) == expected


def test_merged_frames_merge_again_and_keep_their_count() -> None:
    once = coalesce(frames("d:m:a d:m:b d:m:c"))
    extra = frames("d:m:a d:m:b d:m:c d:m:d")[3]  # seq 4, text "d"
    twice = coalesce([*once, extra])
    assert notation(twice) == "d:m:abcd@4x4"
    assert b'"coalesced":4' in twice[0].payload and twice[0].t == 1.0  # the oldest chunk's time


@pytest.mark.parametrize(("queue", "bounds", "removed", "keep"), [
    ("d:m:a " * 8, Bounds(4, 10**9), 7, True),  # merges down to 1 frame: well below 3/4 of 4
    ("l " * 8, Bounds(4, 10**9), 0, False),  # lifecycle events cannot merge: the connection must go
    ("d:m:a l " * 3, Bounds(4, 10**9), 0, False),  # deltas separated by barriers: nothing merges
    ("d:m:a d:m:b l l", Bounds(4, 10**9), 1, True),  # 3 frames = 3/4 of 4: kept
    ("d:m:a d:m:b l l l", Bounds(4, 10**9), 1, False),  # 4 frames > 3/4 of 4
])
def test_shrink_says_whether_the_connection_may_stay(queue: str, bounds: Bounds, removed: int, keep: bool) -> None:
    q = SendQueue(frames(queue))
    result = shrink(q, bounds)
    assert (result.removed, result.keep) == (removed, keep)
    assert q.nbytes == sum(len(f.data) for f in q.frames)  # the byte count follows the frames


def test_bounds_count_messages_and_bytes() -> None:
    q = SendQueue(frames("o o o"))
    assert not Bounds(3, q.nbytes).exceeded(q)
    assert Bounds(2, q.nbytes).exceeded(q)
    assert Bounds(3, q.nbytes - 1).exceeded(q)


def test_send_queue_take_and_keep() -> None:
    q = SendQueue()
    for f in frames("o o o"):
        q.push(f)
    q.keep(lambda f: f.seq != 2)
    assert [f.seq for f in q.frames] == [1, 3] and q.nbytes == sum(len(f.data) for f in q.frames)
    assert [f.seq for f in q.take()] == [1, 3]
    assert (q.frames, q.nbytes) == ([], 0)


def test_wire_encodings() -> None:
    f = replayed_frame(7, b'{"type":"t"}')
    ctl = control("pong", id="p")
    assert websocket_encode([f]) == f.data
    assert websocket_encode([f, ctl]) == f.data + ctl.data
    assert f.data[0] == 0x81  # FIN + text opcode
    assert sse_encode([f, ctl]) == (b'id: 7\ndata: {"type":"event","seq":7,"event":{"type":"t"}}\n\n'
                                    b'event: pong\ndata: {"type":"pong","id":"p"}\n\n')


# --- the connection state machine -----------------------------------------------------------------


class _Channel:
    kind = "websocket"
    frames_are_wire = True
    encode = staticmethod(websocket_encode)

    class _Flag:
        on = True

    def __init__(self) -> None:
        self.on_writable = self.on_lost = self.on_shutdown = None
        self.flag = self._Flag()

    def fast_path(self) -> tuple[Any, Any]:
        return (lambda data: None), self.flag


def connection() -> Connection:
    return Connection(_Channel(), Principal(subject="u", tenant="t", expires_at=0.0), "c1")  # type: ignore[arg-type]


ALLOWED = {
    (ConnState.HANDSHAKING, ConnState.LIVE), (ConnState.HANDSHAKING, ConnState.CLOSED),
    (ConnState.LIVE, ConnState.REPLAYING), (ConnState.LIVE, ConnState.DRAINING), (ConnState.LIVE, ConnState.CLOSED),
    (ConnState.REPLAYING, ConnState.LIVE), (ConnState.REPLAYING, ConnState.DRAINING),
    (ConnState.REPLAYING, ConnState.CLOSED), (ConnState.DRAINING, ConnState.CLOSED),
}
PATHS = {  # how a fresh connection reaches each state
    ConnState.HANDSHAKING: [],
    ConnState.LIVE: [ConnState.LIVE],
    ConnState.REPLAYING: [ConnState.LIVE, ConnState.REPLAYING],
    ConnState.DRAINING: [ConnState.LIVE, ConnState.DRAINING],
    ConnState.CLOSED: [ConnState.CLOSED],
}


@pytest.mark.parametrize("start", list(ConnState), ids=lambda s: s.name)
@pytest.mark.parametrize("to", list(ConnState), ids=lambda s: s.name)
def test_state_transitions_are_checked(start: ConnState, to: ConnState) -> None:
    conn = connection()
    for step in PATHS[start]:
        conn.move(step)
    assert conn.state is start
    if (start, to) in ALLOWED:
        conn.move(to)
        assert conn.state is to
    else:
        with pytest.raises(StateError, match=f"{start.name} -> {to.name}"):
            conn.move(to)
        assert conn.state is start


def test_a_connection_is_its_own_live_queue_and_never_falsy() -> None:
    conn = connection()
    assert conn.queue is conn and len(conn) == 0 and conn  # empty queue, still a connection
    conn.push(control("pong"))
    assert len(conn.queue) == 1 and conn.nbytes == len(conn.frames[0].data)


def test_closed_means_draining_or_closed() -> None:
    conn = connection()
    assert not conn.closed
    conn.move(ConnState.LIVE)
    conn.move(ConnState.DRAINING)
    assert conn.closed


# --- the hub's replay seam, in-process ------------------------------------------------------------


class _Recording(_Channel):
    """A channel that records what is written and how it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.wire = bytearray()
        self.closed_with: int | None = None

    @property
    def writable(self) -> bool:
        return self.flag.on

    def write(self, data: bytes) -> bool:
        self.wire += data
        return True

    def fast_path(self) -> tuple[Any, Any]:
        return self.write, self.flag

    def close(self, code: int, reason: str = "") -> None:
        self.closed_with = code

    def seqs(self) -> list[int]:
        out = []
        for chunk in self.wire.split(b'{"type":"event","seq":')[1:]:
            out.append(int(chunk.split(b",", 1)[0]))
        return out


def _hub() -> Any:
    from gateway.config import Settings
    from gateway.core.hub import Hub
    from gateway.metrics import Metrics
    from gateway.permissions import AclStore

    acl = AclStore()
    acl.apply("t.org", orjson.dumps({"admins": ["user:u"]}))
    return Hub(Settings(jwks_url="http://127.0.0.1:9/jwks"), Metrics(), acl)


def _live(hub: Any, seq: int) -> None:
    from gateway.events import parse_event

    raw = orjson.dumps({"id": f"e{seq}", "type": "test.tick", "tenant": "t", "scope": SCOPE,
                        "time": "2026-01-01T00:00:00Z", "data": {}})
    hub.dispatch(seq, parse_event(raw, "events.t.conversation.c1"), raw)


@pytest.mark.usefixtures("fast_path")  # under both of fan-out's loops (tests/conftest.py)
async def test_draining_a_replaying_connection_writes_the_replay_but_not_the_held_live_frames() -> None:
    hub = _hub()
    ch = _Recording()
    for seq in range(1, 11):
        hub.skip(seq)  # the stream holds 1..10 before the client comes back
    conn = hub.open(ch, Principal(subject="u", tenant="t", expires_at=4e9), "c1")
    plan = hub.begin_replay(conn, None, [SCOPE], since=0)
    assert plan is not None and plan.target == 10 and conn.state is ConnState.REPLAYING
    assert await hub.deliver_replayed(conn, [replayed_frame(s, b"{}") for s in (1, 2, 3)])
    _live(hub, 11)
    _live(hub, 12)  # held: the replay has not reached 10 yet
    ch.flag.on = False  # the client stops reading; the next replay batch waits in the queue
    waiting = asyncio.ensure_future(hub.deliver_replayed(conn, [replayed_frame(4, b"{}")]))
    await asyncio.sleep(0)
    hub.go_away(conn)  # SIGTERM
    assert await waiting is False
    assert ch.closed_with == 1001 and conn.state is ConnState.CLOSED
    assert ch.seqs() == [1, 2, 3, 4]  # the queued replay batch, and nothing newer than the replay's position


@pytest.mark.usefixtures("fast_path")  # under both of fan-out's loops (tests/conftest.py)
async def test_end_of_replay_releases_the_held_frames_in_order() -> None:
    hub = _hub()
    ch = _Recording()
    hub.skip(5)
    conn = hub.open(ch, Principal(subject="u", tenant="t", expires_at=4e9), "c1")
    plan = hub.begin_replay(conn, None, [SCOPE], since=3)
    assert plan is not None and (plan.start, plan.target, plan.recovered) == (3, 5, True)
    _live(hub, 6)
    assert await hub.deliver_replayed(conn, [replayed_frame(4, b"{}"), replayed_frame(5, b"{}")])
    assert ch.seqs() == [4, 5]
    hub.end_replay(conn)
    assert conn.state is ConnState.LIVE
    hub.writer.flush()
    assert ch.seqs() == [4, 5, 6] and conn.written == 6
