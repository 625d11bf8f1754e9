"""The published contract (gateway/schemas.py): generated files are current, and the server-frame models
describe what a real gateway sends.

`scripts/gen_schemas.py --check` regenerates the TypeScript types of clients/js/src/generated/ and
docs/asyncapi.yaml from the models and fails on any difference, so the SDK, the AsyncAPI document and
the gateway cannot drift. The frame models are checked against frames a real gateway sends (every
server frame type over a WebSocket and SSE), and docs/asyncapi.yaml is validated by npm
`@asyncapi/parser` (clients/js/test/asyncapi.mjs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import BaseModel, TypeAdapter

from gateway import package_version, schemas
from gateway.events import EVENT_TYPES
from gateway.protocol import SERVER_FRAMES, ServerFrame
from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.jsclient import JS, ensure_js
from tests.support.platform import Platform
from tests.support.wsclient import connect, recv, recv_type
from tests.test_events import doc_sections

REPO = Path(__file__).resolve().parent.parent
_server_frame: TypeAdapter[Any] = TypeAdapter(ServerFrame)


def _validator(doc: dict[str, Any], definition: str) -> Draft202012Validator:
    """A JSON Schema validator for one definition of a generated document (as a third party would use it)."""
    return Draft202012Validator({**doc, "$ref": f"#/$defs/{definition}"})


_published_server_frame = _validator(schemas.protocol_schema(), "ServerFrame")
_published_events = schemas.events_schema()


def _frame_type(model: type[BaseModel]) -> str:
    kind: str = model.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    return kind


def test_generated_files_are_current() -> None:
    ensure_js()
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_schemas.py"), "--check"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr


def test_asyncapi_names_every_frame_and_catalogue_type() -> None:
    doc = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["version"] == package_version()
    messages = doc["channels"]["ws"]["messages"]
    names = {m["name"] for m in messages.values()}
    assert names == {"subscribe", "unsubscribe", "refresh", "ping", *map(_frame_type, SERVER_FRAMES), *EVENT_TYPES}
    for code in schemas.CLOSE_CODES:
        assert f"| {code} |" in doc["info"]["description"]


def test_asyncapi_is_valid_for_asyncapi_parser() -> None:
    ensure_js()
    run = subprocess.run(["node", str(JS / "test" / "asyncapi.mjs"), str(REPO / "docs" / "asyncapi.yaml")],
                         capture_output=True, text=True, timeout=120, check=False, cwd=JS)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["messages"] >= len(EVENT_TYPES) + 13, result


def test_sdk_version_is_the_gateway_version() -> None:
    package = json.loads((JS / "package.json").read_text())
    assert package["name"] == "@wsgateway/client" and package["version"] == package_version()
    lock = json.loads((JS / "package-lock.json").read_text())
    assert lock["version"] == package_version() and lock["packages"][""]["version"] == package_version()


async def test_real_frames_fit_the_server_frame_models(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """Every server frame type, as a real gateway sends it, validates against its model."""
    await platform.grant("acme.conversation.c1", {"members": ["user:alice"]})
    await platform.grant("acme.conversation.c2", {"members": ["user:alice"]})
    await platform.applied(idp, gw)
    seen: dict[str, dict[str, Any]] = {}

    def check(frame: dict[str, Any]) -> None:
        _server_frame.validate_python(frame)
        _published_server_frame.validate(frame)  # the published JSON Schema says the same
        assert all(v is not None for v in frame.values()), f"a null field on the wire: {frame}"
        seen.setdefault(frame["type"], frame)

    token = idp.mint("alice")
    first = await platform.publish("acme", "conversation:c1", "run.message.delta", run_id="r1",
                                   data={"message_id": "m1", "delta": "hi"})
    ws = await connect(f"{gw.ws}?scope=conversation:c1&since=0", token)
    try:
        for _ in range(3):  # welcome, subscribed (a resume: since, recovered, earliest), the replayed event
            check(await recv(ws))
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "scope": "conversation:nope"}))
        check(await recv_type(ws, "error"))
        await ws.send(json.dumps({"op": "subscribe", "id": "s2", "scope": "conversation:c2", "presence": True}))
        check(await recv_type(ws, "subscribed"))
        snapshot = await recv_type(ws, "presence")
        check(snapshot)
        assert snapshot["snapshot"] is True
        delta = await recv_type(ws, "presence")  # the subscriber itself joins in the next delta
        check(delta)
        assert [m["id"] for m in delta["joined"]] == ["user:alice"]
        await ws.send(json.dumps({"op": "ping", "id": 7}))
        check(await recv_type(ws, "pong"))
        await ws.send(json.dumps({"op": "refresh", "id": "r", "token": idp.mint("alice")}))
        check(await recv_type(ws, "refreshed"))
        await ws.send(json.dumps({"op": "unsubscribe", "id": "u", "scope": "conversation:c2"}))
        check(await recv_type(ws, "unsubscribed"))
        await platform.grant("acme.conversation.c1", {"members": []})
        check(await recv_type(ws, "revoked"))
    finally:
        await ws.close()
    assert seen["subscribed"]["recovered"] is True and seen["event"]["seq"] == first
    # SSE: the same frames, and `close` at the token's expiry
    async with httpx.AsyncClient(timeout=30) as c, c.stream(
        "GET", f"{gw.http}/v1/sse", params={"scope": "conversation:c2"},
        headers={"Authorization": f"Bearer {idp.mint('alice', exp_in=2)}"},
    ) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                check(json.loads(line[6:]))
    assert set(seen) == set(map(_frame_type, SERVER_FRAMES))


@pytest.mark.parametrize("model", SERVER_FRAMES, ids=lambda m: m.__name__)
def test_server_frame_schemas_have_no_null_branches(model: type[BaseModel]) -> None:
    """Fields without a value are left out, so the published schema never offers `null` for them."""
    defs = schemas.protocol_schema()["$defs"]
    assert '{"type": "null"}' not in json.dumps(defs[model.__name__])



@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_catalogue_examples_fit_the_published_schema(event_type: str) -> None:
    """docs/events.md's example of each type validates against that type's generated JSON Schema (and the
    union `CatalogueEvent`), so the schema's patterns and required fields are those of the models."""
    [example] = re.findall(r"```json\n(.*?)```", doc_sections()[event_type], flags=re.S)
    body = json.loads(example)
    _validator(_published_events, schemas.event_schema_name(event_type)).validate(body)
    _validator(_published_events, "CatalogueEvent").validate(body)
    bad = {**body, "scope": "tenant:x"}
    assert not _validator(_published_events, "Envelope").is_valid(bad)
