"""Fuzzing the input surface: the HTTP API against its own OpenAPI document (schemathesis), the client-frame
parser (hypothesis). Bounded examples, so the suite stays fast; what is asserted: no 5xx, every answer as
documented (status, content type, body schema), no unhandled exception in the log, and the parser only
ever returns a frame or raises FrameError.

The OpenAPI document itself is checked too: it must tell the truth (no phantom 422, the error body, the
bearer scheme, the SSE parameters), since clients generate code from it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import ignored_auth

from gateway.protocol import FrameError, Ping, Refresh, Subscribe, Unsubscribe, parse_client_frame
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform

ADMIN = {"admins": ["user:alice"]}
EXAMPLES = 60  # per operation


@pytest.fixture(autouse=True)
def no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.ERROR)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- the document ---------------------------------------------------------------------------------


async def test_the_openapi_document_tells_the_truth(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http) as c:
        doc = (await c.get("/openapi.json")).json()
        docs_page = await c.get("/docs")
    assert docs_page.status_code == 404  # off by default (WSGATEWAY_API_DOCS): its scripts come from a CDN
    assert b'"422"' not in orjson.dumps(doc) and "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "An access token of the configured OpenID provider"}
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    paths = doc["paths"]
    for path, codes in {"/v1/history": {"200", "400", "401", "403", "503"}, "/v1/scopes": {"200", "400", "401", "503"},
                        "/v1/inbox": {"200", "400", "401", "503"}, "/v1/sse": {"200", "400", "401", "503"},
                        "/v1/agui": {"200", "400", "401", "403", "503"},
                        "/v1/presence": {"200", "400", "401", "403", "503"}}.items():
        op = paths[path]["get"]
        assert set(op["responses"]) == codes, path
        for code in codes - {"200"}:
            assert op["responses"][code]["content"]["application/json"]["schema"] == error_ref, (path, code)
        assert op["security"] == [{"bearer": []}, {"accessToken": []}]
    streams = {"/v1/sse": {("presence", "query"), ("listed", "query"), ("compact", "query")}, "/v1/agui": set()}
    for stream, extra in streams.items():
        params = {(p["name"], p["in"]) for p in paths[stream]["get"]["parameters"]}
        assert params == {("scope", "query"), ("since", "query"), ("Last-Event-ID", "header")} | extra, stream
        assert set(paths[stream]["get"]["responses"]["200"]["content"]) == {"text/event-stream"}  # never JSON
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    for code in ("200", "503"):  # the same body either way: which checks hold
        assert paths["/readyz"]["get"]["responses"][code]["content"] == {
            "application/json": {"schema": {"$ref": "#/components/schemas/ReadyBody"}}}


async def test_api_pages_on_request(nats_server: Any, idp: TestIdP) -> None:
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, api_docs=True) as g:
        async with httpx.AsyncClient(base_url=g.http) as c:
            assert (await c.get("/docs")).status_code == 200
            assert (await c.get("/redoc")).status_code == 200


# --- the HTTP API, fuzzed ---------------------------------------------------------------------------


def _fuzz(base: str, token: str) -> list[str]:
    """Every operation of the document with generated inputs, valid ones (which must be accepted) and
    invalid ones (which must be refused with a documented 4xx), in a thread: the gateway runs in the
    test's loop. Returns the problems found."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    problems: list[str] = []
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=30) as client:
        for result, mode in [(r, m) for r in schema.get_all_operations() for m in schemathesis.GenerationMode]:
            op = result.ok()
            if mode is schemathesis.GenerationMode.NEGATIVE and not list(op.iter_parameters()):
                continue  # nothing that could be invalid (the probes)

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                streaming = case.operation.path in ("/v1/sse", "/v1/agui")
                kw = case.as_transport_kwargs(base_url=base, headers=auth)
                request = client.build_request(kw["method"], kw["url"], params=kw.get("params"),
                                               headers=kw.get("headers"))
                response = client.send(request, stream=True)
                try:
                    if response.status_code >= 500 and not (streaming and response.status_code == 503):
                        problems.append(f"{case.method} {case.formatted_path} {kw.get('params')}: "
                                        f"{response.status_code}")
                        return
                    if streaming and response.status_code == 200:
                        return  # a live stream: its status and headers are what can be checked here
                    response.read()
                    try:
                        case.validate_response(response, excluded_checks=[ignored_auth])
                    except Exception as exc:  # schemathesis's failure group: say which input, which check
                        problems.append(f"{case.method} {case.formatted_path} {kw.get('params')}: {exc}")
                finally:
                    response.close()

            run()
    return problems


async def test_the_http_api_answers_every_generated_request_as_documented(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    for i in range(5):
        await platform.publish("acme", "conversation:c1", data={"i": i})
        await platform.publish("acme", "process:p1", type="process.input_required",
                               data={"request_id": f"q{i}", "prompt": "ok?", "assignees": ["alice"]})
    problems = await asyncio.to_thread(_fuzz, gw.http, idp.mint("alice"))
    assert not problems, "\n".join(problems[:20])


# --- the client-frame parser ----------------------------------------------------------------------

FRAMES = (Subscribe, Unsubscribe, Refresh, Ping)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
frame_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["subscribe", "unsubscribe", "refresh", "ping", "publish", "", "SUBSCRIBE"])},
    optional={"id": json_values, "scope": st.text(max_size=150) | json_values, "since": json_values,
              "token": st.text(max_size=50) | json_values, "extra": json_values},
)


def _parse(text: str | bytes) -> None:
    try:
        frame = parse_client_frame(text)
    except FrameError as exc:
        assert exc.code in ("bad_request", "read_only") and exc.message
        return
    assert isinstance(frame, FRAMES)


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_the_frame_parser_takes_any_text(text: str | bytes) -> None:
    _parse(text)


@settings(max_examples=600, deadline=None, database=None)
@given(frame_like)
def test_the_frame_parser_takes_any_frame_shaped_object(obj: dict[str, Any]) -> None:
    _parse(json.dumps(obj))  # the standard library's: it writes integers of any size
