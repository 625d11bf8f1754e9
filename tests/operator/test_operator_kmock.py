"""The operator under kopf (kopf.testing.KopfRunner, the `kopf run` CLI with our registry) against the
emulated API server (tests/operator/emulator.py) and a real nats-server.

The emulator has no controllers: where the tests need what a cluster would do (a Deployment's status,
pods, garbage collection), they write it themselves, as the Deployment controller or the kubelet would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry

from gateway.devtools.natsproc import NatsProcess
from gateway.metrics import Metrics
from tests.operator.conftest import FAST, KEDA, MONITORING, NAMESPACE, Client, declare, eventually, running_operator
from tests.operator.emulator import GATEWAYS, ApiServer
from wsgateway_operator.builders import CONFIG_HASH_ANNOTATION

DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
PODS = "v1/pods"
SCALEDOBJECTS = "keda.sh/v1alpha1/scaledobjects"
SERVICEMONITORS = "monitoring.coreos.com/v1/servicemonitors"
PROMETHEUSRULES = "monitoring.coreos.com/v1/prometheusrules"


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


def events(api: ApiServer) -> list[dict[str, Any]]:
    return [api.get_object("v1/events", NAMESPACE, n) or {} for n in api.names("v1/events", NAMESPACE)]


def template(api: ApiServer, name: str) -> dict[str, Any]:
    return api.get_object(DEPLOYMENTS, NAMESPACE, name)["spec"]["template"]  # type: ignore[index,no-any-return]


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


async def stream_names(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return sorted(s.config.name for s in await nc.jetstream().streams_info())
    finally:
        await nc.close()


async def consumer_names(url: str, stream: str = "EVENTS") -> list[str]:
    nc = await nats.connect(url)
    try:
        return sorted(c.name for c in await nc.jetstream().consumers_info(stream))
    finally:
        await nc.close()


async def leave_pod_consumer(url: str) -> None:
    """The live consumer a gateway pod makes (gateway/core/bus.py), left behind by a pod that died."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def ignore(msg: Any) -> None:
        return None

    await js.subscribe("events.>", stream="EVENTS", cb=ignore, ordered_consumer=True, idle_heartbeat=2.0,
                       config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=30.0))
    await nc.close()


async def test_gateway_lifecycle(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    """create -> children, owners, status; reconcile twice changes nothing; update rolls the pods; drift is
    corrected; delete waits for the pods, cleans the pods' consumers, keeps the data (Retain)."""
    async with running_operator():
        created = await kubectl.create(GATEWAYS, gateway("gw", nats_server.url))
        uid = created["metadata"]["uid"]

        # --- create ---
        await eventually(lambda: is_condition(api, "gw", "NatsReady", "True", "StreamReady"), what="NatsReady")
        for resource, name in ((CONFIGMAPS, "gw-config"), (DEPLOYMENTS, "gw"), (SERVICES, "gw"), (PDBS, "gw"),
                               (HPAS, "gw")):
            child = api.get_object(resource, NAMESPACE, name)
            assert child is not None, resource
            (ref,) = child["metadata"]["ownerReferences"]
            assert ref == {"apiVersion": "wsgateway.dev/v1alpha1", "kind": "WebSocketGateway", "name": "gw",
                           "uid": uid, "controller": True, "blockOwnerDeletion": True}
            assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "gw"
        assert api.names(SCALEDOBJECTS, NAMESPACE) == [] and api.names(SERVICEMONITORS, NAMESPACE) == []
        assert await stream_names(nats_server.url) == ["EVENTS", "KV_wsgateway-acl"]
        status = api.get_object(GATEWAYS, NAMESPACE, "gw")["status"]  # type: ignore[index]
        assert status["observedGeneration"] == 1 and status["stream"] == "EVENTS"
        assert condition(api, "gw", "Ready")[:2] == ("False", "NoReadyPods")  # type: ignore[index]
        await eventually(lambda: any(
            e["reason"] == "Applied" and e["involvedObject"]["uid"] == uid and "created Deployment/gw" in e["message"]
            for e in events(api)), what="an Applied event")

        # --- the Deployment controller reports the pods ready ---
        await deployment_controller(api, kubectl, "gw", ready=2)
        await eventually(lambda: is_condition(api, "gw", "Ready", "True", "Serving"), what="Ready")
        assert is_condition(api, "gw", "Progressing", "False", "RolloutComplete")
        assert is_condition(api, "gw", "Degraded", "False", "AsExpected")

        # --- reconciling again changes nothing (two refresh periods: no writes at all) ---
        mark = len(list(api))
        await asyncio.sleep(2.5)
        refreshes = [r for r in list(api)[mark:] if r.method == "GET" and r.resource == DEPLOYMENTS]
        assert len(refreshes) >= 2  # the periodic reconcile ran (it reads the Deployment every time)
        assert api.writes(mark) == []
        status_writes = [r for r in list(api)[mark:] if r.resource == GATEWAYS and r.subresource == "status"]
        assert status_writes == []

        # --- update: new image and limits roll the pods ---
        before = template(api, "gw")
        await kubectl.patch(GATEWAYS, NAMESPACE, "gw", {"spec": {
            "image": "ghcr.io/wsgateway/wsgateway:0.2.0", "gateway": {"maxConnections": 1000}}})
        await eventually(lambda: template(api, "gw")["spec"]["containers"][0]["image"].endswith(":0.2.0"),
                         what="rolled image")
        after = template(api, "gw")
        assert after["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != \
            before["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        assert api.get_object(CONFIGMAPS, NAMESPACE, "gw-config")["data"]["WSGATEWAY_MAX_CONNECTIONS"] == "1000"  # type: ignore[index]
        await eventually(lambda: api.get_object(GATEWAYS, NAMESPACE, "gw")["status"]["observedGeneration"] == 2,
                         what="observedGeneration 2")
        await eventually(lambda: is_condition(api, "gw", "Progressing", "True", "RollingOut"), what="RollingOut")

        # --- drift: the Deployment deleted, the ConfigMap edited by hand ---
        await kubectl.delete(DEPLOYMENTS, NAMESPACE, "gw")
        await kubectl.patch(CONFIGMAPS, NAMESPACE, "gw-config", {"data": {"WSGATEWAY_MAX_CONNECTIONS": "5"}})
        await eventually(lambda: api.get_object(DEPLOYMENTS, NAMESPACE, "gw"), what="Deployment restored")
        assert template(api, "gw")["spec"]["containers"][0]["image"].endswith(":0.2.0")
        await eventually(lambda: api.get_object(CONFIGMAPS, NAMESPACE, "gw-config")["data"][
            "WSGATEWAY_MAX_CONNECTIONS"] == "1000", what="ConfigMap restored")

        # --- delete: a pod still runs, and a dead pod's consumer is on the stream ---
        await leave_pod_consumer(nats_server.url)
        assert len(await consumer_names(nats_server.url)) == 1
        await kubectl.create(PODS, fake_pod("gw-7d9c-abcde", "gw", 8080, ready=False))
        await kubectl.delete(GATEWAYS, NAMESPACE, "gw")
        await eventually(lambda: is_condition(api, "gw", "Ready", "False", "Terminating"), what="Terminating")
        assert "waiting for 1 gateway pod" in condition(api, "gw", "Ready")[2]  # type: ignore[index]
        assert api.get_object(DEPLOYMENTS, NAMESPACE, "gw") is None  # stopped first
        assert api.get_object(HPAS, NAMESPACE, "gw") is None  # ... and nothing scales it back
        assert len(await consumer_names(nats_server.url)) == 1  # not while pods could re-create it
        await kubectl.delete(PODS, NAMESPACE, "gw-7d9c-abcde")  # the kubelet: the pod drained and stopped
        await eventually(lambda: api.get_object(GATEWAYS, NAMESPACE, "gw") is None, what="gateway gone")
    assert await consumer_names(nats_server.url) == []
    assert await stream_names(nats_server.url) == ["EVENTS", "KV_wsgateway-acl"]  # Retain


async def test_nats_down_then_back(api: ApiServer, kubectl: Client) -> None:
    """NATS unreachable: NatsReady False with the reason, retries with backoff (no crash loop), the
    Kubernetes objects exist anyway; when NATS comes up, the stream and bucket appear and NatsReady
    turns True."""
    server = NatsProcess()  # its port is reserved in the spec; the server is not running yet
    try:
        async with running_operator() as runner:
            await kubectl.create(GATEWAYS, gateway("gw", server.url))
            await eventually(lambda: is_condition(api, "gw", "NatsReady", "False", "NatsUnreachable"),
                             what="NatsReady False")
            message = condition(api, "gw", "NatsReady")[2]  # type: ignore[index]
            assert server.url in message and "spec.nats.urls" in message
            assert is_condition(api, "gw", "Ready", "False", "NatsNotReady")
            assert api.get_object(DEPLOYMENTS, NAMESPACE, "gw") is not None
            await asyncio.sleep(1.5)  # a few retries
            server.start()
            await eventually(lambda: is_condition(api, "gw", "NatsReady", "True", "StreamReady"),
                             what="NatsReady True")
            assert await stream_names(server.url) == ["EVENTS", "KV_wsgateway-acl"]
            assert not runner.future.done()  # the operator kept running throughout
    finally:
        server.cleanup()
    assert "NatsReady=False (NatsUnreachable)" in runner.output
    assert "failed temporarily" in runner.output  # kopf.TemporaryError: retried with backoff


async def test_shared_stream_is_kept_and_delete_policy_removes_the_data(
    api: ApiServer, kubectl: Client, nats_server: NatsProcess
) -> None:
    """Two gateways on one stream: deleting one must not clean what the other uses. Deleting the last
    one (deletionPolicy Delete) removes the consumers, the stream and the ACL bucket."""
    async with running_operator() as runner:
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url, nats={
            "urls": [nats_server.url], "deletionPolicy": "Delete"}))
        await kubectl.create(GATEWAYS, gateway("gw2", nats_server.url))
        await eventually(lambda: is_condition(api, "gw", "NatsReady", "True")
                         and is_condition(api, "gw2", "NatsReady", "True"), what="NatsReady")
        await leave_pod_consumer(nats_server.url)
        await kubectl.delete(GATEWAYS, NAMESPACE, "gw2")
        await eventually(lambda: api.get_object(GATEWAYS, NAMESPACE, "gw2") is None, what="gw2 gone")
        assert len(await consumer_names(nats_server.url)) == 1  # gw still reads this stream
        await kubectl.delete(GATEWAYS, NAMESPACE, "gw")
        await eventually(lambda: api.get_object(GATEWAYS, NAMESPACE, "gw") is None, what="gw gone")
    assert await stream_names(nats_server.url) == []
    assert "stream EVENTS is also used by realtime/gw" in runner.output


async def test_resume_after_operator_restart(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    """What changed while the operator was down is fixed by the resume handler at start-up (not only by
    the periodic refresh, which is far away here)."""
    slow = FAST.model_copy(update={"resync_seconds": 600.0})
    async with running_operator(slow):
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url))
        await eventually(lambda: api.get_object(DEPLOYMENTS, NAMESPACE, "gw"), what="Deployment")
    await kubectl.delete(DEPLOYMENTS, NAMESPACE, "gw")
    async with running_operator(slow):
        await eventually(lambda: api.get_object(DEPLOYMENTS, NAMESPACE, "gw"), what="Deployment restored")


async def test_wsgateway_operator_command(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    """The real entry point: `wsgateway operator` as a process, namespaces from the environment."""
    env = {**os.environ, "WSGATEWAY_OPERATOR_NAMESPACES": NAMESPACE, "WSGATEWAY_OPERATOR_RESYNC_S": "1",
           "WSGATEWAY_OPERATOR_METRICS_PORT": "0"}  # metrics: test_operator_metrics.py
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "wsgateway"), "operator", "--standalone", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url))
        await eventually(lambda: is_condition(api, "gw", "NatsReady", "True"), timeout=30, what="NatsReady")
        assert api.get_object(DEPLOYMENTS, NAMESPACE, "gw") is not None
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, output.decode()[-2000:]


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


async def test_keda_and_monitoring(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    """With KEDA and the Prometheus Operator installed: a ScaledObject instead of the HPA, a ServiceMonitor
    and a PrometheusRule; switching the spec back replaces/removes them."""
    declare(api, {**KEDA, **MONITORING})
    async with running_operator():
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url, autoscaling={
            "mode": "keda", "prometheusAddress": "http://prometheus:9090"}))
        await eventually(lambda: api.get_object(SCALEDOBJECTS, NAMESPACE, "gw"), what="ScaledObject")
        await eventually(lambda: api.get_object(PROMETHEUSRULES, NAMESPACE, "gw"), what="PrometheusRule")
        assert api.get_object(SERVICEMONITORS, NAMESPACE, "gw") is not None
        assert api.get_object(HPAS, NAMESPACE, "gw") is None
        await kubectl.patch(GATEWAYS, NAMESPACE, "gw", {"spec": {
            "autoscaling": {"mode": "hpa", "prometheusAddress": None}, "observability": {"prometheusRule": False}}})
        await eventually(lambda: api.get_object(HPAS, NAMESPACE, "gw"), what="HPA")
        await eventually(lambda: api.get_object(SCALEDOBJECTS, NAMESPACE, "gw") is None, what="ScaledObject gone")
        await eventually(lambda: api.get_object(PROMETHEUSRULES, NAMESPACE, "gw") is None, what="rule gone")
        assert api.get_object(SERVICEMONITORS, NAMESPACE, "gw") is not None


async def test_problems_are_reported_not_hidden(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    """KEDA asked for but not installed, a foreign Service in the way, an invalid spec that reached the
    operator (e.g. an API server without CEL): each one is a condition with a message, nothing crashes,
    the foreign object is untouched."""
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gw2", "namespace": NAMESPACE},
               "spec": {"ports": [{"port": 1}]}}
    await kubectl.create(SERVICES, foreign)
    async with running_operator():
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url, autoscaling={
            "mode": "keda", "prometheusAddress": "http://prometheus:9090"}))
        await kubectl.create(GATEWAYS, gateway("gw2", nats_server.url))
        await kubectl.create(GATEWAYS, gateway("gw3", nats_server.url, replicas={"min": 5, "max": 2}))
        await eventually(lambda: is_condition(api, "gw", "Degraded", "True", "ChildrenNotApplied"), what="gw")
        assert "install KEDA" in condition(api, "gw", "Degraded")[2]  # type: ignore[index]
        await eventually(lambda: is_condition(api, "gw2", "Degraded", "True", "ChildrenNotApplied"), what="gw2")
        assert "Service realtime/gw2 exists but does not belong" in condition(api, "gw2", "Degraded")[2]  # type: ignore[index]
        assert api.get_object(SERVICES, NAMESPACE, "gw2")["spec"] == {"ports": [{"port": 1}]}  # type: ignore[index]
        await eventually(lambda: is_condition(api, "gw3", "Ready", "False", "InvalidSpec"), what="gw3")
        assert "replicas.min must be less than or equal to replicas.max" in condition(api, "gw3", "Ready")[2]  # type: ignore[index]
        assert api.get_object(DEPLOYMENTS, NAMESPACE, "gw3") is None
