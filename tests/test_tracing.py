"""OpenTelemetry tracing through the real protocols: a real nats-server, a gateway whose tracer provider
exports to memory (or, in one test, over OTLP/HTTP to a real HTTP server), real WebSocket, SSE and
history clients, and the package's Publisher publishing inside a span of the test's own tracer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import websockets
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind
from starlette.background import BackgroundTask

from gateway.config import Settings
from gateway.devtools.natsproc import NatsProcess
from gateway.tracing import build_provider, traces_url
from tests.support.gateway import STALLED_HEARTBEAT_S, RunningGateway, run_gateway, scrape_metric, wait_ready
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wait import eventually
from tests.support.wsclient import closed, connect, connect_stalled, events, recv_type, subscribe, welcome

ADMIN = {"admins": ["user:alice"]}
WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


def _provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """What the gateway exports."""
    return InMemorySpanExporter()


@pytest.fixture
def upstream() -> Iterator[trace.Tracer]:
    """The publishing service's own tracer (a provider of its own, never the global one)."""
    provider = _provider(InMemorySpanExporter())
    yield provider.get_tracer("platform-service")
    provider.shutdown()


@pytest.fixture
async def traced(nats_server: NatsProcess, idp: TestIdP, spans: InMemorySpanExporter) -> AsyncIterator[RunningGateway]:
    provider = _provider(spans)
    try:
        async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, tracer_provider=provider) as g:
            yield g
    finally:
        provider.shutdown()


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def _wait_for(exporter: InMemorySpanExporter, name: str, n: int = 1) -> list[ReadableSpan]:
    """All spans `name` once there are at least n (spans end when their work does, which may be just
    after the client saw the result)."""
    await eventually(lambda: len(_named(exporter, name)) >= n, what=f"{n} span(s) {name!r}")
    return _named(exporter, name)


async def _deliver_span(exporter: InMemorySpanExporter, seq: int) -> ReadableSpan:
    """The deliver span of event `seq`, once the gateway has processed it; there must be exactly one."""
    def of_seq() -> list[ReadableSpan]:
        return [s for s in _named(exporter, "deliver") if (s.attributes or {})["wsgateway.stream.seq"] == seq]

    await eventually(of_seq, what=f"the deliver span of seq {seq}")
    found = of_seq()
    assert len(found) == 1, f"one deliver span per event and instance, got {len(found)}"
    return found[0]


def _no_secret(exporter: InMemorySpanExporter, secret: str) -> None:
    for s in exporter.get_finished_spans():
        for key, value in (s.attributes or {}).items():
            assert secret not in str(value), f"{s.name}: attribute {key} holds the token"


# --- deliver -------------------------------------------------------------------------------------


async def test_deliver_span_continues_the_publishers_trace_with_recipients_and_denied(
    traced: RunningGateway, idp: TestIdP, platform: Platform, spans: InMemorySpanExporter,
    upstream: trace.Tracer,
) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:mia", "user:sam"]})
    await platform.applied(idp, traced)
    readers = []
    for user in ("mia", "sam"):
        ws = await connect(traced.ws, idp.mint(user))
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
        readers.append(ws)
    outsiders = []
    for user, scope in (("eve", "conversation:c1"), ("oscar", "*")):  # no access: one pending, one wildcard
        ws = await connect(traced.ws, idp.mint(user))
        await welcome(ws)
        await subscribe(ws, scope)
        outsiders.append(ws)
    with upstream.start_as_current_span("publish order update", kind=SpanKind.PRODUCER) as publish:
        seq = await platform.publish("acme", "conversation:c1", type="test.tick")
    for ws in readers:
        assert (await events(ws, 1))[0]["seq"] == seq

    span = await _deliver_span(spans, seq)
    parent = publish.get_span_context()
    assert span.context is not None and span.context.trace_id == parent.trace_id
    assert span.parent is not None and span.parent.span_id == parent.span_id and span.parent.is_remote
    assert span.kind == SpanKind.CONSUMER
    attrs = dict(span.attributes or {})
    assert attrs["wsgateway.event.type"] == "test.tick"
    assert attrs["wsgateway.scope.kind"] == "conversation"
    assert attrs["wsgateway.stream.seq"] == seq
    assert attrs["wsgateway.recipients"] == 2
    assert attrs["wsgateway.denied"] == 2
    assert attrs["wsgateway.coalesced"] == 0 and attrs["wsgateway.slow_closed"] == 0
    assert attrs["messaging.system"] == "nats"

    # without a publisher span the event still gets its deliver span, as a root
    seq2 = await platform.publish("acme", "process:nobody-listens")
    lone = await _deliver_span(spans, seq2)
    assert lone.parent is None and (lone.attributes or {})["wsgateway.recipients"] == 0
    for ws in readers + outsiders:
        await ws.close()


async def test_deliver_spans_account_for_every_coalesced_frame(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform, spans: InMemorySpanExporter,
) -> None:
    """A client that reads nothing: its queue overflows and is coalesced. The deliver spans' `coalesced`
    attributes add up to the metric: each merge is charged to the event whose queueing triggered it."""
    await platform.grant("acme.org", ADMIN)
    provider = _provider(spans)
    async with run_gateway(
        nats_server.url, idp.issuer, audience=idp.audience, tracer_provider=provider,
        queue_max_messages=50, socket_send_buffer=4096, heartbeat_s=STALLED_HEARTBEAT_S,
    ) as g:
        slow = await connect_stalled(f"{g.ws}?scope=conversation:c1", idp.mint("alice"))
        published = 0
        for i in range(600):
            await platform.publish("acme", "conversation:c1", type="run.message.delta", run_id="r1",
                                   data={"message_id": "m1", "delta": f"{i} ", "pad": "p" * 1000})
            published += 1
            if i % 50 == 49 and await g.metric("wsgateway_events_coalesced_total") > 0:
                break
        # every published event has been handled (its deliver span ended) before the totals are compared
        await eventually(lambda: len(_named(spans, "deliver")) == published, what=f"{published} deliver spans")
        coalesced = await g.metric("wsgateway_events_coalesced_total")
        closed_slow = await g.metric("wsgateway_slow_client_disconnects_total")
        delivered = _named(spans, "deliver")
        assert coalesced > 0
        assert sum((s.attributes or {})["wsgateway.coalesced"] for s in delivered) == coalesced
        assert sum((s.attributes or {})["wsgateway.slow_closed"] for s in delivered) == closed_slow
        slow.transport.abort()  # a close handshake would wait for the whole backlog
    provider.shutdown()


async def test_invalid_event_ends_the_publishers_trace_with_an_error(
    traced: RunningGateway, platform: Platform, spans: InMemorySpanExporter,
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ack = await platform.js.publish(
        "events.acme.conversation.c1", b"{not json", headers={"traceparent": traceparent}
    )
    span = await _deliver_span(spans, ack.seq)
    assert span.context is not None and f"{span.context.trace_id:032x}" == traceparent.split("-")[1]
    assert (span.attributes or {})["wsgateway.invalid_reason"] == "json"
    assert span.status.status_code == trace.StatusCode.ERROR


# --- replay --------------------------------------------------------------------------------------


async def test_resume_on_the_url_is_a_replay_span_under_the_handshake(
    traced: RunningGateway, idp: TestIdP, platform: Platform, spans: InMemorySpanExporter,
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, traced)
    seqs = [await platform.publish("acme", "conversation:c1", data={"i": i}) for i in range(5)]
    await traced.dispatched(seqs[-1])  # all of them replayed (the span's `until` and `events`), none live
    ws = await connect(f"{traced.ws}?scope=conversation:c1&since={seqs[0]}", idp.mint("alice"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    assert [f["seq"] for f in await events(ws, 4)] == seqs[1:]
    (replay,) = await _wait_for(spans, "replay")
    attrs = dict(replay.attributes or {})
    assert attrs["wsgateway.replay.via"] == "websocket"
    assert attrs["wsgateway.scope.kinds"] == ("conversation",)
    assert attrs["wsgateway.replay.since"] == seqs[0]
    assert attrs["wsgateway.replay.until"] == seqs[-1]
    assert attrs["wsgateway.replay.events"] == 4
    assert attrs["wsgateway.replay.recovered"] is True
    (handshake,) = _named(spans, "GET /v1/ws")
    assert replay.parent is not None and handshake.context is not None
    assert replay.parent.span_id == handshake.context.span_id

    # a later subscribe frame with `since` replays too: its own trace (no request around it)
    await ws.send(json.dumps({"op": "subscribe", "id": "r", "scope": "process:p1", "since": 0}))
    await recv_type(ws, "subscribed")
    later = (await _wait_for(spans, "replay", 2))[1]
    assert later.parent is None and (later.attributes or {})["wsgateway.scope.kinds"] == ("process",)
    assert (later.attributes or {})["wsgateway.replay.events"] == 0
    await ws.close()


async def test_sse_resume_is_a_replay_span_under_the_sse_request(
    traced: RunningGateway, idp: TestIdP, platform: Platform, spans: InMemorySpanExporter,
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, traced)
    seqs = [await platform.publish("acme", "agent:a1") for _ in range(3)]
    await traced.dispatched(seqs[-1])  # both replayed (the span's `events`), none live
    headers = {"Authorization": f"Bearer {idp.mint('alice')}", "Last-Event-ID": str(seqs[0])}
    async with httpx.AsyncClient(base_url=traced.http, timeout=10) as c:
        async with c.stream("GET", "/v1/sse", params={"scope": "agent:a1"}, headers=headers) as r:
            ids: list[int] = []
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                if len(ids) == 2:
                    break
    assert ids == seqs[1:]
    (replay,) = await _wait_for(spans, "replay")
    assert (replay.attributes or {})["wsgateway.replay.via"] == "sse"
    assert (replay.attributes or {})["wsgateway.replay.events"] == 2
    (request,) = await _wait_for(spans, "GET /v1/sse")
    assert request.kind == SpanKind.SERVER
    assert replay.parent is not None and request.context is not None
    assert replay.parent.span_id == request.context.span_id


# --- HTTP and the handshake ----------------------------------------------------------------------


async def test_history_request_is_a_server_span_with_a_replay_child_and_no_token(
    traced: RunningGateway, idp: TestIdP, platform: Platform, spans: InMemorySpanExporter,
) -> None:
    await platform.grant("acme.org", ADMIN)
    asked = await platform.applied(idp, traced)
    await _wait_for(spans, "GET /v1/scopes", asked)  # the wait's own requests: not what this test looks at
    spans.clear()
    seqs = [await platform.publish("acme", "process:p1") for _ in range(3)]
    token = idp.mint("alice")
    async with httpx.AsyncClient(base_url=traced.http) as c:
        r = await c.get("/v1/history", params={"scope": "process:p1", "after": seqs[0], "access_token": token})
        assert r.status_code == 200 and len(r.json()["events"]) == 2
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/static/viewer.js")).status_code == 200
    (request,) = await _wait_for(spans, "GET /v1/history")
    assert request.kind == SpanKind.SERVER
    assert (request.attributes or {})["http.route"] == "/v1/history"
    (replay,) = _named(spans, "replay")
    assert (replay.attributes or {})["wsgateway.replay.via"] == "history"
    assert (replay.attributes or {})["wsgateway.replay.events"] == 2
    assert (replay.attributes or {})["wsgateway.replay.recovered"] is True
    assert replay.parent is not None and request.context is not None
    assert replay.parent.span_id == request.context.span_id
    assert not _named(spans, "GET /healthz"), "probes are not traced"
    assert not _named(spans, "GET /") and not _named(spans, "GET /static"), "nor the viewer's files"
    _no_secret(spans, token)
    assert {s.name for s in spans.get_finished_spans()} == {"GET /v1/history", "replay", "deliver"}
    assert not hasattr(BackgroundTask, "_otel_original_call"), "no process-wide patch left behind"
    url = dict(request.attributes or {})
    assert "access_token=REDACTED" in str(url.get("http.url") or url.get("url.query"))


async def test_captured_request_headers_never_include_credentials(
    nats_server: NatsProcess, idp: TestIdP, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator may capture request headers through the instrumentation's variables; the token stays out."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "authorization,user-agent")
    provider = _provider(spans)
    token = idp.mint("alice")
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, tracer_provider=provider) as g:
        async with httpx.AsyncClient(base_url=g.http) as c:
            r = await c.get("/v1/history", params={"scope": "process:p1"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403
        (request,) = await _wait_for(spans, "GET /v1/history")
    provider.shutdown()
    attrs = dict(request.attributes or {})
    assert attrs["http.request.header.authorization"] == ("[REDACTED]",)
    assert "http.request.header.user_agent" in attrs
    _no_secret(spans, token)


async def test_handshake_spans_for_accepted_and_unauthorized_connections(
    traced: RunningGateway, idp: TestIdP, spans: InMemorySpanExporter,
) -> None:
    client_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    token = idp.mint("alice")
    ws = await websockets.connect(
        traced.ws, additional_headers={"Authorization": f"Bearer {token}", "traceparent": client_trace}
    )
    hello = await welcome(ws)
    await ws.close()
    expired = idp.mint("alice", exp_in=-120)
    bad = await connect(traced.ws, expired, via="query")
    assert (await closed(bad))[0] == 4401

    accepted, refused = await _wait_for(spans, "GET /v1/ws", 2)
    assert accepted.kind == SpanKind.SERVER
    a = dict(accepted.attributes or {})
    assert a["wsgateway.handshake.outcome"] == "accepted" and a["http.route"] == "/v1/ws"
    assert a["wsgateway.connection.id"] == hello["connection_id"]
    assert accepted.context is not None and f"{accepted.context.trace_id:032x}" == client_trace.split("-")[1]
    r = dict(refused.attributes or {})
    assert r["wsgateway.handshake.outcome"] == "unauthorized"
    assert r["wsgateway.auth.failure_reason"] == "expired"
    assert r["wsgateway.close.code"] == 4401
    assert refused.parent is None
    _no_secret(spans, token)
    _no_secret(spans, expired)


# --- off, sampling, export -----------------------------------------------------------------------


async def test_without_an_endpoint_there_is_no_tracing_at_all(
    gw: RunningGateway, idp: TestIdP, platform: Platform,
) -> None:
    assert gw.settings.otel_endpoint is None
    assert gw.gateway.tracer is None and gw.gateway.bus.tracer is None
    app = gw.server.config.app
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    ws = await connect(f"{gw.ws}?scope=conversation:c1&since=0", idp.mint("alice"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(ws, 1))[0]["seq"] == seq
    assert gw.gateway.replayer.tracer is None
    # and nobody installed a global provider behind our back
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    await ws.close()


def test_provider_from_settings() -> None:
    base = {"oidc_issuer": "https://idp.example"}
    assert build_provider(Settings(**base)) is None
    provider = build_provider(Settings(
        **base, otel_endpoint="http://collector:4318/", otel_sample_ratio=0.25, otel_service_name="gw-eu"
    ))
    assert provider is not None
    try:
        assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
        assert provider.sampler.get_description().startswith("ParentBased")
        assert provider.resource.attributes["service.name"] == "gw-eu"
    finally:
        provider.shutdown()
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"
    with pytest.raises(ValueError):
        Settings(**base, otel_sample_ratio=1.5)


class _Collector(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: remembers each POST, answers with an empty ExportTraceServiceResponse."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


class Exported(NamedTuple):
    resource: dict[str, str]
    name: str
    trace_id: str
    attributes: dict[str, Any]


def _exported(received: list[tuple[str, str, bytes]]) -> list[Exported]:
    """Every span in the OTLP/HTTP requests a collector received."""
    out = []
    for _, _, body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {a.key: a.value.int_value or a.value.string_value for a in span.attributes}
                    out.append(Exported(resource, span.name, span.trace_id.hex(), attrs))
    return out


async def test_otlp_endpoint_exports_protobuf_spans_on_shutdown(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform,
) -> None:
    await platform.grant("acme.org", ADMIN)
    with _collector() as (endpoint, received):
        async with run_gateway(
            nats_server.url, idp.issuer, audience=idp.audience, otel_endpoint=endpoint, otel_service_name="gw-test",
        ) as g:
            assert g.gateway.tracer is not None
            ws = await connect(f"{g.ws}?scope=agent:a1", idp.mint("alice"))
            await welcome(ws)
            await recv_type(ws, "subscribed")
            seq = await platform.publish("acme", "agent:a1")
            assert (await events(ws, 1))[0]["seq"] == seq
            await ws.close()
        # the app's shutdown flushed the batch processor: everything is at the collector now
        assert received, "nothing exported"
        assert {(path, ctype) for path, ctype, _ in received} == {("/v1/traces", "application/x-protobuf")}
        exported = _exported(received)
    assert {e.resource["service.name"] for e in exported} == {"gw-test"}
    deliver = [e.attributes for e in exported if e.name == "deliver"]
    assert any(a["wsgateway.stream.seq"] == seq and a["wsgateway.recipients"] == 1 for a in deliver)
    assert any(e.name == "GET /v1/ws" for e in exported)


@pytest.mark.timeout(90)
async def test_every_serve_worker_exports_its_own_deliver_span(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform,
    upstream: trace.Tracer,
) -> None:
    """`wsgateway serve --workers 2`: each worker builds its own provider from WSGATEWAY_OTEL_*, and each
    worker's consumer adds one deliver span to the publisher's trace; SIGTERM flushes both."""
    port = free_port()
    with _collector() as (endpoint, received):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WSGATEWAY_", "OTEL_"))}
        env.update({
            "WSGATEWAY_NATS_URL": nats_server.url, "WSGATEWAY_OIDC_ISSUER": idp.issuer,
            "WSGATEWAY_HOST": "127.0.0.1", "WSGATEWAY_PORT": str(port), "WSGATEWAY_LOG_LEVEL": "warning",
            "WSGATEWAY_SHUTDOWN_TIMEOUT_S": "2", "WSGATEWAY_OTEL_ENDPOINT": endpoint,
        })
        proc = subprocess.Popen([WSGATEWAY, "serve", "--workers", "2"], env=env)  # noqa: ASYNC220
        try:
            await wait_ready(f"http://127.0.0.1:{port}", timeout=40)

            async def both_workers_consume() -> bool:
                return (await platform.js.stream_info("EVENTS")).state.consumer_count == 2

            await eventually(both_workers_consume, what="one consumer per worker", interval=0.1)
            with upstream.start_as_current_span("publish") as publish:
                seq = await platform.publish("acme", "agent:a1")
            # both workers have handled the event (counted before its deliver span ends, in the same step,
            # which a SIGTERM cannot interrupt): /metrics sums the workers' counters
            async def both_workers_handled_it() -> bool:
                return await scrape_metric(f"http://127.0.0.1:{port}", "wsgateway_events_received_total") == 2

            await eventually(both_workers_handled_it, what="both workers to receive the event", interval=0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
        spans = [e for e in _exported(received) if e.name == "deliver" and e.attributes["wsgateway.stream.seq"] == seq]
    assert len(spans) == 2
    assert {e.trace_id for e in spans} == {f"{publish.get_span_context().trace_id:032x}"}
    assert len({e.resource["service.instance.id"] for e in spans}) == 2
    assert {e.resource["service.name"] for e in spans} == {"wsgateway"}


async def test_sample_ratio_zero_keeps_only_traces_sampled_upstream(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform, spans: InMemorySpanExporter,
    upstream: trace.Tracer,
) -> None:
    with _collector() as (endpoint, _):
        settings = Settings(oidc_issuer=idp.issuer, otel_endpoint=endpoint, otel_sample_ratio=0)
        provider = build_provider(settings)  # the real sampler; spans also go to memory for the test
        assert provider is not None
        provider.add_span_processor(SimpleSpanProcessor(spans))
        try:
            async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, tracer_provider=provider):
                unsampled = await platform.publish("acme", "agent:a1")
                with upstream.start_as_current_span("publish"):
                    sampled = await platform.publish("acme", "agent:a1")
                await _deliver_span(spans, sampled)  # in stream order: `unsampled` was processed before
                seqs = [(s.attributes or {})["wsgateway.stream.seq"] for s in _named(spans, "deliver")]
                assert seqs == [sampled], f"only the upstream-sampled event is traced, got {seqs} ({unsampled=})"
        finally:
            await asyncio.to_thread(provider.shutdown)
