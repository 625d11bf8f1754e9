"""The publisher against a real nats-server with JetStream: what lands in the stream, de-duplication,
trace propagation, and bad input refused before any network traffic."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig
from nats.js.errors import APIError

from gateway import Envelope, InvalidEvent, Publisher, parse_event
from gateway.devtools.natsproc import NatsProcess
from gateway.events import MessageDelta, StateDelta
from gateway.sdk.publisher import new_event_id

DOC = Path(__file__).resolve().parent.parent / "docs" / "events.md"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Nats:
    nc: Client
    js: JetStreamContext
    url: str

    async def count(self, stream: str = "EVENTS") -> int:
        return int((await self.js.stream_info(stream)).state.messages)

    async def msg(self, seq: int, stream: str = "EVENTS") -> RawStreamMsg:
        return await self.js.get_msg(stream, seq)


@pytest.fixture
async def bus(nats_server: NatsProcess) -> AsyncIterator[Nats]:
    """A client of a fresh nats-server with the EVENTS stream on ``events.>`` (2-minute dedup window)."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"], duplicate_window=120.0))
    try:
        yield Nats(nc, js, nats_server.url)
    finally:
        await nc.close()


async def test_publish_lands_in_the_stream_as_a_valid_event(bus: Nats) -> None:
    pub = Publisher(bus.js)
    before = datetime.now(UTC)
    ack = await pub.publish(
        tenant="acme",
        scope="conversation:c1",
        type="run.message.delta",
        run_id="run-1",
        actor="agent:bot",
        data={"message_id": "m1", "delta": "Hello"},
    )
    assert (ack.stream, ack.seq) == ("EVENTS", 1)
    assert not ack.duplicate
    msg = await bus.msg(1)
    assert msg.subject == "events.acme.conversation.c1"
    assert msg.headers is not None
    env = parse_event(msg.data, msg.subject)
    assert msg.headers["Nats-Msg-Id"] == env.id
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", env.id)
    assert (env.type, env.tenant, env.scope, env.run_id, env.actor) == (
        "run.message.delta", "acme", "conversation:c1", "run-1", "agent:bot"
    )  # fmt: skip
    assert env.data == {"message_id": "m1", "delta": "Hello"}
    assert env.time.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= env.time <= datetime.now(UTC) + timedelta(seconds=1)
    assert env.trace is None
    assert "traceparent" not in msg.headers  # no explicit one and no active span
    assert b": " not in msg.data and b", " not in msg.data  # compact
    assert await bus.count() == 1


async def test_ids_are_fresh_and_sortable() -> None:
    ids = [new_event_id() for _ in range(200)]
    assert len(set(ids)) == 200
    await asyncio.sleep(0.002)  # the clock is the subject: a later millisecond sorts later
    later = new_event_id()
    assert all(later > i for i in ids)


async def test_explicit_id_time_and_model_data(bus: Nats) -> None:
    pub = Publisher(bus.js)
    when = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    ack = await pub.publish(
        tenant="acme",
        scope="process:p1",
        type="run.state.delta",
        run_id="run-1",
        data=StateDelta.model_validate({"patch": [{"op": "move", "from": "/a", "path": "/b"}]}),
        event_id="evt-42",
        time=when,
    )
    msg = await bus.msg(ack.seq)
    env = parse_event(msg.data, msg.subject)
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == "evt-42" == env.id
    assert env.time == when
    assert env.data == {"patch": [{"op": "move", "from": "/a", "path": "/b"}]}  # alias, not from_


async def test_same_event_id_twice_is_stored_once(bus: Nats) -> None:
    pub = Publisher(bus.js)
    event = {
        "tenant": "acme", "scope": "conversation:c1", "type": "conversation.message.deleted",
        "data": {"message_id": "m1"}, "event_id": "evt-dup",
    }  # fmt: skip
    first = await pub.publish(**event)
    second = await pub.publish(**event)
    assert not first.duplicate
    assert second.duplicate is True
    assert second.seq == first.seq
    assert await bus.count() == 1
    third = await pub.publish(**{**event, "event_id": "evt-other"})
    assert not third.duplicate
    assert await bus.count() == 2


async def test_traceparent_header_and_envelope(bus: Nats) -> None:
    pub = Publisher(bus.js)
    ack = await pub.publish(
        tenant="acme", scope="agent:bot", type="run.started", run_id="run-1", traceparent=TRACEPARENT
    )
    msg = await bus.msg(ack.seq)
    assert msg.headers is not None and msg.headers["traceparent"] == TRACEPARENT
    assert parse_event(msg.data, msg.subject).trace == {"traceparent": TRACEPARENT}


async def test_traceparent_from_the_active_opentelemetry_span(bus: Nats) -> None:
    otel = pytest.importorskip("opentelemetry.trace")
    ctx = otel.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=otel.TraceFlags(1),
    )
    pub = Publisher(bus.js)
    expected = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with otel.use_span(otel.NonRecordingSpan(ctx)):
        ack = await pub.publish(tenant="acme", scope="agent:bot", type="agent.ping")
        explicit = await pub.publish(
            tenant="acme", scope="agent:bot", type="agent.ping", traceparent=TRACEPARENT
        )
    msg = await bus.msg(ack.seq)
    assert msg.headers is not None and msg.headers["traceparent"] == expected
    assert parse_event(msg.data, msg.subject).trace == {"traceparent": expected}
    msg = await bus.msg(explicit.seq)
    assert msg.headers is not None and msg.headers["traceparent"] == TRACEPARENT  # explicit wins


GOOD: dict[str, Any] = {
    "tenant": "acme",
    "scope": "conversation:c1",
    "type": "run.message.delta",
    "run_id": "run-1",
    "data": {"message_id": "m1", "delta": "x"},
}

BAD_INPUTS: list[tuple[str, dict[str, Any]]] = [
    ("tenant with a dot", {"tenant": "ac.me"}),
    ("empty tenant", {"tenant": ""}),
    ("wildcard tenant", {"tenant": "*"}),
    ("scope without kind", {"scope": "c1"}),
    ("unknown kind", {"scope": "thread:c1"}),
    ("scope id with a dot", {"scope": "conversation:c.1"}),
    ("run event without run_id", {"run_id": None}),
    ("data that does not fit", {"data": {"message_id": "m1"}}),
    ("data not an object", {"data": ["m1"]}),
    ("data not JSON", {"data": {"message_id": "m1", "delta": "x", "obj": object()}}),
    ("naive time", {"time": datetime(2025, 6, 1, 12, 0)}),
    ("event id with a space", {"event_id": "a b"}),
    ("event id with a newline", {"event_id": "a\r\nX-Evil: 1"}),
    ("event id too long", {"event_id": "x" * 129}),
    ("empty event id", {"event_id": ""}),
    ("bad traceparent", {"traceparent": "not-a-trace"}),
    ("bad type", {"type": "run message delta"}),
    ("process type on a conversation", {"type": "process.progress", "data": {"fraction": 0.5}}),
]


@pytest.mark.parametrize(("why", "override"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_raises_value_error_and_publishes_nothing(
    bus: Nats, why: str, override: dict[str, Any]
) -> None:
    pub = Publisher(bus.js)
    with pytest.raises(ValueError):
        await pub.publish(**{**GOOD, **override})
    assert await bus.count() == 0
    await pub.publish(**GOOD)  # the same publisher still works
    assert await bus.count() == 1


async def test_contract_violations_are_invalid_events(bus: Nats) -> None:
    pub = Publisher(bus.js)
    with pytest.raises(InvalidEvent) as info:
        await pub.publish(**{**GOOD, "run_id": None})
    assert info.value.reason == "data"
    assert "run_id" in info.value.message


async def test_bad_input_is_refused_before_touching_the_network(nats_server: NatsProcess) -> None:
    nc = await nats.connect(nats_server.url)
    pub = Publisher(nc.jetstream())
    await nc.close()
    for _, override in BAD_INPUTS:
        with pytest.raises(ValueError):
            await pub.publish(**{**GOOD, **override})
    # A good event does reach for the (closed) connection: the check above is not vacuous.
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pub.publish(**GOOD)


async def test_bad_prefix_is_refused() -> None:
    for prefix in ("", "events.", "events.>", "ev ents", "a..b"):
        with pytest.raises(ValueError):
            Publisher(None, subject_prefix=prefix)  # type: ignore[arg-type]


async def test_prefix_with_dots_and_another_stream(bus: Nats) -> None:
    await bus.js.add_stream(StreamConfig(name="ACME", subjects=["acme.prod.events.>"]))
    pub = Publisher(bus.js, subject_prefix="acme.prod.events", stream="ACME")
    ack = await pub.publish(tenant="t1", scope="process:p-9", type="process.progress", data={"fraction": 0.5})
    assert ack.stream == "ACME"
    msg = await bus.msg(ack.seq, "ACME")
    assert msg.subject == "acme.prod.events.t1.process.p-9"
    env = parse_event(msg.data, msg.subject, "acme.prod.events")
    assert env.data == {"fraction": 0.5}
    assert await bus.count() == 0


async def test_expected_stream_is_enforced(bus: Nats) -> None:
    pub = Publisher(bus.js, stream="SOMEWHERE_ELSE")
    with pytest.raises(APIError):
        await pub.publish(**GOOD)
    assert await bus.count() == 0
    unchecked = Publisher(bus.js, stream=None)
    assert (await unchecked.publish(**GOOD)).stream == "EVENTS"


async def test_publish_envelope(bus: Nats) -> None:
    pub = Publisher(bus.js)
    env = Envelope(
        id="evt-env-1",
        type="run.tool_call.finished",
        tenant="acme",
        scope="agent:bot",
        time=datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
        run_id="run-1",
        data={"tool_call_id": "t1", "result": None},
    )
    ack = await pub.publish_envelope(env, traceparent=TRACEPARENT)
    msg = await bus.msg(ack.seq)
    assert msg.subject == "events.acme.agent.bot"
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == "evt-env-1"
    assert msg.headers["traceparent"] == TRACEPARENT
    got = parse_event(msg.data, msg.subject)
    assert got.model_dump(exclude={"trace"}) == env.model_dump(exclude={"trace"})
    assert got.data == {"tool_call_id": "t1", "result": None}  # None inside data is kept
    assert "actor" not in orjson.loads(msg.data)  # unset envelope fields are left out

    bad = env.model_copy(update={"data": {"result": 1}})  # model_copy does not validate
    with pytest.raises(ValueError):
        await pub.publish_envelope(bad)
    assert await bus.count() == 1


async def test_model_data_round_trips(bus: Nats) -> None:
    pub = Publisher(bus.js)
    ack = await pub.publish(**{**GOOD, "data": MessageDelta(message_id="m9", delta="chunk")})
    msg = await bus.msg(ack.seq)
    assert parse_event(msg.data, msg.subject).data == {"message_id": "m9", "delta": "chunk"}


async def test_connect_owns_and_closes_its_connection(bus: Nats) -> None:
    pub = await Publisher.connect(bus.url, name="test-publisher")
    ack = await pub.publish(**GOOD)
    assert ack.seq == 1
    await pub.close()
    await pub.close()  # idempotent
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pub.publish(**GOOD)
    assert await bus.count() == 1

    async with await Publisher.connect([bus.url], subject_prefix="events") as scoped:
        await scoped.publish(**GOOD)
    with pytest.raises(nats.errors.ConnectionClosedError):
        await scoped.publish(**GOOD)
    assert await bus.count() == 2


async def test_close_leaves_a_borrowed_connection_open(bus: Nats) -> None:
    pub = Publisher(bus.js)
    await pub.close()
    assert bus.nc.is_connected
    assert (await pub.publish(**GOOD)).seq == 1


async def test_docs_example_runs(bus: Nats) -> None:
    """The Python example in docs/events.md works as written (pointed at the test server)."""
    text = DOC.read_text()
    code = re.search(r"## Publishing from Python.*?```python\n(.*?)```", text, flags=re.S)
    assert code
    source = code.group(1).replace("nats://127.0.0.1:4222", bus.url)
    assert bus.url in source
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", source, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["EVENTS", "7"]
    types = []
    for seq in range(1, 8):
        msg = await bus.msg(seq)
        types.append(parse_event(msg.data, msg.subject).type)
    assert types == [
        "run.started", "run.message.started", "run.message.delta", "run.message.delta",
        "run.message.delta", "run.message.finished", "run.finished",
    ]  # fmt: skip
