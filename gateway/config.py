"""Gateway configuration: one pydantic-settings model, read from ``WSGATEWAY_*`` variables.

Everything the gateway can be told lives here so that the README's configuration table, the
operator's ConfigMap and the process agree on names, types and defaults.
"""

from __future__ import annotations

import difflib
import os
import re
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, ValidationError, field_validator, model_validator
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
    api_docs: bool = Field(
        False, description="Serve the interactive API pages /docs and /redoc (they load their scripts from a CDN); "
                           "/openapi.json is always served.",
    )
    cors_origins: str | None = Field(
        None,
        description="Comma-separated browser origins (`https://app.example.com`) that may call GET /v1/history, "
                    "/v1/scopes and /v1/sse from their pages (CORS); unset: none. `*` is refused: list them.",
    )

    # Server
    host: str = Field("0.0.0.0", description="Listen address.")
    port: int = Field(8080, ge=0, le=65535, description="Listen port.")
    workers: int = Field(0, ge=0, description="Worker processes (0: one per core).")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Log level of the gateway's and uvicorn's loggers (other libraries: warning)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines: `text` (time level logger: message) or `json` (one object per line)."
    )
    strict_env: bool = Field(
        False, description="Refuse to start when an unknown WSGATEWAY_* variable is set (default: a warning)."
    )

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
    ws_compression: bool = Field(
        True, description="Negotiate permessage-deflate with WebSocket clients that offer it (each frame is "
                          "compressed once for all of them; clients that do not offer it get plain frames).",
    )
    header_timeout_s: float = Field(
        10, gt=0, le=300,
        description="Time a connection has to send its request headers (from the connection, or the first byte "
                    "of a later request on it); then it is closed. At most max_connections connections wait at once.",
    )
    shutdown_timeout_s: float = Field(10, ge=0, description="Time to drain and close on shutdown.")
    max_concurrent_replays: int = Field(8, ge=1, description="Replays from JetStream running at once.")
    replay_window_bytes: int = Field(
        16 * 2**20, ge=0,
        description="Memory for the newest events, from which resumes with a recent cursor are served without "
                    "reading JetStream (0: every resume reads JetStream).",
    )
    history_max_limit: int = Field(1000, ge=1, le=10_000, description="Largest `limit` of GET /v1/history.")
    flush_interval_ms: float = Field(
        0, ge=0, le=50, description="Extra batching delay before writing queued frames (0: next loop turn)."
    )
    fast_path: bool = Field(
        True, description="Fan-out's per-delivery loops in C (gateway/core/_fastpath.c); false: the same in Python."
    )

    # Presence (docs/protocol.md, Presence)
    presence_bucket: str = Field(
        "wsgateway-presence", description="NATS KV bucket (memory storage) where every instance lists its watchers.",
    )
    presence_ttl_s: float = Field(
        15, ge=0.5, le=300,
        description="An instance not heard from for this long is dead: its watchers leave every scope (within "
                    "4/3 of it). Each instance refreshes its heartbeat every third of it.",
    )
    presence_flush_ms: float = Field(
        250, ge=10, le=10_000, description="Presence changes of a scope are coalesced into one delta per interval.",
    )
    presence_max_members: int = Field(
        100, ge=1, le=10_000, description="Watchers (and agents) listed per scope in presence frames; beyond: counted.",
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

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("cors_origins")
    @classmethod
    def _origins_ok(cls, v: str | None) -> str | None:
        return normalize_origins(v)

    @model_validator(mode="after")
    def _idp_given(self) -> Settings:
        if not self.dev_mode and not (self.oidc_issuer or self.jwks_url):
            raise ValueError("set WSGATEWAY_OIDC_ISSUER or WSGATEWAY_JWKS_URL (or run `wsgateway dev`)")
        return self

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """The origins of WSGATEWAY_CORS_ORIGINS (normalized by the validator); empty: CORS off."""
        return tuple(self.cors_origins.split(",")) if self.cors_origins else ()


_ORIGIN_RE = re.compile(r"(https?)://([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::([1-9][0-9]{0,4}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origins(value: str | None) -> str | None:
    """WSGATEWAY_CORS_ORIGINS as the exact origins browsers send (`scheme://host[:port]`, lower case,
    comma-joined), or None when empty.

    A browser's `Origin` header never has a path, a trailing slash or a default port, so such entries
    could never match: they are refused rather than silently ignored. `*` is refused too: the read APIs
    carry a user's token, and an allow-list keeps other sites' pages from using it (docs/protocol.md, CORS).
    """
    if value is None:
        return None
    origins: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry == "*" or entry.lower() == "null":
            raise ValueError(f"{entry!r} is not allowed: list the exact origins, e.g. https://app.example.com")
        m = _ORIGIN_RE.fullmatch(entry.lower())
        if m is None:
            raise ValueError(
                f"{entry!r} is not an origin: scheme://host[:port] with http or https, no path and no "
                "trailing slash, e.g. https://app.example.com"
            )
        scheme, _, port = m.groups()
        if port is not None and int(port) > 65535:
            raise ValueError(f"{entry!r}: the port must be between 1 and 65535")
        if port is not None and int(port) == _DEFAULT_PORTS[scheme]:
            raise ValueError(f"{entry!r}: drop the default port {port} (browsers never send it in Origin)")
        if entry.lower() not in origins:
            origins.append(entry.lower())
    return ",".join(origins) or None


# --- reading the environment: human errors, unknown variables -----------------------------------

ENV_PREFIX = "WSGATEWAY_"
#: WSGATEWAY_* variables that are not the gateway's: the operator's own settings, the test suite's
#: and scripts/build-k8s.sh's.
FOREIGN_PREFIXES = ("WSGATEWAY_OPERATOR_", "WSGATEWAY_TEST_")
FOREIGN_VARIABLES = frozenset({"WSGATEWAY_CACHE", "WSGATEWAY_GO_PARALLEL"})
_MAX_CREDENTIALS_BYTES = 64 * 1024
_CREDS_JWT_RE = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END NATS USER JWT-{3,}")
_CREDS_SEED_RE = re.compile(r"-{3,}BEGIN USER NKEY SEED-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END USER NKEY SEED-{3,}")


def check_credentials_file(path: Path) -> None:
    """A NATS `.creds` file must exist, be readable and hold a user JWT and a valid user NKEY seed
    (nats-py would otherwise fail on every connection attempt, retrying forever)."""
    try:
        if not path.is_file():
            raise ValueError(f"{path} does not exist or is not a file")
        if path.stat().st_size > _MAX_CREDENTIALS_BYTES:
            raise ValueError(f"{path} is larger than {_MAX_CREDENTIALS_BYTES} bytes: not a .creds file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: not a .creds file") from None
    jwt_match, seed_match = _CREDS_JWT_RE.search(text), _CREDS_SEED_RE.search(text)
    if jwt_match is None or seed_match is None:
        missing = " and ".join(n for n, m in (("NATS USER JWT", jwt_match), ("USER NKEY SEED", seed_match)) if not m)
        raise ValueError(f"{path} is not a NATS .creds file (no {missing} block)")
    if jwt_match.group(1).count(".") != 2:
        raise ValueError(f"{path}: the NATS USER JWT block does not hold a JWT")
    import nkeys  # type: ignore[import-untyped]  # nats-py's [nkeys] extra; needed only with credentials

    try:
        nkeys.from_seed(bytearray(seed_match.group(1).encode()))
    except Exception:  # nkeys raises its own error types (and binascii/ValueError) for bad seeds
        raise ValueError(f"{path}: the USER NKEY SEED block does not hold a valid nkey seed") from None


class ConfigError(Exception):
    """The configuration is unusable; `problems` are one human line each, naming the variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _bounds(field: str) -> tuple[object, object, bool, bool]:
    """(lower, upper, lower inclusive, upper inclusive) of a numeric field (None: unbounded)."""
    lo: object = None
    hi: object = None
    lo_incl = hi_incl = True
    for meta in Settings.model_fields[field].metadata:
        if isinstance(meta, Ge):
            lo, lo_incl = meta.ge, True
        elif isinstance(meta, Gt):
            lo, lo_incl = meta.gt, False
        elif isinstance(meta, Le):
            hi, hi_incl = meta.le, True
        elif isinstance(meta, Lt):
            hi, hi_incl = meta.lt, False
    return lo, hi, lo_incl, hi_incl


def _range_text(field: str) -> str:
    lo, hi, lo_incl, hi_incl = _bounds(field)
    if lo is not None and hi is not None:
        if lo_incl and hi_incl:
            return f"must be between {lo} and {hi}"
        return f"must be {'at least' if lo_incl else 'more than'} {lo} and {'at most' if hi_incl else 'less than'} {hi}"
    if lo is not None:
        return f"must be {'at least' if lo_incl else 'more than'} {lo}"
    if hi is not None:
        return f"must be {'at most' if hi_incl else 'less than'} {hi}"
    return "is out of range"


_TYPE_MESSAGES = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "finite_number": "must be a finite number",
}


def _problem(error: Mapping[str, Any]) -> str:
    """One line for one pydantic error: `WSGATEWAY_X: what is wrong (got 'value')`."""
    loc = error.get("loc") or ()
    kind = str(error.get("type", ""))
    field = str(loc[0]) if loc and str(loc[0]) in Settings.model_fields else None
    got = error.get("input")
    shown = f" (got {got!r})" if isinstance(got, str | int | float) and not isinstance(got, bool) else ""
    if field is None:  # a rule over several settings: its message names the variables
        return str(error.get("msg", "invalid configuration")).removeprefix("Value error, ")
    name = env_name(field)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        what = _range_text(field)
    elif kind in _TYPE_MESSAGES:
        what = _TYPE_MESSAGES[kind]
        if name == "WSGATEWAY_PORT" and isinstance(got, str) and got.startswith("tcp://"):
            what += (" (this looks like a Kubernetes service link of a Service named `wsgateway`: set "
                     "`enableServiceLinks: false` in the pod spec)")
    elif kind == "literal_error":
        expected = (error.get("ctx") or {}).get("expected", "")
        what = f"must be one of {expected}"
    elif kind == "string_too_short":
        what = "must not be empty"
    elif kind == "value_error":
        what = str(error.get("msg", "")).removeprefix("Value error, ")
        shown = ""  # the validators' messages say what they saw
    else:
        what = str(error.get("msg", "invalid value")).lower()
    return f"{name}: {what}{shown}"


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per WSGATEWAY_* variable that is no setting, with a did-you-mean suggestion."""
    environ = os.environ if environ is None else environ
    known = {env_name(f) for f in Settings.model_fields}
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in FOREIGN_VARIABLES:
            continue
        if upper.startswith(FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else " (README.md#configuration lists the settings)"
        lines.append(f"{name}: unknown variable, ignored{hint}")
    return lines


def _credentials_problems(overrides: Mapping[str, Any]) -> list[str]:
    """The credentials file is checked where the gateway starts, not by the model: the operator
    validates a pod's settings with Settings too, and the file exists only inside the pod."""
    raw = overrides.get("nats_credentials")
    if raw is None:
        raw = next((v for k, v in os.environ.items() if k.upper() == env_name("nats_credentials")), None)
    if not raw:
        return []
    try:
        check_credentials_file(Path(raw))
    except ValueError as exc:
        return [f"{env_name('nats_credentials')}: {exc}"]
    return []


def load_settings(**overrides: Any) -> tuple[Settings, list[str]]:
    """Settings from the process environment (and `overrides`), and the warnings about unknown variables.

    Raises :class:`ConfigError` with one line per problem (bad values, and unknown variables when
    WSGATEWAY_STRICT_ENV is true) instead of pydantic's dump.
    """
    unknown = unknown_variables()
    problems = _credentials_problems(overrides)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems += [_problem(e) for e in exc.errors(include_url=False)]
        raise ConfigError(problems + [f"warning: {u}" for u in unknown]) from None
    if problems:
        raise ConfigError(problems + [f"warning: {u}" for u in unknown])
    if unknown and settings.strict_env:
        raise ConfigError([*unknown, "WSGATEWAY_STRICT_ENV is true: unknown WSGATEWAY_* variables are errors"])
    return settings, unknown



# Descriptors a process keeps besides its clients' sockets: listeners, NATS, a JWKS fetch, scrapes, logs,
# and the one a connection over the limit needs for its 4429 / 503 answer (measured: 16 while idle).
FD_RESERVE = 64


def fit_open_file_limit(settings: Settings, soft_limit: int | None = None) -> tuple[Settings, str | None]:
    """`settings` with `max_connections` lowered to what the open-file limit leaves (every connection is
    a descriptor), and the warning saying so; beyond the limit a client would get a TCP reset instead
    of close 4429 or 503. `soft_limit`: RLIMIT_NOFILE's soft value (read from the process if None)."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or settings.max_connections <= soft_limit - FD_RESERVE:
        return settings, None
    fitted = max(1, soft_limit - FD_RESERVE)
    warning = (f"{env_name('max_connections')}={settings.max_connections} is more than the open-file limit "
               f"({soft_limit}, ulimit -n) allows: at most {fitted} connections per process "
               f"({FD_RESERVE} descriptors kept for the rest); raise the limit to allow more")
    return settings.model_copy(update={"max_connections": fitted}), warning
