"""The WebSocketGateway resource as pydantic models: the one source of truth for the CRD and the operator.

`crd.py` generates the CustomResourceDefinition's openAPIV3Schema from these models, so the API server
and the operator enforce the same defaults, bounds and patterns. Rules that tie one field to another
are written twice on purpose, next to each other: as CEL (`x-kubernetes-validations`, evaluated by the
API server when an admin applies a resource) and as a model validator with the same message
(evaluated by the operator, so a resource that slipped past an API server without CEL still gets a
clear status instead of a broken gateway). Patterns use the RE2 subset Kubernetes understands.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from gateway.events import NAME_PATTERN, SUBJECT_PREFIX_PATTERN
from wsgateway_operator.alerts import DEFAULT_RUNBOOK_BASE_URL

# --- patterns (RE2: no look-arounds, no backreferences) -------------------------------------------
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
NATS_URL = r"^(nats|tls|ws|wss)://[^\s,]+$"
HTTP_URL = r"^https?://[^\s]+$"
SUBJECT_PREFIX = SUBJECT_PREFIX_PATTERN  # the gateway's own rule (gateway.events.check_prefix)
SUBJECT = r"^[^\s.]+(\.[^\s.]+)*$"  # a stream subject: wildcards allowed
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"
IMAGE = r"^[^\s]+$"
CLAIM = r"^[^\s]+$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration like `168h`, `1h30m` or `500ms` (the format of `maxAge`, `scrapeInterval`)."""
    if not re.fullmatch(DURATION, text):
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 15m, 168h, 7d)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def cel(rule: str, message: str) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (a CEL rule the API server evaluates, with its message)."""
    return {"rule": rule, "message": message}


def _validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


# The CEL rules, named so that the pydantic validators below (and the tests) use the same text.
RULE_REPLICAS = cel("self.min <= self.max", "replicas.min must be less than or equal to replicas.max")
RULE_KEDA_ADDRESS = cel(
    "self.mode != 'keda' || has(self.prometheusAddress)",
    "autoscaling.prometheusAddress is required when autoscaling.mode is keda "
    "(KEDA's Prometheus trigger queries that server for wsgateway_connections)",
)
RULE_STREAM_SUBJECTS = cel(
    "!has(self.stream.subjects) || size(self.stream.subjects) == 0 "
    "|| (self.subjectPrefix + '.>') in self.stream.subjects",
    "nats.stream.subjects must include '<nats.subjectPrefix>.>' (default 'events.>'): "
    "the gateway consumes every subject under its prefix",
)
RULE_IDP = cel(
    "has(self.issuer) || has(self.jwksUrl)",
    "set auth.issuer or auth.jwksUrl: the gateway verifies every token against one of them",
)
RULE_STREAM_NAME_IMMUTABLE = cel(
    "self == oldSelf",
    "nats.stream.name is immutable: the gateway's history lives in that stream; "
    "create a new WebSocketGateway to move to another stream",
)
RULE_STORAGE_IMMUTABLE = cel(
    "self == oldSelf",
    "nats.stream.storage is immutable: JetStream cannot change a stream's storage in place",
)
GATEWAY_NAME = r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$"
RULE_NAME = cel(
    f"self.metadata.name.matches('{GATEWAY_NAME}')",
    "the name must be a DNS label of at most 52 characters (lower case letters, digits, '-'): it names the "
    "Service and the Deployment, whose pods and autoscaler add suffixes",
)
CEL_RULES: tuple[dict[str, str], ...] = (
    RULE_REPLICAS, RULE_KEDA_ADDRESS, RULE_STREAM_SUBJECTS, RULE_IDP,
    RULE_STREAM_NAME_IMMUTABLE, RULE_STORAGE_IMMUTABLE, RULE_NAME,
)
TRANSITION_RULES = (RULE_STREAM_NAME_IMMUTABLE, RULE_STORAGE_IMMUTABLE)  # need oldSelf: CEL only



def check_name(name: str) -> str:
    """The operator's twin of RULE_NAME (the CRD's root rule)."""
    if not re.fullmatch(GATEWAY_NAME, name):
        raise ValueError(RULE_NAME["message"])
    return name


Subject = Annotated[str, StringConstraints(pattern=SUBJECT, max_length=256)]
NatsUrl = Annotated[str, StringConstraints(pattern=NATS_URL, max_length=512)]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY, max_length=32)]


def nested(model: type[BaseModel], description: str, **values: Any) -> Any:
    """A nested object that is always present: its CRD default is the complete default object, as
    pydantic's default_factory makes it here. Complete, not `{}`: the API server checks a default
    against the schema and its CEL rules without defaulting inside it first (kube-apiserver refused the
    CRD with `{}` for replicas: "no such key: min evaluating rule: replicas.min must be ...")."""
    default = model(**values).model_dump(by_alias=True, exclude_none=True)
    return Field(
        default_factory=lambda: model(**values), description=description, json_schema_extra={"default": default}
    )


class CRModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields and wrong types are errors, as in the
    CRD (strict: "yes" is not a boolean, "20" is not an integer)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True
    )


class Replicas(CRModel):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_REPLICAS))

    min: int = Field(2, ge=1, le=1000, description="Fewest gateway pods (the autoscaler's floor).")
    max: int = Field(10, ge=1, le=1000, description="Most gateway pods (the autoscaler's ceiling).")

    @model_validator(mode="after")
    def _min_le_max(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(RULE_REPLICAS["message"])
        return self


class Autoscaling(CRModel):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_KEDA_ADDRESS))

    mode: Literal["hpa", "keda"] = Field(
        "hpa",
        description="hpa: a HorizontalPodAutoscaler on the custom Pods metric wsgateway_connections "
                    "(needs prometheus-adapter); keda: a KEDA ScaledObject with a Prometheus trigger.",
    )
    target_connections_per_pod: int = Field(
        5000, ge=1, le=1_000_000, description="Average open connections per pod the autoscaler aims for."
    )
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=3600,
        description="Look-back window before scaling down: a scale-down disconnects clients (they resume).",
    )
    prometheus_address: str | None = Field(
        None, pattern=HTTP_URL, max_length=512,
        description="Prometheus base URL KEDA queries (mode keda), e.g. http://prometheus-operated.monitoring:9090.",
    )

    @model_validator(mode="after")
    def _keda_needs_prometheus(self) -> Autoscaling:
        if self.mode == "keda" and not self.prometheus_address:
            raise ValueError(RULE_KEDA_ADDRESS["message"])
        return self


class CredentialsSecret(CRModel):
    name: str = Field(..., pattern=DNS_SUBDOMAIN, max_length=253, description="Secret in the gateway's namespace.")
    key: str = Field("nats.creds", pattern=SECRET_KEY, max_length=253, description="Key holding the .creds file.")


class StreamSpec(CRModel):
    name: str = Field(
        "EVENTS", pattern=NAME_PATTERN, max_length=128, description="JetStream stream the events are captured in.",
        json_schema_extra=_validations(RULE_STREAM_NAME_IMMUTABLE),
    )
    subjects: list[Subject] | None = Field(
        None, max_length=32,
        description="Stream subjects; default ['<subjectPrefix>.>']. If set, must include '<subjectPrefix>.>'.",
    )
    max_age: str = Field(
        "168h", pattern=DURATION, max_length=32,
        description="Retention by age (e.g. 168h, 7d): how far back clients can resume.",
    )
    max_bytes: int = Field(-1, ge=-1, description="Retention by size in bytes (-1: unlimited).")
    replicas: int = Field(1, ge=1, le=5, description="Stream (and ACL bucket) replicas in a NATS cluster.")
    storage: Literal["file", "memory"] = Field(
        "file", description="Stream storage.", json_schema_extra=_validations(RULE_STORAGE_IMMUTABLE)
    )

    @property
    def max_age_seconds(self) -> float:
        return parse_duration(self.max_age)


class NatsSpec(CRModel):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_STREAM_SUBJECTS))

    urls: list[NatsUrl] = Field(..., min_length=1, max_length=16, description="NATS server URLs.")
    credentials_secret: CredentialsSecret | None = Field(
        None, description="Secret with a NATS .creds file, mounted into the pods and used by the operator."
    )
    subject_prefix: str = Field(
        "events", pattern=SUBJECT_PREFIX, max_length=128,
        description="Events are on <subjectPrefix>.<tenant>.<kind>.<id>.",
    )
    stream: StreamSpec = nested(StreamSpec, "The events stream the operator creates and keeps configured.")
    acl_bucket: str = Field(
        "wsgateway-acl", pattern=NAME_PATTERN, max_length=128, description="NATS KV bucket holding the ACL documents."
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="When the WebSocketGateway is deleted: Retain keeps the stream and the ACL bucket (data "
                    "stays), Delete removes both. The gateway's leftover consumers are removed either way.",
    )

    @model_validator(mode="after")
    def _subjects_cover_prefix(self) -> NatsSpec:
        subjects = self.stream.subjects
        if subjects and f"{self.subject_prefix}.>" not in subjects:
            raise ValueError(RULE_STREAM_SUBJECTS["message"])
        return self

    @property
    def stream_subjects(self) -> list[str]:
        return list(self.stream.subjects or [f"{self.subject_prefix}.>"])


class AuthSpec(CRModel):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_IDP))

    issuer: str | None = Field(None, pattern=HTTP_URL, max_length=1024, description="OIDC issuer URL.")
    jwks_url: str | None = Field(None, pattern=HTTP_URL, max_length=1024, description="Explicit JWKS URL.")
    audience: str | None = Field(None, max_length=256, description="Required `aud` of tokens (unset: not checked).")
    tenant_claim: str = Field("tenant", pattern=CLAIM, max_length=256, description="Claim naming the tenant.")
    groups_claim: str = Field("groups", pattern=CLAIM, max_length=256, description="Claim listing the groups.")
    allow_query_token: bool = Field(True, description="Accept `access_token` in the query string.")
    jwt_leeway_seconds: int = Field(30, ge=0, le=300, description="Clock skew allowed on exp/nbf.")

    @model_validator(mode="after")
    def _idp_given(self) -> AuthSpec:
        if not (self.issuer or self.jwks_url):
            raise ValueError(RULE_IDP["message"])
        return self


class GatewayLimits(CRModel):
    """The gateway process settings an admin tunes (each becomes a WSGATEWAY_* variable)."""

    workers: int = Field(
        1, ge=1, le=64,
        description="Processes per pod. Scale with pods first; the default 1 matches a 1-CPU limit.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    max_connections: int = Field(50_000, ge=1, le=10_000_000, description="Connections per process; beyond: 4429.")
    max_frame_bytes: int = Field(65_536, ge=256, le=16_777_216, description="Largest client frame; beyond: 1009.")
    max_subscriptions: int = Field(256, ge=1, le=100_000, description="Subscriptions per connection.")
    max_bad_frames: int = Field(10, ge=1, le=10_000, description="Bad client frames tolerated before 1008.")
    queue_max_messages: int = Field(10_000, ge=1, le=10_000_000, description="Frames queued per connection.")
    queue_max_bytes: int = Field(
        8_388_608, ge=1024, le=1_073_741_824, description="Bytes queued per connection before coalescing, then 4429."
    )
    socket_send_buffer: int = Field(131_072, ge=0, le=67_108_864, description="SO_SNDBUF per socket (0: OS).")
    heartbeat_seconds: int = Field(20, ge=1, le=3600, description="WebSocket ping interval.")
    shutdown_timeout_seconds: int = Field(
        10, ge=0, le=3600, description="Time to drain and close connections when a pod stops."
    )
    drain_delay_seconds: int = Field(
        5, ge=0, le=300,
        description="preStop pause before shutdown, so the Service stops routing new connections first.",
    )
    max_concurrent_replays: int = Field(8, ge=1, le=1000, description="Resume replays at once per process.")
    history_max_limit: int = Field(1000, ge=1, le=10_000, description="Largest `limit` of GET /v1/history.")
    flush_interval_ms: int = Field(0, ge=0, le=50, description="Extra batching delay before writes.")

    @property
    def termination_grace_seconds(self) -> int:
        """Longer than preStop + the gateway's own drain, so Kubernetes never SIGKILLs a draining pod."""
        return self.drain_delay_seconds + self.shutdown_timeout_seconds + 10


class ResourceList(CRModel):
    cpu: Quantity | None = Field(None, description="CPU, e.g. 500m.")
    memory: Quantity | None = Field(None, description="Memory, e.g. 512Mi.")


class Resources(CRModel):
    requests: ResourceList = nested(ResourceList, "Requests of the gateway container.", cpu="250m", memory="256Mi")
    limits: ResourceList = nested(ResourceList, "Limits of the gateway container.", memory="1Gi")


class ServiceSpec(CRModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(80, ge=1, le=65535, description="Service port (to the pods' port 8080).")
    annotations: dict[str, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict, max_length=64, description="Extra Service annotations (e.g. load balancer options).",
        json_schema_extra={"default": {}},
    )


class ObservabilitySpec(CRModel):
    otlp_endpoint: str | None = Field(
        None, pattern=HTTP_URL, max_length=1024,
        description="OTLP/HTTP base URL of an OpenTelemetry collector (e.g. http://otel-collector:4318); "
                    "passed as WSGATEWAY_OTEL_ENDPOINT. Unset: the gateway records no traces.",
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1,
        description="Share of traces starting at the gateway that are recorded (WSGATEWAY_OTEL_SAMPLE_RATIO); "
                    "traces sampled upstream by the publisher are always recorded.",
    )
    service_monitor: bool = Field(True, description="Create a ServiceMonitor (only if monitoring.coreos.com exists).")
    prometheus_rule: bool = Field(True, description="Create a PrometheusRule (only if monitoring.coreos.com exists).")
    scrape_interval: str = Field("30s", pattern=DURATION, max_length=32, description="ServiceMonitor interval.")
    runbook_base_url: str = Field(
        DEFAULT_RUNBOOK_BASE_URL, pattern=HTTP_URL, max_length=1024,
        description="docs/runbooks.md URL the PrometheusRule's runbook_url annotations point into (#<section>).",
    )


class WebSocketGatewaySpec(CRModel):
    """What an admin writes: everything else (pods, service, autoscaling, JetStream, monitoring) follows."""

    image: str = Field(..., pattern=IMAGE, max_length=512, description="Gateway image (contains `wsgateway`).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy.")
    replicas: Replicas = nested(Replicas, "Bounds of the pod count.")
    autoscaling: Autoscaling = nested(Autoscaling, "How the pod count follows the connection count.")
    nats: NatsSpec = Field(..., description="NATS JetStream the gateway reads events and ACLs from.")
    auth: AuthSpec = Field(..., description="Token verification (issuer or jwksUrl is required).")
    gateway: GatewayLimits = nested(GatewayLimits, "Gateway process settings and limits.")
    resources: Resources = nested(Resources, "Container resources.")
    service: ServiceSpec = nested(ServiceSpec, "The Service in front of the pods.")
    observability: ObservabilitySpec = nested(ObservabilitySpec, "Metrics, alerts and tracing.")
    pod_annotations: dict[str, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict, max_length=64, description="Extra pod annotations.", json_schema_extra={"default": {}}
    )
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Node selector of the pods.", json_schema_extra={"default": {}}
    )
    priority_class_name: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253, description="PriorityClass of the pods."
    )


# --- status -------------------------------------------------------------------------------------

ConditionType = Literal["Ready", "Progressing", "NatsReady", "Degraded"]
CONDITION_TYPES: tuple[str, ...] = ("Ready", "Progressing", "NatsReady", "Degraded")


class Condition(CRModel):
    """A Kubernetes-style condition: the reason is a CamelCase word, the message tells the admin what to do."""

    model_config = ConfigDict(extra="ignore")

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(..., json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, ge=0)


class GatewayStatus(CRModel):
    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(None, description="metadata.generation the children were built from.")
    replicas: int | None = Field(None, description="Gateway pods (the Deployment's status.replicas).")
    ready_replicas: int | None = Field(None, description="Pods passing /readyz.")
    updated_replicas: int | None = Field(None, description="Pods on the current pod template.")
    connections: int | None = Field(None, description="Sum of wsgateway_connections over the ready pods.")
    scraped_pods: int | None = Field(None, description="Ready pods whose /metrics answered in the last refresh.")
    stream: str | None = Field(None, description="JetStream stream in use.")
    acl_bucket: str | None = Field(None, description="ACL KV bucket in use.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
