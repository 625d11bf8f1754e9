"""OpenTelemetry tracing: a tracer provider per app, built from settings, and the gateway's span helpers.

Tracing is off unless `WSGATEWAY_OTEL_ENDPOINT` is set (or a test hands `create_app` a provider). Off
means no provider, no tracer (`Gateway.tracer is None`), no FastAPI instrumentation, and callers skip
every helper here behind one `if tracer is not None`: the per-event path does no tracing work at all.

Nothing here touches OpenTelemetry's global tracer provider: each app builds (and shuts down) its own,
so several gateways run side by side in one process and every `wsgateway serve` worker has its own.
The SDK, the OTLP exporter and the FastAPI instrumentation are imported only when tracing is on.

Spans (attributes in docs/operations.md, "Tracing"):

* ``deliver``: one per event read by this instance's consumer, child of the publisher's span (W3C
  ``traceparent`` / ``tracestate`` from the NATS message headers). Never one per connection.
* ``replay``: one per resume replay (WebSocket, SSE) and per history read.
* ``GET /v1/ws``: the WebSocket handshake (authentication and its outcome), which FastAPI's
  instrumentation cannot see because `GatewayApp` dispatches `/v1/ws` before FastAPI's router.
* HTTP server spans of FastAPI's instrumentation for the history and SSE requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import Scope

from gateway.logs import redact

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

    from gateway.config import Settings
    from gateway.events import Envelope

TRACER_NAME = "wsgateway"
TRACES_PATH = "/v1/traces"
WS_ROUTE = "/v1/ws"
# Probes, scrapes and the viewer page with its static files would flood the traces with nothing to
# see (regexes searched in the full URL).
UNTRACED_URLS = "/healthz$,/readyz$,/metrics$,^https?://[^/]+/$,/static/"
# Header-name regexes (case-insensitive, unanchored) whose values are never recorded.
SECRET_HEADERS = ("authorization", "cookie")

# W3C Trace Context only, on purpose: the publisher writes exactly these headers, and an explicit
# propagator keeps the gateway independent of the process-wide OTEL_PROPAGATORS setting.
_W3C = TraceContextTextMapPropagator()


# --- the provider ----------------------------------------------------------------------------------


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a base URL (as OTEL_EXPORTER_OTLP_ENDPOINT: `/v1/traces` is appended);
    a URL that already ends in `/v1/traces` is taken as it is."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def build_provider(settings: Settings) -> TracerProvider | None:
    """A tracer provider exporting to `settings.otel_endpoint` over OTLP/HTTP (protobuf), or None (off).

    Sampling is ParentBased(TraceIdRatioBased(ratio)): a trace that was sampled upstream (the
    publisher's, an HTTP client's) is always recorded, the ratio decides for traces that start here.
    Spans leave in batches from the SDK's own thread, never from the event loop.
    """
    if not settings.otel_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({
        "service.name": settings.otel_service_name,
        # each `serve` worker is its own exporter: tell them apart
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
    })
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)),
        resource=resource,
        shutdown_on_exit=False,  # the app's lifespan shuts it down (and flushes); no atexit hook per app
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(settings.otel_endpoint))))
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return None if provider is None else provider.get_tracer(TRACER_NAME)


def instrument_fastapi(app: FastAPI, provider: TracerProvider) -> None:
    """Server spans for the HTTP routes (history, SSE, ...) with this app's provider.

    No per-`send`/`receive` child spans (an SSE stream would get one per chunk), no probes or scrapes,
    no metrics (the gateway's metrics are Prometheus'), and `access_token` redacted from URL attributes.
    """
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.util.http import OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS, get_custom_headers
    from starlette.background import BackgroundTask

    patched = "_otel_original_call" in vars(BackgroundTask)
    call = BackgroundTask.__call__
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        meter_provider=NoOpMeterProvider(),
        excluded_urls=UNTRACED_URLS,
        exclude_spans=["receive", "send"],
        server_request_hook=_redact_url_attributes,
        # should an operator capture request headers (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*),
        # credentials stay out whatever else they list as sensitive
        http_capture_headers_sanitize_fields=[
            *SECRET_HEADERS, *get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS)
        ],
    )
    if not patched:
        # instrument_app also patches starlette's BackgroundTask class, for every app of the process, with
        # THIS app's tracer: process-wide state tied to one app's provider. The gateway runs no background
        # tasks; undo it.
        BackgroundTask.__call__ = call  # type: ignore[method-assign]
        with contextlib.suppress(AttributeError):
            del BackgroundTask._otel_original_call  # type: ignore[attr-defined]


_URL_ATTRIBUTES = ("http.url", "url.full", "http.target", "url.query")


def _redact_url_attributes(span: Span, scope: Scope) -> None:
    """The instrumentation records the full URL, query string included: never the token in it."""
    if not span.is_recording() or b"token" not in scope.get("query_string", b"").lower():
        return
    attributes: Mapping[str, Any] = getattr(span, "attributes", None) or {}
    for key in _URL_ATTRIBUTES:
        value = attributes.get(key)
        if isinstance(value, str):
            span.set_attribute(key, redact(value))


async def close_provider(provider: TracerProvider, *, owned: bool) -> None:
    """On app shutdown: export what is buffered. A provider the app built is shut down; one it was
    given belongs to the caller and is only flushed. Off the loop: exporting blocks on the network."""
    await asyncio.to_thread(provider.shutdown if owned else provider.force_flush)


# --- context from NATS headers ---------------------------------------------------------------------


class _HeaderGetter(Getter[Mapping[str, str]]):
    """NATS headers are case-sensitive: the Publisher writes `traceparent`, others may not."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            value = next((v for k, v in carrier.items() if k.lower() == key), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_HEADERS = _HeaderGetter()


def context_from_headers(headers: Mapping[str, str] | None) -> Context:
    """The trace context a publisher put into a NATS message (empty: the span becomes a root)."""
    return _W3C.extract(headers, context=Context(), getter=_HEADERS) if headers else Context()


class _AsgiHeaderGetter(Getter[Scope]):
    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.encode()
        found = [v.decode("latin-1") for k, v in carrier.get("headers", ()) if k.lower() == name]
        return found or None

    def keys(self, carrier: Scope) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier.get("headers", ())]


_ASGI_HEADERS = _AsgiHeaderGetter()


# --- spans -----------------------------------------------------------------------------------------


def deliver_span(tracer: Tracer, headers: Mapping[str, str] | None, seq: int) -> AbstractContextManager[Span]:
    """The span of one event's delivery on this instance: validation, permission checks, queueing."""
    return tracer.start_as_current_span(
        "deliver",
        context=context_from_headers(headers),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "nats", "messaging.operation.type": "process", "wsgateway.stream.seq": seq},
    )


def record_delivery(
    span: Span, env: Envelope, recipients: int, denied: int, coalesced: int, slow_closed: int
) -> None:
    """What one dispatch did. `coalesced` and `slow_closed` count what queueing THIS event triggered:
    frames merged or dropped from the queues it pushed over their bounds (those may hold earlier events'
    frames; this event's own frame may be merged later, by a later event), and connections closed 4429."""
    if span.is_recording():
        span.set_attributes({
            "wsgateway.event.type": env.type,
            "wsgateway.event.id": env.id,
            "wsgateway.scope.kind": env.kind,
            "wsgateway.recipients": recipients,
            "wsgateway.denied": denied,
            "wsgateway.coalesced": coalesced,
            "wsgateway.slow_closed": slow_closed,
        })


def record_invalid(span: Span, reason: str) -> None:
    """An event that failed validation: never delivered (the publisher's trace shows where it ended)."""
    if span.is_recording():
        span.set_attribute("wsgateway.invalid_reason", reason)
        span.set_status(Status(StatusCode.ERROR, f"invalid event: {reason}"))


def handshake_span(tracer: Tracer, scope: Scope) -> AbstractContextManager[Span]:
    """A server span for the WebSocket handshake, continuing a `traceparent` the client sent, if any.
    Only the trace headers are read: never the token (header, subprotocol or query)."""
    attributes: dict[str, Any] = {
        "http.request.method": "GET",
        "http.route": WS_ROUTE,
        "url.path": WS_ROUTE,
        "url.scheme": scope.get("scheme", "ws"),
    }
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    return tracer.start_as_current_span(
        f"GET {WS_ROUTE}",
        context=_W3C.extract(scope, context=Context(), getter=_ASGI_HEADERS),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )


def handshake_accepted(span: Span, connection_id: str) -> None:
    if span.is_recording():
        span.set_attributes({"wsgateway.handshake.outcome": "accepted", "wsgateway.connection.id": connection_id})


def handshake_refused(span: Span, outcome: str, close_code: int, auth_failure: str | None) -> None:
    """`outcome` as in wsgateway_connection_attempts_total; a refusal is the client's fault, not an error."""
    if span.is_recording():
        span.set_attributes({"wsgateway.handshake.outcome": outcome, "wsgateway.close.code": close_code})
        if auth_failure is not None:
            span.set_attribute("wsgateway.auth.failure_reason", auth_failure)


def replay_span(
    tracer: Tracer, via: str, scopes: Iterable[str], since: int, *, until: int | None = None,
    connection_id: str | None = None,
) -> AbstractContextManager[Span]:
    """A span per read of retained events: a WebSocket or SSE resume (`until` = T, the seam) or a history
    page. Child of the current span: the handshake, the SSE or history request, or none (subscribe frame)."""
    kinds = sorted({scope.partition(":")[0] for scope in scopes})
    attributes: dict[str, Any] = {
        "wsgateway.replay.via": via, "wsgateway.scope.kinds": kinds, "wsgateway.replay.since": since,
    }
    if until is not None:
        attributes["wsgateway.replay.until"] = until
    if connection_id is not None:
        attributes["wsgateway.connection.id"] = connection_id
    return tracer.start_as_current_span("replay", kind=SpanKind.INTERNAL, attributes=attributes)


def record_replay(span: Span, events: int, recovered: bool, denied: int | None = None) -> None:
    if span.is_recording():
        span.set_attributes({"wsgateway.replay.events": events, "wsgateway.replay.recovered": recovered})
        if denied is not None:
            span.set_attribute("wsgateway.replay.denied", denied)

