"""The small API platform services use to publish events to the gateway.

The publisher builds the envelope, serializes it and then runs the gateway's own
:func:`~gateway.events.parse_event` on the exact bytes it is about to send: whatever it publishes,
the gateway accepts, and anything the gateway would reject fails here with a ``ValueError`` before
any network traffic. Each event's id is also its ``Nats-Msg-Id`` header, so a retried publish inside
the stream's duplicate window is stored once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import nats
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import BaseModel

from gateway.events import Envelope, check_prefix, parse_event, subject_for

MSG_ID_HEADER: Final = "Nats-Msg-Id"
TRACEPARENT_HEADER: Final = "traceparent"
TRACESTATE_HEADER: Final = "tracestate"
# W3C Trace Context: version-traceid-parentid-flags, lower-case hex.
TRACEPARENT_RE: Final = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_event_id() -> str:
    """A 26-character ULID-style id: 48 bits of milliseconds then 80 random bits, Crockford base32.

    Sortable by creation time, which makes stream dumps and logs easier to read than uuid4.
    """
    ms = int(datetime.now(UTC).timestamp() * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _current_trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the active OpenTelemetry span, if OpenTelemetry is
    installed and a valid span is active; empty otherwise. OpenTelemetry is optional on purpose."""
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return {}
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return {k: v for k, v in carrier.items() if k in (TRACEPARENT_HEADER, TRACESTATE_HEADER)}


class Publisher:
    """Publishes validated events to JetStream and waits for the stream's acknowledgement."""

    def __init__(
        self, js: JetStreamContext, *, subject_prefix: str = "events", stream: str | None = "EVENTS"
    ) -> None:
        self._js = js
        self._prefix = check_prefix(subject_prefix)
        self._stream = stream
        self._nc: Client | None = None  # set only when this publisher owns its connection

    @classmethod
    async def connect(
        cls,
        servers: str | list[str],
        *,
        subject_prefix: str = "events",
        stream: str | None = "EVENTS",
        **kw: Any,
    ) -> Publisher:
        """Open a NATS connection owned by the publisher (``close()`` closes it).

        ``subject_prefix`` and ``stream`` go to the publisher; every other keyword goes to
        ``nats.connect`` (e.g. ``user_credentials``, ``name``, ``max_reconnect_attempts``).
        """
        check_prefix(subject_prefix)
        if isinstance(servers, str):  # "nats://a:4222,nats://b:4222", as in WSGATEWAY_NATS_URL
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        server_list = list(servers)
        if not server_list:
            raise ValueError("no NATS server given")
        nc = await nats.connect(servers=server_list, **kw)
        pub = cls(nc.jetstream(), subject_prefix=subject_prefix, stream=stream)
        pub._nc = nc
        return pub

    @property
    def subject_prefix(self) -> str:
        return self._prefix

    async def publish(
        self,
        *,
        tenant: str,
        scope: str,
        type: str,
        data: Mapping[str, Any] | BaseModel | None = None,
        actor: str | None = None,
        run_id: str | None = None,
        event_id: str | None = None,
        time: datetime | None = None,
        traceparent: str | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Build, validate and publish one event; returns JetStream's ack (``ack.duplicate`` is true
        when the stream already held an event with this id).

        ``traceparent`` defaults to the active OpenTelemetry span's. Raises ``ValueError`` (an
        :class:`~gateway.events.InvalidEvent` for contract violations) before touching the network.
        """
        if time is None:
            time = datetime.now(UTC)
        elif time.tzinfo is None or time.utcoffset() is None:
            raise ValueError("time must be timezone-aware")
        if isinstance(data, BaseModel):
            body_data: Any = data.model_dump(mode="json", by_alias=True)
        elif data is None:
            body_data = {}
        elif isinstance(data, Mapping):
            body_data = dict(data)
        else:
            raise ValueError("data must be a mapping or a pydantic model")
        trace = self._trace(traceparent, None)
        body: dict[str, Any] = {
            "id": new_event_id() if event_id is None else event_id,
            "type": type,
            "tenant": tenant,
            "scope": scope,
            "time": time,
        }
        if actor is not None:
            body["actor"] = actor
        if run_id is not None:
            body["run_id"] = run_id
        if trace:
            body["trace"] = trace
        body["data"] = body_data
        return await self._send(tenant, scope, body, trace, timeout)

    async def publish_envelope(
        self,
        env: Envelope,
        *,
        traceparent: str | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish a ready-made envelope (e.g. one re-published from elsewhere) after the same checks.

        The trace context is ``traceparent`` if given, else the envelope's own ``trace``, else the
        active OpenTelemetry span's.
        """
        # Drop unset optional envelope fields, but never None values inside ``data`` (they are data).
        body = {k: v for k, v in env.model_dump().items() if v is not None}
        trace = self._trace(traceparent, env.trace)
        if trace:
            body["trace"] = trace
        return await self._send(env.tenant, env.scope, body, trace, timeout)

    async def close(self) -> None:
        """Close the connection if this publisher opened it (``connect``); otherwise do nothing."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------------------

    @staticmethod
    def _trace(traceparent: str | None, existing: Mapping[str, str] | None) -> dict[str, str]:
        """The envelope's ``trace`` map: existing entries, with the trace context decided by the
        explicit ``traceparent``, else the existing one, else the active OpenTelemetry span."""
        trace = dict(existing or {})
        if traceparent is not None:
            if not TRACEPARENT_RE.match(traceparent):
                raise ValueError("traceparent must be a W3C trace context: 00-<32 hex>-<16 hex>-<2 hex>")
            trace[TRACEPARENT_HEADER] = traceparent
        elif TRACEPARENT_HEADER not in trace:
            trace.update(_current_trace_headers())
        return trace

    async def _send(
        self, tenant: str, scope: str, body: dict[str, Any], trace: Mapping[str, str], ack_wait: float
    ) -> PubAck:
        subject = subject_for(self._prefix, tenant, scope)
        try:
            payload = orjson.dumps(body, option=orjson.OPT_UTC_Z)
        except TypeError as err:  # orjson.JSONEncodeError is a TypeError
            raise ValueError(f"event is not JSON-serializable: {err}") from None
        env = parse_event(payload, subject, self._prefix)  # InvalidEvent is a ValueError
        headers = {MSG_ID_HEADER: env.id}
        for name in (TRACEPARENT_HEADER, TRACESTATE_HEADER):
            value = trace.get(name)
            if value and "\r" not in value and "\n" not in value:
                headers[name] = value
        return await self._js.publish(
            subject, payload, timeout=ack_wait, stream=self._stream, headers=headers
        )
