"""Pure builders, drift detection and status: no I/O, so every manifest is validated offline.

Built-in kinds are validated with kubernetes-validate (strict: unknown fields are errors) against the
Kubernetes versions it ships schemas for. ServiceMonitor, PrometheusRule (Prometheus Operator) and
ScaledObject (KEDA) are CRD kinds kubernetes-validate has no schema for: it says so (asserted below),
and those manifests are checked here for the fields their CRDs require and the values the operator
relies on (metric names that exist, the scale target, the query).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.metrics import Metrics
from wsgateway_operator.alerts import DEFAULT_RUNBOOK_BASE_URL, alerts
from wsgateway_operator.apply import contains, drift_patch, owned_by, quantity
from wsgateway_operator.builders import (
    CONFIG_HASH_ANNOTATION,
    Owner,
    build_children,
    build_deployment,
    gateway_env,
    is_gateway_consumer,
    jetstream_plan,
    labels,
    unwanted_kinds,
)
from wsgateway_operator.scrape import ScrapeResult, is_ready, metrics_url, parse_connections
from wsgateway_operator.spec import WebSocketGatewaySpec
from wsgateway_operator.status import Observation, build_status, desired_conditions, merge_conditions

OWNER = Owner(name="gw", namespace="realtime", uid="0b5e7c1e-1111-2222-3333-444455556666")
K8S_VERSIONS = ("1.30", "1.33", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}

BASE: dict[str, Any] = {
    "image": "ghcr.io/wsgateway/wsgateway:0.1.0",
    "nats": {"urls": ["nats://nats:4222"]},
    "auth": {"issuer": "https://login.example.com/realms/platform"},
}


def spec(**changes: Any) -> WebSocketGatewaySpec:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return WebSocketGatewaySpec.model_validate(raw)


MATRIX = {
    "minimal": (spec(), False),
    "minimal+monitoring": (spec(), True),
    "full": (spec(
        replicas={"min": 3, "max": 30},
        autoscaling={"targetConnectionsPerPod": 8000, "scaleDownStabilizationSeconds": 600},
        nats={"urls": ["nats://a:4222", "tls://b:4222"], "credentialsSecret": {"name": "nats-creds"},
              "subjectPrefix": "app.events", "stream": {"name": "APP", "subjects": ["app.events.>", "audit.>"],
                                                        "maxAge": "7d", "maxBytes": 10**10, "replicas": 3},
              "aclBucket": "app-acl", "deletionPolicy": "Delete"},
        auth={"jwksUrl": "https://idp/jwks", "audience": "ws", "allowQueryToken": False},
        gateway={"workers": 4, "maxConnections": 20000, "queueMaxMessages": 500, "queueMaxBytes": 1 << 20,
                 "maxFrameBytes": 1 << 20, "heartbeatSeconds": 30, "shutdownTimeoutSeconds": 60,
                 "drainDelaySeconds": 0},
        resources={"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
        service={"type": "LoadBalancer", "port": 443, "annotations": {"lb.example/type": "nlb"}},
        observability={"otlpEndpoint": "http://otel:4318", "scrapeInterval": "15s"},
        podAnnotations={"team": "platform"}, nodeSelector={"pool": "edge"}, priorityClassName="high",
    ), True),
    "keda": (spec(autoscaling={"mode": "keda", "prometheusAddress": "http://prometheus:9090"}), False),
    "keda+monitoring": (spec(autoscaling={"mode": "keda", "prometheusAddress": "http://prometheus:9090"}), True),
    "monitoring-off": (spec(observability={"serviceMonitor": False, "prometheusRule": False}), True),
    "single-pod": (spec(replicas={"min": 1, "max": 1}), False),
    "tight-limits": (spec(gateway={"maxConnections": 1, "maxFrameBytes": 256, "queueMaxBytes": 1024,
                                   "shutdownTimeoutSeconds": 0}), False),
}


@pytest.mark.parametrize("case", MATRIX)
def test_every_manifest_validates(case: str) -> None:
    s, monitoring = MATRIX[case]
    children = build_children(OWNER, s, monitoring_api=monitoring)
    for child in children:
        if child["kind"] in CRD_KINDS:
            with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                kubernetes_validate.validate(child, K8S_VERSIONS[-1], strict=True)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(child, version, strict=True)


@pytest.mark.parametrize("case", MATRIX)
def test_children_are_owned_and_labelled(case: str) -> None:
    s, monitoring = MATRIX[case]
    for child in build_children(OWNER, s, monitoring_api=monitoring):
        meta = child["metadata"]
        assert meta["namespace"] == OWNER.namespace
        assert meta["labels"] == labels(OWNER)
        assert meta["ownerReferences"] == [{
            "apiVersion": "wsgateway.dev/v1alpha1", "kind": "WebSocketGateway", "name": "gw", "uid": OWNER.uid,
            "controller": True, "blockOwnerDeletion": True,
        }]


def kinds(s: WebSocketGatewaySpec, monitoring: bool) -> list[str]:
    return [c["kind"] for c in build_children(OWNER, s, monitoring_api=monitoring)]


def test_which_children() -> None:
    base = ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    assert kinds(spec(), False) == [*base, "HorizontalPodAutoscaler"]
    assert kinds(spec(), True) == [*base, "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"]
    keda = spec(autoscaling={"mode": "keda", "prometheusAddress": "http://p:9090"})
    assert kinds(keda, False) == [*base, "ScaledObject"]  # KEDA makes its own HPA: none from us
    assert kinds(spec(observability={"prometheusRule": False}), True)[-1] == "ServiceMonitor"
    assert unwanted_kinds(build_children(OWNER, keda, monitoring_api=False)) == [
        "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"]


def test_config_map_is_the_gateways_settings() -> None:
    """Every variable is a real setting, and the gateway accepts the whole set."""
    for s, _ in MATRIX.values():
        env = gateway_env(s)
        fields = {f"WSGATEWAY_{name.upper()}" for name in Settings.model_fields}
        assert {k for k in env if k.startswith("WSGATEWAY_")} <= fields
        settings = Settings.model_validate({k.removeprefix("WSGATEWAY_").lower(): v for k, v in env.items()
                                            if k.startswith("WSGATEWAY_")})
        assert settings.nats_servers == list(s.nats.urls)
        assert settings.stream == s.nats.stream.name and settings.acl_bucket == s.nats.acl_bucket
        assert settings.create_stream is False  # the operator owns the stream and the bucket
        assert settings.max_connections == s.gateway.max_connections
        assert settings.connections_target == s.autoscaling.target_connections_per_pod
        assert settings.queue_max_bytes == s.gateway.queue_max_bytes
        assert settings.heartbeat_s == s.gateway.heartbeat_seconds
        assert settings.shutdown_timeout_s == s.gateway.shutdown_timeout_seconds
        assert settings.port == 8080 and settings.workers == s.gateway.workers
    full = gateway_env(MATRIX["full"][0])
    assert full["WSGATEWAY_NATS_CREDENTIALS"] == "/etc/wsgateway/nats/nats.creds"
    assert full["WSGATEWAY_JWKS_URL"] == "https://idp/jwks" and "WSGATEWAY_OIDC_ISSUER" not in full
    assert full["WSGATEWAY_STREAM_MAX_AGE_S"] == str(7 * 86400)
    assert full["WSGATEWAY_CONNECTIONS_TARGET"] == "8000"  # spec.autoscaling.targetConnectionsPerPod
    assert full["WSGATEWAY_OTEL_ENDPOINT"] == "http://otel:4318"  # what the gateway's tracing reads
    assert Settings(**{k.removeprefix("WSGATEWAY_").lower(): v for k, v in full.items()
                       if k.startswith("WSGATEWAY_OTEL_")}, dev_mode=True).otel_endpoint == "http://otel:4318"


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_deployment() -> None:
    s = MATRIX["full"][0]
    dep = build_deployment(OWNER, s)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["image"] == s.image and c["command"] == ["wsgateway", "serve"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["envFrom"] == [{"configMapRef": {"name": "gw-config"}}]
    assert {"name": "nats-credentials", "mountPath": "/etc/wsgateway/nats", "readOnly": True} in c["volumeMounts"]
    secret_volume = next(v for v in pod["volumes"] if v["name"] == "nats-credentials")
    assert secret_volume["secret"]["secretName"] == "nats-creds"
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0][
        "podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8080"
    assert annotations["team"] == "platform"
    assert pod["nodeSelector"] == {"pool": "edge"} and pod["priorityClassName"] == "high"
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "wsgateway",
                                                      "app.kubernetes.io/instance": "gw"}


@pytest.mark.parametrize(("drain", "shutdown"), [(5, 10), (0, 60), (30, 0)])
def test_rollout_drains_connections(drain: int, shutdown: int) -> None:
    """preStop pause first (endpoints drop the pod), then the gateway's own drain; the kubelet's grace
    period covers both, so a draining pod is never killed early."""
    dep = build_deployment(OWNER, spec(gateway={"drainDelaySeconds": drain, "shutdownTimeoutSeconds": shutdown}))
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + shutdown
    lifecycle = container(dep).get("lifecycle")
    assert lifecycle == ({"preStop": {"sleep": {"seconds": drain}}} if drain else None)


def test_pod_template_changes_only_with_the_spec() -> None:
    a, b = build_deployment(OWNER, spec()), build_deployment(OWNER, spec())
    assert a == b
    limits = build_deployment(OWNER, spec(gateway={"maxConnections": 10}))
    assert limits["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != \
        a["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    image = build_deployment(OWNER, spec(image="ghcr.io/wsgateway/wsgateway:0.2.0"))
    assert container(image)["image"].endswith(":0.2.0")
    assert image["spec"]["template"]["metadata"] == a["spec"]["template"]["metadata"]


def by_kind(s: WebSocketGatewaySpec, kind: str, monitoring: bool = True) -> dict[str, Any]:
    return next(c for c in build_children(OWNER, s, monitoring_api=monitoring) if c["kind"] == kind)


def test_hpa_scales_on_connections_per_pod() -> None:
    hpa = by_kind(spec(replicas={"min": 3, "max": 12},
                       autoscaling={"targetConnectionsPerPod": 7000, "scaleDownStabilizationSeconds": 900}),
                  "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gw"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert hpa["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "wsgateway_connections"}, "target": {"type": "AverageValue", "averageValue": "7000"}}}]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 900
    assert hpa["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_keda_scaled_object() -> None:
    so = by_kind(spec(autoscaling={"mode": "keda", "prometheusAddress": "http://prom:9090",
                                   "targetConnectionsPerPod": 100}), "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    s = so["spec"]
    assert s["scaleTargetRef"]["name"] == "gw" and (s["minReplicaCount"], s["maxReplicaCount"]) == (2, 10)
    (trigger,) = s["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["serverAddress"] == "http://prom:9090"
    assert trigger["metadata"]["threshold"] == "100"
    query = 'sum(wsgateway_connections{namespace="realtime",pod=~"gw-[a-z0-9]+-[a-z0-9]+"})'
    assert trigger["metadata"]["query"] == query
    assert re.fullmatch(r'gw-[a-z0-9]+-[a-z0-9]+', "gw-5d8f7c9b6-x2x4z")
    assert "behavior" in s["advanced"]["horizontalPodAutoscalerConfig"]


def exposed_metric_names() -> set[str]:
    metrics = Metrics(CollectorRegistry())
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_monitoring_objects_use_real_metrics() -> None:
    sm = by_kind(spec(), "ServiceMonitor")["spec"]
    assert sm["selector"]["matchLabels"] == {"app.kubernetes.io/name": "wsgateway", "app.kubernetes.io/instance": "gw"}
    assert sm["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    service = by_kind(spec(), "Service")
    assert service["spec"]["ports"][0]["name"] == "http"  # the ServiceMonitor's endpoint port
    rule = by_kind(spec(), "PrometheusRule")["spec"]
    (group,) = rule["groups"]
    names = exposed_metric_names()
    assert group["name"]  # required by the PrometheusRule CRD (groups are a map keyed by name)
    prometheus_duration = r"(\d+(ms|s|m|h|d|w|y))+"
    assert re.fullmatch(prometheus_duration, sm["endpoints"][0]["interval"])
    for r in group["rules"]:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(r) and "record" not in r
        assert re.fullmatch(prometheus_duration, r["for"]) and isinstance(r["expr"], str)
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", r["alert"])  # a valid label value and metric-like name
        assert all(isinstance(v, str) for v in (*r["labels"].values(), *r["annotations"].values()))
        for metric in re.findall(r"\b(wsgateway_[a-z_]+)\b", r["expr"]):
            assert metric in names, (r["alert"], metric)
        # every selector is this gateway's (the ServiceMonitor's job label is the Service name)
        for metric, matchers in re.findall(r"\b([a-z_]+)\{([^}]*)\}", r["expr"]):
            wanted = 'horizontalpodautoscaler="gw"' if metric.startswith("kube_") else 'job="gw"'
            assert 'namespace="realtime"' in matchers and wanted in matchers, (r["alert"], metric, matchers)
        assert r["labels"]["severity"] in {"critical", "warning"}
        assert set(r["annotations"]) == {"summary", "description", "runbook_url"}
        assert r["annotations"]["runbook_url"].startswith(f"{DEFAULT_RUNBOOK_BASE_URL}#")
    # the one definition shared with dashboards/prometheus/wsgateway-alerts.yaml (tests/test_alerts.py)
    assert [r["alert"] for r in group["rules"]] == [a.name for a in alerts(hpa=True)]
    assert "WSGatewayAtMaxReplicas" not in str(by_kind(MATRIX["keda+monitoring"][0], "PrometheusRule"))
    custom = by_kind(spec(observability={"runbookBaseUrl": "https://wiki.example.com/rb"}), "PrometheusRule")
    assert {r["annotations"]["runbook_url"].split("#")[0] for r in custom["spec"]["groups"][0]["rules"]} == {
        "https://wiki.example.com/rb"}


def test_jetstream_plan() -> None:
    plan = jetstream_plan(OWNER, MATRIX["full"][0])
    assert plan.stream.name == "APP" and plan.stream.subjects == ("app.events.>", "audit.>")
    assert plan.stream.max_age_seconds == 7 * 86400 and plan.stream.replicas == 3
    assert plan.bucket.name == "app-acl" and plan.bucket.replicas == 3
    assert plan.live_filter == "app.events.>" and plan.deletion_policy == "Delete"
    default = jetstream_plan(OWNER, spec())
    assert default.stream.subjects == ("events.>",) and default.deletion_policy == "Retain"


LIVE_FEED = {"durable_name": None, "deliver_subject": "_INBOX.abc", "ack_policy": "none",
             "filter_subject": "events.>", "flow_control": True, "mem_storage": True}
READER = {"durable_name": None, "deliver_subject": None, "ack_policy": "all",
          "filter_subject": "events.t1.conversation.c1", "flow_control": False, "mem_storage": True}


@pytest.mark.parametrize(("config", "ours"), [
    (LIVE_FEED, True),
    (READER, True),
    ({**LIVE_FEED, "durable_name": "audit"}, False),  # someone's durable
    ({**LIVE_FEED, "filter_subject": "other.>"}, False),
    ({**LIVE_FEED, "ack_policy": "explicit"}, False),  # a push consumer, but not an ordered one
    ({**LIVE_FEED, "filter_subject": None, "filter_subjects": ["events.>"]}, True),
    ({**READER, "mem_storage": False}, False),
    ({**READER, "filter_subject": None}, False),  # the whole stream: not a gateway reader
])
def test_gateway_consumers_are_recognised(config: dict[str, Any], ours: bool) -> None:
    assert is_gateway_consumer(jetstream_plan(OWNER, spec()), config) is ours


# --- drift ----------------------------------------------------------------------------------------


def as_served(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the API server gives back: server fields added, defaults filled, quantities canonical."""
    live = copy.deepcopy(manifest)
    annotations = {**live["metadata"].get("annotations", {}), "deployment.kubernetes.io/revision": "1"}
    live["metadata"].update({"uid": "x", "resourceVersion": "7", "generation": 1, "creationTimestamp": "t",
                             "annotations": annotations})
    live["status"] = {"observedGeneration": 1}
    if live["kind"] == "Deployment":
        pod = live["spec"]["template"]["spec"]
        pod["dnsPolicy"] = "ClusterFirst"
        c = pod["containers"][0]
        c["terminationMessagePath"] = "/dev/termination-log"
        c["ports"][0]["hostPort"] = 0
        c["resources"]["requests"]["cpu"] = "250m"
        c["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
        live["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "now"
        live["spec"]["replicas"] = 7  # the HPA scaled it
    if live["kind"] == "HorizontalPodAutoscaler":
        live["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = "5k"
    if live["kind"] == "Service":
        live["spec"]["clusterIP"] = "10.0.0.1"
        live["spec"]["ports"][0]["targetPort"] = "http"
    return live


def test_no_drift_after_the_api_server_filled_in_defaults() -> None:
    s = spec(resources={"requests": {"cpu": "0.25", "memory": "256Mi"}})
    for child in build_children(OWNER, s, monitoring_api=True):
        assert drift_patch(child["kind"], child, as_served(child), replica_bounds=(2, 10)) is None, child["kind"]


def test_drift_is_patched_back() -> None:
    dep = build_deployment(OWNER, spec())
    live = as_served(dep)
    container(live)["image"] = "evil:latest"
    patch = drift_patch("Deployment", dep, live, replica_bounds=(2, 10))
    assert patch is not None and container(patch)["image"] == dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "replicas" not in patch["spec"]  # the HPA's business
    live = as_served(dep)
    live["spec"]["replicas"] = 0  # scaled to zero by hand: the HPA would stay off
    assert drift_patch("Deployment", dep, live, replica_bounds=(2, 10)) == {**_without_replicas(dep),
                                                                           "spec": {**_without_replicas(dep)["spec"],
                                                                                    "replicas": 2}}
    live["spec"]["replicas"] = 50
    assert drift_patch("Deployment", dep, live, replica_bounds=(2, 10))["spec"]["replicas"] == 10  # type: ignore[index]


def _without_replicas(dep: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dep)
    out["spec"].pop("replicas")
    out["metadata"] = {k: v for k, v in out["metadata"].items() if k not in ("name", "namespace")}
    return out


def test_config_map_drops_keys_it_no_longer_sets() -> None:
    cm = by_kind(spec(auth={"issuer": "https://idp", "audience": "ws"}), "ConfigMap")
    now = by_kind(spec(), "ConfigMap")
    patch = drift_patch("ConfigMap", now, as_served(cm))
    assert patch is not None and patch["data"]["WSGATEWAY_AUDIENCE"] is None


def test_contains_and_quantities() -> None:
    assert quantity("5k") == quantity("5000") == quantity(5000)
    assert quantity("250m") == quantity("0.25")
    assert quantity("1Gi") == 1024 ** 3
    assert quantity("http") is None
    assert contains({"a": [{"x": 1, "y": 2}], "b": 1}, {"a": [{"x": 1}]})
    assert not contains({"a": [{"x": 1}, {"x": 2}]}, {"a": [{"x": 1}]})  # lists: same length
    assert not contains({"a": True}, {"a": 1})
    assert not contains({"memory": "1Gi"}, {"memory": "1G"})
    assert contains({"averageValue": "5k"}, {"averageValue": "5000"})
    assert owned_by({"metadata": {"ownerReferences": [{"uid": "u", "controller": True}]}}, "u")
    assert not owned_by({"metadata": {"ownerReferences": [{"uid": "u"}]}}, "u")


# --- scraping and status -------------------------------------------------------------------------


def test_parse_connections_from_the_gateways_own_exposition() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.connections.set(1234)
    body, _ = metrics.exposition()
    assert parse_connections(body.decode()) == 1234
    with pytest.raises(ValueError, match="not in the exposition"):
        parse_connections("other_metric 1\n")


def pod(name: str, *, ready: bool = True, ip: str | None = "10.1.2.3", port: int = 8080) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "gateway", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_scrape_targets() -> None:
    assert is_ready(pod("a")) and not is_ready(pod("b", ready=False)) and not is_ready(pod("c", ip=None))
    assert metrics_url(pod("a", port=9000)) == "http://10.1.2.3:9000/metrics"
    assert metrics_url(pod("a", ip="fd00::1")) == "http://[fd00::1]:8080/metrics"


def deployment(desired: int, ready: int, *, updated: int | None = None, generation: int = 1,
               observed: int = 1, total: int | None = None) -> dict[str, Any]:
    updated = desired if updated is None else updated
    return {"metadata": {"generation": generation}, "spec": {"replicas": desired},
            "status": {"observedGeneration": observed, "replicas": desired if total is None else total,
                       "readyReplicas": ready, "updatedReplicas": updated, "availableReplicas": ready}}


def conds(obs: Observation) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in desired_conditions(obs)}


def obs(**kw: Any) -> Observation:
    base = {"name": "gw", "namespace": "realtime", "generation": 2, "min_replicas": 2, "stream": "EVENTS",
            "acl_bucket": "wsgateway-acl"}
    return Observation(**{**base, **kw})


def test_conditions() -> None:
    healthy = obs(deployment=deployment(3, 3), scrape=ScrapeResult(connections=9, scraped=3))
    assert conds(healthy) == {"Ready": ("True", "Serving"), "Progressing": ("False", "RolloutComplete"),
                              "NatsReady": ("True", "StreamReady"), "Degraded": ("False", "AsExpected")}
    assert "9 connections" in desired_conditions(healthy)[0]["message"]

    rolling = obs(deployment=deployment(3, 3, updated=1, total=4, generation=3, observed=3))
    assert conds(rolling)["Progressing"] == ("True", "RollingOut")
    assert conds(rolling)["Ready"] == ("True", "Serving")

    nats_down = obs(deployment=deployment(3, 3), nats_reason="NatsUnreachable", nats_message="cannot connect")
    c = conds(nats_down)
    assert c["NatsReady"] == ("False", "NatsUnreachable") and c["Ready"] == ("False", "NatsNotReady")
    assert c["Degraded"] == ("True", "NatsNotReady")

    no_pods = obs(deployment=deployment(2, 0))
    assert conds(no_pods)["Ready"] == ("False", "NoReadyPods")
    assert "kubectl -n realtime describe pods -l app.kubernetes.io/instance=gw" in desired_conditions(no_pods)[0][
        "message"]
    assert conds(obs(deployment=deployment(3, 1)))["Ready"] == ("False", "MinimumPodsUnavailable")
    # A pod became unready after the Deployment controller declared the rollout complete: Degraded.
    unready = deployment(3, 2)
    unready["status"]["conditions"] = [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]
    assert conds(obs(deployment=unready))["Degraded"] == ("True", "PodsNotReady")
    assert conds(obs(deployment=unready))["Progressing"] == ("False", "RolloutComplete")

    # The new pods exist but never became available (no node runs them): still progressing, and the
    # conditions say they are Pending and unscheduled instead of calling the rollout complete.
    pending = obs(deployment=deployment(2, 0), pods_pending=2, pods_unscheduled=2)
    c = conds(pending)
    assert c["Progressing"] == ("True", "WaitingForPods") and c["Ready"] == ("False", "NoReadyPods")
    assert c["Degraded"] == ("False", "AsExpected")  # until the Deployment's progress deadline
    ready_msg, progressing_msg = (m["message"] for m in desired_conditions(pending)[:2])
    assert "2 Pending (2 not scheduled to a node" in ready_msg
    assert progressing_msg.startswith("all 2 pods run the current template, 0 available; 2 Pending")

    scrape_failed = obs(deployment=deployment(2, 2), scrape=ScrapeResult(connections=5, scraped=1, failed=["gw-b"]))
    c = conds(scrape_failed)
    assert c["Ready"] == ("True", "Serving") and c["Degraded"] == ("True", "MetricsUnavailable")
    stuck = deployment(2, 1)
    stuck["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                      "message": "ReplicaSet gw-1 has timed out progressing."}]
    assert conds(obs(deployment=stuck))["Degraded"] == ("True", "RolloutStuck")
    hpa = {"status": {"conditions": [{"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric",
                                      "message": "unable to get metric wsgateway_connections"}]}}
    c = conds(obs(deployment=deployment(2, 2), autoscaler=hpa))
    assert c["Degraded"] == ("True", "AutoscalingInactive")
    invalid = obs(spec_error="invalid spec: spec.replicas: min > max")
    assert conds(invalid)["Ready"] == ("False", "InvalidSpec")


def test_transition_times_only_move_on_change() -> None:
    first = merge_conditions([], [{"type": "Ready", "status": "False", "reason": "A", "message": ""}],
                             now="T1", generation=1)
    same = merge_conditions(first, [{"type": "Ready", "status": "False", "reason": "B", "message": "x"}],
                            now="T2", generation=1)
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True", "reason": "C", "message": ""}],
                               now="T3", generation=1)
    assert [c["lastTransitionTime"] for c in (first[0], same[0], flipped[0])] == ["T1", "T1", "T3"]
    status = build_status(obs(deployment=deployment(2, 2)), {"conditions": flipped}, now="T4")
    assert status["observedGeneration"] == 2
    again = build_status(obs(deployment=deployment(2, 2)), status, now="T5")
    assert again == status  # nothing new: nothing to write


def test_prometheus_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    rule_file = Path(__file__).resolve().parents[2] / "operator" / "samples" / "prometheus-adapter-rule.yaml"
    (rule,) = yaml.safe_load(rule_file.read_text())["rules"]["custom"]
    hpa_metric = by_kind(spec(), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == hpa_metric == "wsgateway_connections"
    assert re.fullmatch(rule["name"]["matches"], "wsgateway_connections")
    assert rule["seriesQuery"].startswith("wsgateway_connections{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "wsgateway_connections" in exposed_metric_names()
