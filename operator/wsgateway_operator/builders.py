"""Pure builders: (name, namespace, uid, spec) -> the Kubernetes manifests and the JetStream plan.

No I/O here, so every manifest can be validated offline (tests run them through kubernetes-validate) and
the handlers stay thin. Every child carries the same labels and a controller ownerReference to its
WebSocketGateway, so Kubernetes garbage-collects it with the gateway and the operator can tell its own
objects from a stranger's with the same name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from wsgateway_operator import API_VERSION, FIELD_MANAGER, KIND
from wsgateway_operator.alerts import alert_groups
from wsgateway_operator.spec import WebSocketGatewaySpec

Manifest = dict[str, Any]

CONTAINER_PORT = 8080
CREDENTIALS_DIR = "/etc/wsgateway/nats"
CONNECTIONS_METRIC = "wsgateway_connections"
RUN_AS = 65532  # the conventional non-root user of minimal images
CONFIG_HASH_ANNOTATION = "wsgateway.dev/config-hash"
GATEWAY_LABEL = "wsgateway.dev/gateway"


class Owner(BaseModel):
    """The WebSocketGateway a child belongs to (what the ownerReference and the names need)."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    uid: str


# --- labels, names, ownership -------------------------------------------------------------------


def selector_labels(owner: Owner) -> dict[str, str]:
    """The immutable Deployment selector: never add to it (Kubernetes rejects selector changes)."""
    return {"app.kubernetes.io/name": "wsgateway", "app.kubernetes.io/instance": owner.name}


def labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        "app.kubernetes.io/component": "gateway",
        "app.kubernetes.io/part-of": "wsgateway",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        GATEWAY_LABEL: owner.name,
    }


def label_selector(owner: Owner) -> str:
    """`labelSelector` query value for the gateway's pods."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(owner).items()))


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def config_map_name(owner: Owner) -> str:
    return f"{owner.name}-config"


def _metadata(owner: Owner, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# --- ConfigMap: the gateway's configuration as WSGATEWAY_* variables -----------------------------


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def gateway_env(spec: WebSocketGatewaySpec) -> dict[str, str]:
    """The gateway's settings (gateway.config.Settings) as environment variables.

    WSGATEWAY_CREATE_STREAM is false: the operator owns the stream and the ACL bucket, so a pod that
    starts before them waits (not ready) instead of creating them with its own defaults.
    """
    nats, auth, gw = spec.nats, spec.auth, spec.gateway
    env: dict[str, str] = {
        "WSGATEWAY_NATS_URL": ",".join(nats.urls),
        "WSGATEWAY_STREAM": nats.stream.name,
        "WSGATEWAY_SUBJECT_PREFIX": nats.subject_prefix,
        "WSGATEWAY_CREATE_STREAM": "false",
        "WSGATEWAY_STREAM_MAX_AGE_S": _num(nats.stream.max_age_seconds),
        "WSGATEWAY_STREAM_MAX_BYTES": str(nats.stream.max_bytes),
        "WSGATEWAY_STREAM_REPLICAS": str(nats.stream.replicas),
        "WSGATEWAY_ACL_BUCKET": nats.acl_bucket,
        "WSGATEWAY_TENANT_CLAIM": auth.tenant_claim,
        "WSGATEWAY_GROUPS_CLAIM": auth.groups_claim,
        "WSGATEWAY_JWT_LEEWAY_S": str(auth.jwt_leeway_seconds),
        "WSGATEWAY_ALLOW_QUERY_TOKEN": "true" if auth.allow_query_token else "false",
        "WSGATEWAY_HOST": "0.0.0.0",
        "WSGATEWAY_PORT": str(CONTAINER_PORT),
        "WSGATEWAY_WORKERS": str(gw.workers),
        "WSGATEWAY_LOG_LEVEL": gw.log_level,
        "WSGATEWAY_MAX_CONNECTIONS": str(gw.max_connections),
        # exported as wsgateway_connections_target: dashboards and alerts compare the load with it
        "WSGATEWAY_CONNECTIONS_TARGET": str(spec.autoscaling.target_connections_per_pod),
        "WSGATEWAY_MAX_FRAME_BYTES": str(gw.max_frame_bytes),
        "WSGATEWAY_MAX_SUBSCRIPTIONS": str(gw.max_subscriptions),
        "WSGATEWAY_MAX_BAD_FRAMES": str(gw.max_bad_frames),
        "WSGATEWAY_QUEUE_MAX_MESSAGES": str(gw.queue_max_messages),
        "WSGATEWAY_QUEUE_MAX_BYTES": str(gw.queue_max_bytes),
        "WSGATEWAY_SOCKET_SEND_BUFFER": str(gw.socket_send_buffer),
        "WSGATEWAY_HEARTBEAT_S": str(gw.heartbeat_seconds),
        "WSGATEWAY_SHUTDOWN_TIMEOUT_S": str(gw.shutdown_timeout_seconds),
        "WSGATEWAY_MAX_CONCURRENT_REPLAYS": str(gw.max_concurrent_replays),
        "WSGATEWAY_HISTORY_MAX_LIMIT": str(gw.history_max_limit),
        "WSGATEWAY_FLUSH_INTERVAL_MS": str(gw.flush_interval_ms),
    }
    if nats.credentials_secret is not None:
        env["WSGATEWAY_NATS_CREDENTIALS"] = f"{CREDENTIALS_DIR}/{nats.credentials_secret.key}"
    if auth.issuer:
        env["WSGATEWAY_OIDC_ISSUER"] = auth.issuer
    if auth.jwks_url:
        env["WSGATEWAY_JWKS_URL"] = auth.jwks_url
    if auth.audience:
        env["WSGATEWAY_AUDIENCE"] = auth.audience
    if spec.observability.otlp_endpoint:
        env["WSGATEWAY_OTEL_ENDPOINT"] = spec.observability.otlp_endpoint
        env["WSGATEWAY_OTEL_SAMPLE_RATIO"] = str(spec.observability.trace_sample_ratio)
    return dict(sorted(env.items()))


def config_hash(data: dict[str, str]) -> str:
    """Goes into the pod template, so a configuration change rolls the pods (env is read at start)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def build_config_map(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_map_name(owner)),
        "data": gateway_env(spec),
    }


# --- Deployment ------------------------------------------------------------------------------------


def _resources(spec: WebSocketGatewaySpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        values = getattr(spec.resources, part).model_dump(exclude_none=True)
        if values:
            out[part] = values
    return out


def build_deployment(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    """The gateway pods.

    Rolling updates never lower capacity (maxUnavailable 0) and drain each old pod: the preStop sleep
    lets the Service drop the pod before SIGTERM, then the gateway sends 1001 to every client (they
    resume elsewhere with their cursor) within shutdownTimeoutSeconds; the grace period is longer than
    both together. `replicas` is only the starting point: the autoscaler owns it afterwards.
    """
    gw = spec.gateway
    selector = selector_labels(owner)
    env_hash = config_hash(gateway_env(spec))
    pod_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(CONTAINER_PORT),
        "prometheus.io/path": "/metrics",
        CONFIG_HASH_ANNOTATION: env_hash,
        **spec.pod_annotations,
    }
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
    secret = spec.nats.credentials_secret
    if secret is not None:
        mounts.append({"name": "nats-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})
        volumes.append({
            "name": "nats-credentials",
            "secret": {"secretName": secret.name, "items": [{"key": secret.key, "path": secret.key}],
                       "defaultMode": 0o440},
        })
    container: dict[str, Any] = {
        "name": "gateway",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["wsgateway", "serve"],
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config_map_name(owner)}}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 30,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2, "successThreshold": 1,
        },
        "resources": _resources(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if gw.drain_delay_seconds > 0:
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": gw.drain_delay_seconds}}}
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": gw.termination_grace_seconds,
        "automountServiceAccountToken": False,  # the gateway never talks to the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname",
                    },
                }],
            },
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "replicas": spec.replicas.min,
            "revisionHistoryLimit": 5,
            "minReadySeconds": 5,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
            "template": {
                "metadata": {"labels": labels(owner), "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


# --- Service, PodDisruptionBudget ----------------------------------------------------------------


def build_service(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, spec.service.annotations),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(owner),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_pdb(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    """One pod at a time may be evicted voluntarily: node drains proceed, clients move in small waves."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(owner)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


# --- autoscaling ---------------------------------------------------------------------------------


def scaling_behavior(spec: WebSocketGatewaySpec) -> dict[str, Any]:
    """Scale up fast (new connections need room now), down slowly and one pod at a time (each removed
    pod disconnects its clients, who resume on the others)."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 30},
                {"type": "Pods", "value": 4, "periodSeconds": 30},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": spec.autoscaling.scale_down_stabilization_seconds,
            "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        },
    }


def _scale_target(owner: Owner) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name}


def build_hpa(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    """autoscaling/v2 on the custom Pods metric wsgateway_connections (served by prometheus-adapter):
    the HPA keeps the average per pod at targetConnectionsPerPod."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "scaleTargetRef": _scale_target(owner),
            "minReplicas": spec.replicas.min,
            "maxReplicas": spec.replicas.max,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": CONNECTIONS_METRIC},
                    "target": {
                        "type": "AverageValue",
                        "averageValue": str(spec.autoscaling.target_connections_per_pod),
                    },
                },
            }],
            "behavior": scaling_behavior(spec),
        },
    }


def connections_query(owner: Owner) -> str:
    """PromQL for the gateway's total connections (Deployment pods are named <name>-<hash>-<id>)."""
    return (
        f'sum({CONNECTIONS_METRIC}{{namespace="{owner.namespace}",'
        f'pod=~"{owner.name}-[a-z0-9]+-[a-z0-9]+"}})'
    )


def build_scaled_object(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    """KEDA alternative to the HPA: KEDA queries Prometheus itself, no prometheus-adapter needed."""
    assert spec.autoscaling.prometheus_address is not None  # the spec model guarantees it for mode keda
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "scaleTargetRef": _scale_target(owner),
            "minReplicaCount": spec.replicas.min,
            "maxReplicaCount": spec.replicas.max,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": scaling_behavior(spec)}},
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": spec.autoscaling.prometheus_address,
                    "query": connections_query(owner),
                    "threshold": str(spec.autoscaling.target_connections_per_pod),
                },
            }],
        },
    }


# --- monitoring (only when monitoring.coreos.com exists) ----------------------------------------


def build_service_monitor(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "selector": {"matchLabels": selector_labels(owner)},
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.observability.scrape_interval}],
        },
    }


def build_prometheus_rule(owner: Owner, spec: WebSocketGatewaySpec) -> Manifest:
    """This gateway's alerts: the rules of wsgateway_operator.alerts (the same ones as the committed
    dashboards/prometheus/wsgateway-alerts.yaml) with the gateway's own selector; `job` is the Service
    name (the ServiceMonitor's default job label). WSGatewayAtMaxReplicas only with the HPA."""
    groups = alert_groups(
        f'namespace="{owner.namespace}",job="{owner.name}"',
        runbook_base_url=spec.observability.runbook_base_url,
        group_name=f"wsgateway.{owner.namespace}.{owner.name}",
        hpa=spec.autoscaling.mode == "hpa",  # needs kube-state-metrics (part of kube-prometheus-stack)
        hpa_selector=f'namespace="{owner.namespace}",horizontalpodautoscaler="{owner.name}"',
    )
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(owner, owner.name),
        "spec": {"groups": groups},
    }


# --- the whole set --------------------------------------------------------------------------------

ALL_KINDS = (
    "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
    "ServiceMonitor", "PrometheusRule",
)


def build_children(owner: Owner, spec: WebSocketGatewaySpec, *, monitoring_api: bool) -> list[Manifest]:
    """Every child the gateway should have, in apply order (configuration before the pods reading it).

    `monitoring_api`: whether the cluster serves monitoring.coreos.com/v1 (Prometheus Operator); the
    ServiceMonitor and PrometheusRule are only built when it does and the spec asks for them.
    """
    children = [
        build_config_map(owner, spec),
        build_deployment(owner, spec),
        build_service(owner, spec),
        build_pdb(owner, spec),
        build_scaled_object(owner, spec) if spec.autoscaling.mode == "keda" else build_hpa(owner, spec),
    ]
    if monitoring_api and spec.observability.service_monitor:
        children.append(build_service_monitor(owner, spec))
    if monitoring_api and spec.observability.prometheus_rule:
        children.append(build_prometheus_rule(owner, spec))
    return children


def unwanted_kinds(children: list[Manifest]) -> list[str]:
    """Kinds the gateway may have had but should not have now (e.g. the HPA after a switch to KEDA)."""
    present = {c["kind"] for c in children}
    return [k for k in ALL_KINDS if k not in present]


# --- JetStream -------------------------------------------------------------------------------------


class StreamPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    subjects: tuple[str, ...]
    storage: str
    max_age_seconds: float
    max_bytes: int
    replicas: int
    description: str
    # The rest of the stream's and the bucket's shape (duplicate window, bucket history) is the gateway's own:
    # gateway.provisioning builds both configs for the operator and for a gateway that creates them itself.


class BucketPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    replicas: int


class JetStreamPlan(BaseModel):
    """What the operator keeps in NATS for one gateway, and how it recognises the gateway's consumers."""

    model_config = ConfigDict(frozen=True)

    stream: StreamPlan
    bucket: BucketPlan
    subject_prefix: str
    deletion_policy: str

    @property
    def live_filter(self) -> str:
        return f"{self.subject_prefix}.>"


def jetstream_plan(owner: Owner, spec: WebSocketGatewaySpec) -> JetStreamPlan:
    nats = spec.nats
    return JetStreamPlan(
        stream=StreamPlan(
            name=nats.stream.name,
            subjects=tuple(nats.stream_subjects),
            storage=nats.stream.storage,
            max_age_seconds=nats.stream.max_age_seconds,
            max_bytes=nats.stream.max_bytes,
            replicas=nats.stream.replicas,
            # Not naming the gateway: gateways sharing a stream must not rewrite each other's config.
            description=f"wsgateway events (managed by {FIELD_MANAGER})",
        ),
        bucket=BucketPlan(name=nats.acl_bucket, replicas=nats.stream.replicas),
        subject_prefix=nats.subject_prefix,
        deletion_policy=nats.deletion_policy,
    )


def is_gateway_consumer(plan: JetStreamPlan, config: dict[str, Any]) -> bool:
    """Whether a consumer on the stream is one a gateway pod created (so it may be cleaned up).

    The pods read through consumers they create themselves (gateway/core/bus.py, gateway/core/history.py): an
    ephemeral *ordered push* consumer on `<prefix>.>` per process (the live feed), and short-lived
    ephemeral *pull* readers on one scope or tenant (resume, history, SSE). Durable consumers and
    anything filtered outside the prefix belong to someone else and are never touched.
    """
    if config.get("durable_name"):
        return False
    filters = [f for f in [config.get("filter_subject"), *(config.get("filter_subjects") or [])] if f]
    if not filters or not all(f.startswith(f"{plan.subject_prefix}.") for f in filters):
        return False
    ack = str(config.get("ack_policy") or "").lower().rsplit(".", 1)[-1]
    if config.get("deliver_subject"):  # the live feed: nats-py's ordered consumer
        return (filters == [plan.live_filter] and ack == "none" and bool(config.get("flow_control"))
                and bool(config.get("mem_storage")))
    return ack == "all" and bool(config.get("mem_storage"))  # a history reader
