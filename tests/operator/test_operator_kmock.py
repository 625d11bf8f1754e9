"""The operator under kopf (kopf.testing.KopfRunner, the `kopf run` CLI with our registry) against the
emulated API server (kmock, tests/operator/emulator.py) and a real nats-server: only what a real control
plane cannot show. Everything else the operator does -- children and ownerReferences, the status
subresource, rollouts, drift, restarts, RBAC, 403/409 handling, NATS down and back, the finalizer with
Retain and Delete, shared streams, garbage collection, the KEDA and Prometheus Operator objects -- is tested
against real etcd, kube-apiserver and kube-controller-manager in test_cluster_operator.py (and
test_cluster_optional_apis.py, test_cluster_crd.py, test_cluster_chart.py).

Kept here, and why (fault injection the real control plane cannot do):

* test_status_counts_connections_of_ready_pods -- ready pods whose /metrics answer (and one that does not)
  need a kubelet running them; the test control plane has none (its pods stay Pending). Here the test
  writes the pods and the Deployment's status as the kubelet and the Deployment controller would.
* test_invalid_spec_that_bypassed_validation -- a resource the CRD's schema and CEL rules forbid, as it
  would reach the operator from an API server that does not enforce them; the real server refuses it.

test_operator_metrics.py uses the emulator for the same reasons (ready pods with /metrics, an invalid spec).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import kmock
from prometheus_client import CollectorRegistry

from gateway.devtools.natsproc import NatsProcess
from gateway.metrics import Metrics
from tests.operator.conftest import NAMESPACE, Client, running_operator
from tests.operator.emulator import GATEWAYS, ApiServer
from tests.support.wait import eventually

DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"


def gateway(name: str, nats_url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "wsgateway.dev/v1alpha1",
        "kind": "WebSocketGateway",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "image": "ghcr.io/wsgateway/wsgateway:0.1.0",
            "nats": {"urls": [nats_url]},
            "auth": {"issuer": "https://login.example.com/realms/platform"},
            **spec,
        },
    }


def condition(api: ApiServer, name: str, type_: str) -> tuple[str, str, str] | None:
    obj = api.get_object(GATEWAYS, NAMESPACE, name) or {}
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"], c["message"]
    return None


def is_condition(api: ApiServer, name: str, type_: str, status: str, reason: str | None = None) -> bool:
    c = condition(api, name, type_)
    return c is not None and c[0] == status and (reason is None or c[1] == reason)


async def deployment_controller(api: ApiServer, kubectl: Client, name: str, ready: int) -> None:
    """What the Deployment controller would report: the current template rolled out, `ready` pods ready."""
    dep = api.get_object(DEPLOYMENTS, NAMESPACE, name)
    assert dep is not None
    desired = dep["spec"]["replicas"]
    await kubectl.patch(DEPLOYMENTS, NAMESPACE, name, {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": desired, "updatedReplicas": desired,
        "readyReplicas": ready, "availableReplicas": ready}}, sub="status")


def fake_pod(name: str, gateway_name: str, port: int, *, ready: bool = True) -> dict[str, Any]:
    """A gateway pod as the kubelet reports it (its IP is loopback: the test serves its /metrics)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {
            "app.kubernetes.io/name": "wsgateway", "app.kubernetes.io/instance": gateway_name}},
        "spec": {"containers": [{"name": "gateway", "image": "x",
                                 "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


@contextlib.asynccontextmanager
async def metrics_endpoint(connections: int) -> AsyncIterator[int]:
    """A /metrics like a gateway pod's (the gateway's own Metrics exposition); yields its port."""
    metrics = Metrics(CollectorRegistry())
    metrics.connections.set(connections)
    body, _ = metrics.exposition()
    async with kmock.RawHandler() as handler, kmock.Server(handler) as server:
        handler["get /metrics"] << body
        yield int(server.url.port)  # type: ignore[arg-type]


async def test_status_counts_connections_of_ready_pods(api: ApiServer, kubectl: Client,
                                                       nats_server: NatsProcess) -> None:
    async with metrics_endpoint(3) as port_a, metrics_endpoint(4) as port_b, running_operator():
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url))
        await eventually(lambda: api.get_object(DEPLOYMENTS, NAMESPACE, "gw"), what="Deployment")
        for pod in (fake_pod("gw-1-a", "gw", port_a), fake_pod("gw-1-b", "gw", port_b),
                    fake_pod("gw-1-c", "gw", 1),  # ready, but its /metrics does not answer
                    fake_pod("gw-1-d", "gw", port_a, ready=False),  # not ready: not scraped
                    fake_pod("other-1-a", "other", port_a)):  # another gateway's pod
            await kubectl.create(PODS, pod)
        await deployment_controller(api, kubectl, "gw", ready=2)
        await eventually(lambda: is_condition(api, "gw", "Ready", "True", "Serving"), what="Ready")
        status = api.get_object(GATEWAYS, NAMESPACE, "gw")["status"]  # type: ignore[index]
        assert status["connections"] == 7 and status["scrapedPods"] == 2 and status["readyReplicas"] == 2
        assert "7 connections" in condition(api, "gw", "Ready")[2]  # type: ignore[index]
        assert is_condition(api, "gw", "Degraded", "True", "MetricsUnavailable")
        assert "gw-1-c" in condition(api, "gw", "Degraded")[2]  # type: ignore[index]


async def test_invalid_spec_that_bypassed_validation(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    """A spec the CRD's CEL rule forbids (replicas.min > replicas.max) that reached the operator anyway (an
    API server without CEL): a condition with the rule's message, no children, nothing crashes."""
    async with running_operator():
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url, replicas={"min": 5, "max": 2}))
        await eventually(lambda: is_condition(api, "gw", "Ready", "False", "InvalidSpec"), what="InvalidSpec")
        assert "replicas.min must be less than or equal to replicas.max" in condition(api, "gw", "Ready")[2]  # type: ignore[index]
        assert is_condition(api, "gw", "Degraded", "True", "InvalidSpec")
        assert api.get_object(DEPLOYMENTS, NAMESPACE, "gw") is None
