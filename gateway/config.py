"""Gateway configuration: one pydantic-settings model, read from ``WSGATEWAY_*`` variables.

Everything the gateway can be told lives here so that the README's configuration table, the
operator's ConfigMap and the process agree on names, types and defaults.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.events import check_prefix


class Settings(BaseSettings):
    """Runtime configuration of one gateway process."""

    model_config = SettingsConfigDict(env_prefix="WSGATEWAY_", extra="ignore", frozen=True)

    # NATS / JetStream
    nats_url: str = Field(
        "nats://127.0.0.1:4222", description="Comma-separated NATS server URLs."
    )
    nats_credentials: Path | None = Field(None, description="NATS credentials (.creds) file.")
    stream: str = Field("EVENTS", description="JetStream stream that captures the events.")
    subject_prefix: str = Field("events", description="Subject prefix: `<prefix>.<tenant>.<kind>.<id>`.")
    create_stream: bool = Field(True, description="Create the stream at start-up if it is missing.")
    stream_max_age_s: float = Field(7 * 24 * 3600, gt=0, description="Max age of a created stream.")
    stream_max_bytes: int = Field(-1, description="Max bytes of a created stream (-1: unlimited).")
    stream_replicas: int = Field(1, ge=1, le=5, description="Replicas of a created stream and ACL bucket.")
    acl_bucket: str = Field("wsgateway-acl", description="NATS KV bucket holding the ACL documents.")

    # Identity provider
    oidc_issuer: str | None = Field(None, description="OIDC issuer; its discovery document gives the JWKS.")
    jwks_url: str | None = Field(None, description="Explicit JWKS URL (skips discovery).")
    audience: str | None = Field(None, description="Required `aud` of tokens (unset: not checked).")
    tenant_claim: str = Field("tenant", description="Claim that names the user's tenant.")
    groups_claim: str = Field("groups", description="Claim that lists the user's groups.")
    jwt_leeway_s: float = Field(30, ge=0, le=300, description="Clock skew allowed on exp/nbf.")
    jwks_refresh_min_interval_s: float = Field(
        30, ge=0, description="Least time between two JWKS fetches triggered by unknown key ids."
    )
    allow_query_token: bool = Field(True, description="Accept `access_token` in the query string.")

    # Server
    host: str = Field("0.0.0.0", description="Listen address.")
    port: int = Field(8080, ge=0, le=65535, description="Listen port.")
    workers: int = Field(0, ge=0, description="Worker processes (0: one per core).")
    log_level: str = Field("info", description="Log level.")

    # Limits
    max_connections: int = Field(50_000, ge=1, description="Connections per process; beyond: close 4429.")
    connections_target: int = Field(
        0, ge=0,
        description="Autoscaling target of open connections per pod, exported as wsgateway_connections_target "
                    "for dashboards and alerts (0: not set; the operator sets it from targetConnectionsPerPod).",
    )
    max_frame_bytes: int = Field(64 * 1024, ge=256, description="Largest client frame; beyond: close 1009.")
    max_subscriptions: int = Field(256, ge=1, description="Subscriptions per connection.")
    max_bad_frames: int = Field(10, ge=1, description="Bad client frames tolerated before close 1008.")
    queue_max_messages: int = Field(10_000, ge=1, description="Frames queued per connection before 4429.")
    queue_max_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Bytes queued per connection.")
    socket_send_buffer: int = Field(
        128 * 1024, ge=0,
        description="Kernel send buffer per connection (SO_SNDBUF; 0: OS autotuning). Small keeps a slow "
                    "client's backlog in the gateway's bounded queue, where it is coalesced, not in kernel memory.",
    )
    heartbeat_s: float = Field(20, gt=0, description="WebSocket ping interval; a missed pong closes.")
    shutdown_timeout_s: float = Field(10, ge=0, description="Time to drain and close on shutdown.")
    max_concurrent_replays: int = Field(8, ge=1, description="Replays from JetStream running at once.")
    history_max_limit: int = Field(1000, ge=1, le=10_000, description="Largest `limit` of GET /v1/history.")
    flush_interval_ms: float = Field(
        0, ge=0, le=50, description="Extra batching delay before writing queued frames (0: next loop turn)."
    )

    # Tracing (OpenTelemetry; off unless an endpoint is set: docs/operations.md, Tracing)
    otel_endpoint: str | None = Field(
        None, description="OTLP/HTTP base URL of a collector (`/v1/traces` is appended); unset: no tracing."
    )
    otel_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of traces starting at the gateway that are recorded (parent-based)."
    )
    otel_service_name: str = Field("wsgateway", min_length=1, description="`service.name` of exported spans.")

    gc_gen0_threshold: int = Field(
        50_000, ge=0,
        description="Allocations between generation-0 garbage collections, and freeze the start-up heap "
                    "(0: leave CPython's collector alone); avoids long full collections at many connections.",
    )

    # Development mode (never in production: `wsgateway dev` sets it)
    dev_mode: bool = Field(False, description="Serve the insecure development identity provider.")

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        return check_prefix(v)  # the Publisher's rule: what one accepts, the other does too

    @model_validator(mode="after")
    def _idp_given(self) -> Settings:
        if not self.dev_mode and not (self.oidc_issuer or self.jwks_url):
            raise ValueError("set WSGATEWAY_OIDC_ISSUER or WSGATEWAY_JWKS_URL (or run `wsgateway dev`)")
        return self

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]
