"""The event contract: parse_event's verdicts, the typed catalogue, delivery classes, and docs/events.md
kept in step with the code."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.events import (
    EVENT_TYPES,
    KINDS,
    NAME_RE,
    Envelope,
    InvalidEvent,
    MessageDelta,
    ProcessStageChanged,
    StateDelta,
    coalesce_key,
    delivery_class,
    parse_event,
    parse_scope,
    subject_for,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "events.md"

# ---- helpers -------------------------------------------------------------------------------------


def envelope(type_: str, payload: Any = None, **fields: Any) -> dict[str, Any]:
    """A valid-by-default envelope dict with ``payload`` as data; ``fields`` override envelope keys
    (including ``data``) or, with the value ``...``, remove them."""
    body: dict[str, Any] = {
        "id": "evt-1",
        "type": type_,
        "tenant": "acme",
        "scope": "conversation:c1",
        "time": "2025-06-01T12:00:00Z",
        "run_id": "run-1",
        "data": {} if payload is None else payload,
    }
    for key, value in fields.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def parse(body: dict[str, Any], subject: str | None = None, prefix: str = "events") -> Envelope:
    if subject is None:
        subject = f"{prefix}.{body['tenant']}.{body['scope'].replace(':', '.')}"
    return parse_event(orjson.dumps(body), subject, prefix)


def reason_of(
    raw: bytes | dict[str, Any], subject: str = "events.acme.conversation.c1", prefix: str = "events"
) -> str:
    """The reason parse_event rejects ``raw`` with (failing the test if it accepts it)."""
    payload = orjson.dumps(raw) if isinstance(raw, dict) else raw
    with pytest.raises(InvalidEvent) as info:
        parse_event(payload, subject, prefix)
    assert info.value.reason in InvalidEvent.REASONS
    assert info.value.message  # something to log
    return info.value.reason


# Scope a catalogue type needs: conversation.* and process.* are bound to their kind.
def scope_for(type_: str) -> str:
    if type_.startswith("process."):
        return "process:p1"
    return "conversation:c1"


# Smallest valid data of every catalogue type, and a data object each model must reject.
MINIMAL: dict[str, dict[str, Any]] = {
    "run.started": {},
    "run.finished": {"outcome": "success"},
    "run.step.started": {"step_id": "s1", "name": "plan"},
    "run.step.finished": {"step_id": "s1", "name": "plan"},
    "run.reasoning.started": {"message_id": "r1"},
    "run.reasoning.delta": {"message_id": "r1", "delta": "hmm"},
    "run.reasoning.finished": {"message_id": "r1"},
    "run.message.started": {"message_id": "m1"},
    "run.message.delta": {"message_id": "m1", "delta": "Hi"},
    "run.message.finished": {"message_id": "m1"},
    "run.tool_call.started": {"tool_call_id": "t1", "name": "search"},
    "run.tool_call.args.delta": {"tool_call_id": "t1", "delta": "{"},
    "run.tool_call.args.finished": {"tool_call_id": "t1"},
    "run.tool_call.finished": {"tool_call_id": "t1"},
    "run.tool_call.error": {"tool_call_id": "t1", "error": "boom"},
    "run.state.snapshot": {"state": {}},
    "run.state.delta": {"patch": []},
    "run.messages.snapshot": {"messages": []},
    "conversation.message.created": {"message_id": "m1", "role": "user", "content": "hello"},
    "conversation.message.updated": {"message_id": "m1", "content": [{"type": "text", "text": "hi"}]},
    "conversation.message.deleted": {"message_id": "m1"},
    "conversation.participant.joined": {"participant_id": "u1"},
    "conversation.participant.left": {"participant_id": "u1"},
    "conversation.metadata.updated": {"metadata": {"title": "t"}},
    "process.started": {"name": "Refund"},
    "process.stage_changed": {"stage": "review", "index": 0, "total": 1},
    "process.progress": {"message": "working"},
    "process.input_required": {"request_id": "q1", "prompt": "Approve?"},
    "process.input_received": {"request_id": "q1", "by": "u1"},
    "process.completed": {},
    "process.failed": {"error": "broken"},
    "process.cancelled": {},
}

BROKEN: dict[str, dict[str, Any]] = {
    "run.started": {"agent_id": 7},
    "run.finished": {"outcome": "exploded"},
    "run.step.started": {"step_id": "s1"},
    "run.step.finished": {"name": "plan"},
    "run.reasoning.started": {},
    "run.reasoning.delta": {"message_id": "r1"},
    "run.reasoning.finished": {"message_id": ""},
    "run.message.started": {"message_id": "m1", "role": "robot"},
    "run.message.delta": {"message_id": "m1", "delta": 5},
    "run.message.finished": {"content": "done"},
    "run.tool_call.started": {"tool_call_id": "t1"},
    "run.tool_call.args.delta": {"delta": "{"},
    "run.tool_call.args.finished": {"tool_call_id": "t1", "arguments": {"a": 1}},
    "run.tool_call.finished": {"result": 1},
    "run.tool_call.error": {"tool_call_id": "t1", "error": ""},
    "run.state.snapshot": {"state": [1, 2]},
    "run.state.delta": {"patch": [{"op": "add", "path": "/a"}]},
    "run.messages.snapshot": {"messages": "all of them"},
    "conversation.message.created": {"message_id": "m1", "role": "user"},
    "conversation.message.updated": {"message_id": "m1", "content": 42},
    "conversation.message.deleted": {},
    "conversation.participant.joined": {"participant_id": "u1", "participant_type": "cat"},
    "conversation.participant.left": {"participant_id": ""},
    "conversation.metadata.updated": {"metadata": "title"},
    "process.started": {"name": ""},
    "process.stage_changed": {"stage": "review", "index": 3, "total": 3},
    "process.progress": {"fraction": 1.5},
    "process.input_required": {"request_id": "q1", "prompt": "Approve?", "expires_at": "2025-06-01T12:00:00"},
    "process.input_received": {"request_id": "q1"},
    # process.completed is absent: its only field is an optional ``Any``, so no object breaks it
    # (data that is not an object is an envelope error, tested in test_bad_envelope).
    "process.failed": {"stage": "pay"},
    "process.cancelled": {"by": ""},
}

# The delivery classes the brief prescribes, spelled out independently of the code's table.
LIFECYCLE = {
    "run.started", "run.finished", "run.step.started", "run.step.finished",
    "run.reasoning.started", "run.reasoning.finished",
    "run.message.started", "run.message.finished",
    "run.tool_call.started", "run.tool_call.args.finished", "run.tool_call.finished", "run.tool_call.error",
    "process.input_required", "process.input_received",
    "process.started", "process.completed", "process.failed", "process.cancelled",
    "conversation.participant.joined", "conversation.participant.left",
    "conversation.message.created", "conversation.message.deleted",
}  # fmt: skip
DELTA = {"run.reasoning.delta", "run.message.delta", "run.tool_call.args.delta"}
OTHER = {
    "run.messages.snapshot", "conversation.message.updated", "conversation.metadata.updated",
    "process.stage_changed", "process.progress",
}  # fmt: skip


# ---- the catalogue -------------------------------------------------------------------------------


def test_catalogue_covers_the_brief() -> None:
    required = {
        "run.started", "run.finished", "run.step.started", "run.step.finished", "run.reasoning.delta",
        "run.message.started", "run.message.delta", "run.message.finished", "run.tool_call.started",
        "run.tool_call.args.delta", "run.tool_call.finished", "run.tool_call.error",
        "run.state.snapshot", "run.state.delta",
        "conversation.message.created", "conversation.message.updated", "conversation.message.deleted",
        "conversation.participant.joined", "conversation.participant.left",
        "conversation.metadata.updated",
        "process.started", "process.stage_changed", "process.progress", "process.input_required",
        "process.input_received", "process.completed", "process.failed", "process.cancelled",
    }  # fmt: skip
    assert required <= set(EVENT_TYPES)
    assert set(MINIMAL) == set(EVENT_TYPES)
    assert set(BROKEN) == set(EVENT_TYPES) - {"process.completed"}


@pytest.mark.parametrize("type_", sorted(EVENT_TYPES))
def test_minimal_data_of_every_type_is_valid(type_: str) -> None:
    env = parse(envelope(type_, MINIMAL[type_], scope=scope_for(type_)))
    assert env.type == type_
    assert env.data == MINIMAL[type_]


@pytest.mark.parametrize("type_", sorted(BROKEN))
def test_data_that_does_not_fit_its_model_is_invalid(type_: str) -> None:
    body = envelope(type_, BROKEN[type_], scope=scope_for(type_))
    assert reason_of(body, subject_for("events", "acme", body["scope"])) == "data"


def test_data_without_required_fields_is_invalid_for_every_type_that_has_some() -> None:
    for type_, model in EVENT_TYPES.items():
        required = [f for f in model.model_fields.values() if f.is_required()]
        body = envelope(type_, {}, scope=scope_for(type_))
        subject = subject_for("events", "acme", body["scope"])
        if required or type_ == "process.progress":  # progress needs a fraction or a message
            assert reason_of(body, subject) == "data", type_
        else:
            assert parse_event(orjson.dumps(body), subject).data == {}


@pytest.mark.parametrize("type_", sorted(EVENT_TYPES))
def test_extra_data_fields_are_allowed_and_kept(type_: str) -> None:
    data = {**MINIMAL[type_], "x_future_field": {"nested": [1, 2]}}
    env = parse(envelope(type_, data, scope=scope_for(type_)))
    assert env.data["x_future_field"] == {"nested": [1, 2]}


def test_delivery_classes() -> None:
    for type_ in EVENT_TYPES:
        expected = (
            "lifecycle" if type_ in LIFECYCLE
            else "delta" if type_ in DELTA
            else "snapshot" if type_ == "run.state.snapshot"
            else "state_delta" if type_ == "run.state.delta"
            else "other"
        )  # fmt: skip
        assert delivery_class(type_) == expected, type_
    assert OTHER <= set(EVENT_TYPES)
    assert {t for t in EVENT_TYPES if delivery_class(t) == "other"} == OTHER
    assert delivery_class("billing.invoice.paid") == "other"
    assert delivery_class("run.custom.thing") == "other"


def test_coalesce_key_names_the_stream_of_a_delta() -> None:
    reasoning = parse(envelope("run.reasoning.delta", {"message_id": "r1", "delta": "a"}))
    message = parse(envelope("run.message.delta", {"message_id": "m1", "delta": "a"}))
    args = parse(envelope("run.tool_call.args.delta", {"tool_call_id": "t1", "delta": "{"}))
    assert coalesce_key(reasoning) == ("run.reasoning.delta", "r1")
    assert coalesce_key(message) == ("run.message.delta", "m1")
    assert coalesce_key(args) == ("run.tool_call.args.delta", "t1")
    # Same message id, different delta types: different streams.
    assert coalesce_key(parse(envelope("run.reasoning.delta", {"message_id": "m1", "delta": "a"}))) != (
        coalesce_key(message)
    )
    for type_ in EVENT_TYPES.keys() - DELTA:
        assert coalesce_key(parse(envelope(type_, MINIMAL[type_], scope=scope_for(type_)))) is None, type_
    unknown = parse(envelope("custom.delta", {"message_id": "m1", "delta": "x"}))
    assert coalesce_key(unknown) is None


# ---- envelope ------------------------------------------------------------------------------------


def test_envelope_properties() -> None:
    env = parse(
        envelope("process.progress", {"fraction": 0.5}, scope="process:p-7", time="2025-06-01T14:00:00+02:00")
    )
    assert (env.kind, env.resource_id) == ("process", "p-7")
    assert env.timestamp == datetime(2025, 6, 1, 12, 0, tzinfo=UTC).timestamp()
    assert env.time.utcoffset() == timedelta(hours=2)


def test_optional_envelope_fields_and_unknown_top_level_fields() -> None:
    body = envelope(
        "run.message.delta",
        {"message_id": "m1", "delta": "x"},
        actor="agent:bot",
        trace={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        future_envelope_field={"anything": True},
    )
    env = parse(body)
    assert env.actor == "agent:bot"
    assert env.run_id == "run-1"
    assert env.trace == {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    assert not hasattr(env, "future_envelope_field")


def test_data_defaults_to_empty_object() -> None:
    env = parse(envelope("process.completed", scope="process:p1", data=...))
    assert env.data == {}


def test_unknown_type_passes_through_with_data_untouched() -> None:
    data = {"amount": 12.5, "items": [{"sku": "A", "qty": 2}], "note": None, "nested": {"deep": [[]]}}
    body = envelope("billing.invoice.paid", data, scope="agent:billing-bot", run_id=...)
    env = parse(body)
    assert env.type == "billing.invoice.paid"
    assert env.data == data
    assert json.loads(orjson.dumps(env.data)) == data
    assert delivery_class(env.type) == "other"


# ---- each invalid reason -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "prefix"),
    [
        ("other.acme.conversation.c1", "events"),
        ("events.acme.conversation", "events"),
        ("events.acme.conversation.c1.extra", "events"),
        ("events.acme.thread.c1", "events"),
        ("events.ac me.conversation.c1", "events"),
        ("events..conversation.c1", "events"),
        ("events.acme.conversation." + "x" * 129, "events"),
        ("eventsX.acme.conversation.c1", "events"),
        ("events.acme.conversation.c1", "acme.events"),
        ("events.acme.conversation.c1\n", "events"),
        ("events.acme\n.conversation.c1", "events"),
    ],
)
def test_bad_subject(subject: str, prefix: str) -> None:
    assert reason_of(envelope("run.started"), subject, prefix) == "subject"


@pytest.mark.parametrize("raw", [b"{", b"", b"not json", b"[1, 2]", b'"text"', b"42", b"null", b"\xff\xfe"])
def test_body_not_a_json_object(raw: bytes) -> None:
    assert reason_of(raw) == "json"


@pytest.mark.parametrize(
    "fields",
    [
        {"id": ...},
        {"id": ""},
        {"id": "x" * 129},
        {"id": "has space"},
        {"id": "line\nbreak"},
        {"type": ...},
        {"type": ""},
        {"type": "run..started"},
        {"type": "run started"},
        {"tenant": ...},
        {"tenant": 7},
        {"scope": ...},
        {"scope": "conversation"},
        {"scope": "thread:c1"},
        {"scope": "conversation:c 1"},
        {"time": ...},
        {"time": "2025-06-01T12:00:00"},
        {"time": 1748779200},
        {"time": "yesterday"},
        {"data": [1, 2]},
        {"data": None},
        {"data": "text"},
        {"actor": 5},
        {"run_id": ""},
        {"trace": {"traceparent": 1}},
    ],
    ids=repr,
)
def test_bad_envelope(fields: dict[str, Any]) -> None:
    assert reason_of(envelope("run.started", **fields)) == "envelope"


def test_scope_mismatch_with_subject() -> None:
    body = envelope("run.started", scope="conversation:c2")
    assert reason_of(body, "events.acme.conversation.c1") == "scope_mismatch"
    body = envelope("run.started", scope="process:c1")
    assert reason_of(body, "events.acme.conversation.c1") == "scope_mismatch"
    body = envelope("run.started", scope="conversation:c1")
    assert reason_of(body, "events.acme.agent.c1") == "scope_mismatch"


def test_tenant_mismatch_with_subject() -> None:
    body = envelope("run.started", tenant="globex")
    assert reason_of(body, "events.acme.conversation.c1") == "tenant_mismatch"


def test_run_types_require_run_id() -> None:
    for type_ in (t for t in EVENT_TYPES if t.startswith("run.")):
        assert reason_of(envelope(type_, MINIMAL[type_], run_id=...)) == "data", type_
    # Unknown run.* types too: the gateway groups run events by run_id.
    assert reason_of(envelope("run.custom.progress", {"x": 1}, run_id=...)) == "data"
    # Other types do not need it.
    env = parse(envelope("conversation.message.deleted", {"message_id": "m1"}, run_id=...))
    assert env.run_id is None


@pytest.mark.parametrize("kind", KINDS)
def test_run_events_may_be_scoped_to_any_kind(kind: str) -> None:
    env = parse(envelope("run.message.delta", {"message_id": "m1", "delta": "x"}, scope=f"{kind}:r1"))
    assert env.kind == kind


def test_conversation_and_process_types_are_bound_to_their_kind() -> None:
    body = envelope("process.progress", {"fraction": 0.5}, scope="conversation:c1")
    assert reason_of(body, "events.acme.conversation.c1") == "data"
    body = envelope("conversation.message.deleted", {"message_id": "m1"}, scope="agent:a1")
    assert reason_of(body, "events.acme.agent.a1") == "data"


def test_invalid_event_is_a_value_error_with_a_bounded_reason() -> None:
    err = InvalidEvent("data", "x")
    assert isinstance(err, ValueError)
    assert (err.reason, err.message) == ("data", "x")
    assert set(InvalidEvent.REASONS) == {
        "json",
        "envelope",
        "subject",
        "scope_mismatch",
        "tenant_mismatch",
        "data",
    }


def test_error_messages_do_not_echo_the_payload() -> None:
    secret = "s3cr3t-value-" + "y" * 50
    with pytest.raises(InvalidEvent) as info:
        parse(envelope("run.message.delta", {"message_id": "m1", "delta": 5, "secret": secret}))
    assert secret not in info.value.message
    with pytest.raises(InvalidEvent) as info:
        parse(envelope("run.started", time=secret))
    assert secret not in info.value.message


# ---- typed data details --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch",
    [
        [{"op": "add", "path": "/a/-", "value": None}],
        [{"op": "remove", "path": "/a/0"}],
        [{"op": "replace", "path": "", "value": {"whole": "doc"}}],
        [{"op": "move", "from": "/a", "path": "/b"}],
        [{"op": "copy", "from": "/a~1b", "path": "/c~0d"}],
        [{"op": "test", "path": "/a", "value": 1}, {"op": "remove", "path": "/a"}],
    ],
)
def test_valid_json_patch(patch: list[dict[str, Any]]) -> None:
    env = parse(envelope("run.state.delta", {"patch": patch}))
    assert env.data["patch"] == patch


@pytest.mark.parametrize(
    "patch",
    [
        [{"op": "add", "path": "/a"}],
        [{"op": "replace", "path": "/a"}],
        [{"op": "test", "path": "/a"}],
        [{"op": "move", "path": "/b"}],
        [{"op": "copy", "path": "/b", "value": 1}],
        [{"op": "remove"}],
        [{"op": "frobnicate", "path": "/a"}],
        [{"path": "/a", "value": 1}],
        [{"op": "add", "path": "a", "value": 1}],
        [{"op": "add", "path": "/a~2", "value": 1}],
        [{"op": "remove", "path": "/ok"}, "not an op"],
        {"op": "remove", "path": "/a"},
    ],
)
def test_invalid_json_patch(patch: Any) -> None:
    assert reason_of(envelope("run.state.delta", {"patch": patch})) == "data"


def test_state_delta_model_round_trips_from_alias() -> None:
    model = StateDelta.model_validate({"patch": [{"op": "move", "from": "/a", "path": "/b"}]})
    dumped = model.model_dump(mode="json", by_alias=True)
    assert dumped["patch"] == [{"op": "move", "from": "/a", "path": "/b"}]


def test_process_stage_index_must_be_below_total() -> None:
    assert ProcessStageChanged(stage="s", index=2, total=3).index == 2
    with pytest.raises(ValueError, match="less than total"):
        ProcessStageChanged(stage="s", index=3, total=3)
    for bad in ({"index": -1, "total": 3}, {"index": 0, "total": 0}):
        body = envelope("process.stage_changed", {"stage": "s", **bad}, scope="process:p1")
        assert reason_of(body, "events.acme.process.p1") == "data"


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        ({"fraction": 0}, True),
        ({"fraction": 1}, True),
        ({"fraction": 0.25, "message": "a quarter"}, True),
        ({"message": "working"}, True),
        ({}, False),
        ({"fraction": -0.01}, False),
        ({"fraction": 1.01}, False),
        ({"fraction": None, "message": None}, False),
    ],
)
def test_process_progress(data: dict[str, Any], ok: bool) -> None:
    body = envelope("process.progress", data, scope="process:p1")
    if ok:
        assert parse(body).data == data
    else:
        assert reason_of(body, "events.acme.process.p1") == "data"


def test_input_required_expiry_needs_a_timezone() -> None:
    data = {
        "request_id": "q1", "prompt": "ok?", "assignees": ["u1", "group-ops"],
        "expires_at": "2025-06-02T00:00:00Z",
    }  # fmt: skip
    assert parse(envelope("process.input_required", data, scope="process:p1")).data == data
    subject = "events.acme.process.p1"
    for bad in ({**data, "assignees": "u1"}, {**data, "expires_at": "2025-06-02T00:00:00"}):
        assert reason_of(envelope("process.input_required", bad, scope="process:p1"), subject) == "data"


def test_run_finished_outcomes() -> None:
    for outcome in ("success", "error", "cancelled", "interrupted"):
        assert parse(envelope("run.finished", {"outcome": outcome})).data["outcome"] == outcome
    env = parse(envelope("run.finished", {"outcome": "error", "error": "model overloaded"}))
    assert env.data["error"] == "model overloaded"
    assert reason_of(envelope("run.finished", {})) == "data"
    negative = {"outcome": "success", "usage": {"input_tokens": -1}}
    assert reason_of(envelope("run.finished", negative)) == "data"


def test_data_models_build_publishable_payloads() -> None:
    data = MessageDelta(message_id="m1", delta="hi").model_dump(mode="json", by_alias=True)
    assert parse(envelope("run.message.delta", data)).data == data


# ---- subjects and scopes -------------------------------------------------------------------------


def test_prefix_with_dots() -> None:
    body = envelope("run.started", scope="agent:bot-1")
    subject = subject_for("acme.prod.events", "acme", "agent:bot-1")
    assert subject == "acme.prod.events.acme.agent.bot-1"
    env = parse_event(orjson.dumps(body), subject, "acme.prod.events")
    assert env.resource_id == "bot-1"
    # The same subject read with the default prefix is not an event subject.
    assert reason_of(body, subject, "events") == "subject"
    # A tenant named like a prefix token does not confuse the split.
    assert reason_of(body, "acme.prod.events.agent.bot-1", "acme.prod.events") == "subject"


def test_subject_for_and_parse_scope() -> None:
    assert subject_for("events", "acme", "conversation:c-1_a") == "events.acme.conversation.c-1_a"
    assert parse_scope("process:p1") == ("process", "p1")
    assert parse_scope("agent:" + "a" * 128) == ("agent", "a" * 128)
    for bad in ("conversation", "conversation:", ":c1", "thread:c1", "conversation:c.1", "agent:" + "a" * 129,
                "conversation:c1:x", "conversation:c*", "conversation:c1\n"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_scope(bad)
    for prefix, tenant, scope in (
        ("events", "ac.me", "conversation:c1"),
        ("events", "", "conversation:c1"),
        ("events", "acme", "bad"),
        ("events", "acme\n", "conversation:c1"),
        ("events", "acme", "conversation:c1\r\n"),
        ("events.>", "acme", "conversation:c1"),
        ("events.*", "acme", "conversation:c1"),
        ("", "acme", "conversation:c1"),
        ("events.", "acme", "conversation:c1"),
        ("ev ents", "acme", "conversation:c1"),
    ):
        with pytest.raises(ValueError):
            subject_for(prefix, tenant, scope)


def test_name_re() -> None:
    assert NAME_RE.match("Az09_-")
    assert NAME_RE.match("a" * 128)
    for bad in ("", "a" * 129, "a.b", "a b", "a*", "é", "a\n", "a\r\n"):
        assert not NAME_RE.match(bad), bad


def test_time_with_offsets_and_fractions() -> None:
    env = parse(envelope("run.started", time="2025-06-01T12:00:00.123456-05:30"))
    expected = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone(-timedelta(hours=5, minutes=30)))
    assert env.time == expected
    assert env.timestamp == pytest.approx(expected.timestamp())


# ---- docs/events.md ------------------------------------------------------------------------------


def doc_sections() -> dict[str, str]:
    """``#### `type` `` sections of docs/events.md, by type."""
    text = DOC.read_text()
    parts = re.split(r"^#### `([^`]+)`\s*$", text, flags=re.M)
    sections = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sections[name] = re.split(r"^#{1,3} ", body, flags=re.M)[0]
    return sections


def test_docs_describe_exactly_the_catalogue() -> None:
    assert set(doc_sections()) == set(EVENT_TYPES)


@pytest.mark.parametrize("type_", sorted(EVENT_TYPES))
def test_docs_section_matches_code(type_: str) -> None:
    section = doc_sections()[type_]
    klass = re.search(r"Delivery class: `(\w+)`", section)
    assert klass, f"{type_}: no delivery class in docs"
    assert klass.group(1) == delivery_class(type_)

    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    model = EVENT_TYPES[type_]
    fields = {f.alias or name for name, f in model.model_fields.items()}
    assert set(documented) == fields
    for name, f in model.model_fields.items():
        cell = r"(?:[^|\\]|\\.)*"  # a table cell, where "\|" is an escaped pipe
        row = re.search(rf"^\| `{f.alias or name}` \|{cell}\|({cell})\|", section, flags=re.M)
        assert row, (type_, name)
        assert row.group(1).strip().startswith("yes") == f.is_required(), (type_, name)

    examples = re.findall(r"```json\n(.*?)```", section, flags=re.S)
    assert len(examples) == 1, type_
    body = json.loads(examples[0])
    assert body["type"] == type_
    env = parse_event(examples[0].encode(), subject_for("events", body["tenant"], body["scope"]))
    assert env.data == body["data"]


def test_docs_envelope_example_and_reasons() -> None:
    text = DOC.read_text()
    envelope_section = text.split("## Envelope", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```json\n(.*?)```", envelope_section, flags=re.S)
    assert example
    body = json.loads(example.group(1))
    parse_event(example.group(1).encode(), subject_for("events", body["tenant"], body["scope"]))
    invalid_section = text.split("## Invalid events", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `(\w+)` +\|", invalid_section, flags=re.M)) == set(InvalidEvent.REASONS)
    assert "wsgateway_events_invalid_total" in invalid_section


def test_time_now_is_accepted() -> None:
    now = datetime.now(UTC).isoformat()
    assert parse(envelope("run.started", time=now)).time.tzinfo is not None
