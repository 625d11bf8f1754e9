"""The AG-UI mapping (gateway/agui_map.py) against the shared vectors, and docs/events.md's table against them.

clients/js/test/ag-ui.test.mjs holds the TypeScript mapping to the same file and runs `out` through
@ag-ui/client's own verifier and state-applying pipeline."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.agui_map import AguiMapper, PatchError, apply_patch
from gateway.events import EVENT_TYPES

ROOT = Path(__file__).parent.parent
CASES: list[dict[str, Any]] = json.loads((ROOT / "tests" / "agui_vectors.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_mapping_produces_the_vectors(case: dict[str, Any]) -> None:
    m = AguiMapper(case["thread"])
    for ev in case["fold"]:
        m.feed(ev)
    out = [m.prelude()] if case["fold"] else []
    out += [m.feed(ev) for ev in case["events"]]
    assert out == case["out"]
    assert m.messages == case["messages"]
    assert m.state == case["state"]


def test_the_vectors_file_is_in_the_generators_layout() -> None:
    """scripts/gen_agui_vectors.py rewrites the outputs from the inputs; the committed file is its output."""
    spec = importlib.util.spec_from_file_location("gen_agui_vectors", ROOT / "scripts" / "gen_agui_vectors.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (ROOT / "tests" / "agui_vectors.json").read_text()
    assert gen.render(json.loads(text)) == text


def test_every_catalogue_type_is_in_the_vectors() -> None:
    seen = {e["type"] for c in CASES for e in c["fold"] + c["events"]}
    assert set(EVENT_TYPES) <= seen
    assert seen - set(EVENT_TYPES), "an uncatalogued type too"


def _produced() -> dict[str, set[str]]:
    """gateway type (or "any other type") -> every AG-UI event type it produced in the vectors."""
    out: dict[str, set[str]] = {}
    for c in CASES:
        outs = c["out"][1:] if c["fold"] else c["out"]
        for ev, produced in zip(c["events"], outs, strict=True):
            key = ev["type"] if ev["type"] in EVENT_TYPES else "any other type"
            out.setdefault(key, set()).update(p["type"] for p in produced)
    return out


def test_the_docs_table_is_exact() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    section = text.split("\n## AG-UI\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not line.startswith("| ") or cells[0] in ("gateway event", "---"):
            continue
        rows[cells[0].strip("`")] = set(re.findall(r"`([A-Z_]+)`", cells[1]))
    assert set(rows) == set(EVENT_TYPES) | {"any other type"}
    assert rows == _produced()


def test_the_prelude_of_a_thread_without_an_active_run_is_empty_and_the_next_run_brings_the_snapshot() -> None:
    m = AguiMapper("conversation:c")
    m.feed({"type": "conversation.message.created", "data": {"message_id": "m", "role": "user", "content": "x"}})
    assert m.prelude() == []
    assert [e["type"] for e in m.feed({"type": "run.started", "run_id": "r", "data": {}})] == [
        "RUN_STARTED", "MESSAGES_SNAPSHOT"]


def test_hostile_events_map_to_nothing_rather_than_fail() -> None:
    m = AguiMapper("agent:a")
    m.feed({"type": "run.started", "run_id": "r", "data": {}})
    for bad in ({"type": 3}, {"type": "run.message.delta", "run_id": 7, "data": {}}, {"type": "run.message.delta",
                "run_id": "r", "data": "x"}, {"type": "run.tool_call.args.delta", "run_id": "r", "data": {}},
                {"type": "run.state.delta", "run_id": "r", "data": {"patch": {"op": "add"}}},
                {"type": "run.step.finished", "run_id": "r", "data": {"step_id": "s", "name": "n"}}):
        assert m.feed(bad) == [] or bad["type"] == "run.message.delta"  # a delta without an id: nothing to open
    # a patch that does not apply keeps the last state and is still forwarded (the consumer fails alike)
    m.feed({"type": "run.state.snapshot", "run_id": "r", "data": {"state": {"a": 1}}})
    out = m.feed({"type": "run.state.delta", "run_id": "r", "data": {"patch": [{"op": "remove", "path": "/zz"}]}})
    assert out == [{"type": "STATE_DELTA", "delta": [{"op": "remove", "path": "/zz"}]}] and m.state == {"a": 1}


@pytest.mark.parametrize(("doc", "patch", "want"), [
    ({"a": [1, 2]}, [{"op": "add", "path": "/a/1", "value": 9}], {"a": [1, 9, 2]}),
    ({"a": 1}, [{"op": "copy", "from": "/a", "path": "/b"}], {"a": 1, "b": 1}),
    ({"a~b": {"c/d": 1}}, [{"op": "replace", "path": "/a~0b/c~1d", "value": 2}], {"a~b": {"c/d": 2}}),
    ({"a": 1}, [{"op": "test", "path": "/a", "value": 1}, {"op": "remove", "path": "/a"}], {}),
    ({}, [{"op": "add", "path": "", "value": [1]}], [1]),
])
def test_json_patch(doc: Any, patch: list[dict[str, Any]], want: Any) -> None:
    assert apply_patch(doc, patch) == want


@pytest.mark.parametrize("patch", [
    [{"op": "test", "path": "/a", "value": 2}], [{"op": "remove", "path": "/x"}], [{"op": "add", "path": "/a/b/c"}],
    [{"op": "replace", "path": "/nope", "value": 1}], [{"op": "add", "path": "a", "value": 1}],
    [{"op": "add", "path": "/l/7", "value": 1}], [{"op": "bogus", "path": "/a"}],
    [{"op": "add", "path": "/l/\u00b2", "value": 1}], [{"op": "remove", "path": "/l/\u0663"}],
])
def test_json_patch_failures_leave_the_document(patch: list[dict[str, Any]]) -> None:
    doc = {"a": 1, "l": [0]}
    with pytest.raises(PatchError):
        apply_patch(doc, patch)
    assert doc == {"a": 1, "l": [0]}
