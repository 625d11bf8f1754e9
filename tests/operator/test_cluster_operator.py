"""The real operator process (`wsgateway operator`) against the real control plane (tests/operator/kube.py)
and real nats-servers, logged in as the chart's ServiceAccount (a TokenRequest token): every call it makes
is authorised by the server's RBAC against the chart's Role, never as admin.

What a cluster does here for real: the API server defaults and validates the resources, keeps the status
in its subresource and counts generations; the Deployment controller makes ReplicaSets, the ReplicaSet
controller makes pods (which stay Pending: no kubelet, no scheduler), the garbage collector deletes
children by their ownerReferences. Tests wait for conditions by polling the API, never for time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import nats
from aiohttp import web
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from gateway.devtools.natsproc import NatsProcess
from tests.operator.conftest import OperatorRbac
from tests.operator.kube import ControlPlane, Kube, OperatorProcess, operator_running, path
from tests.support.ports import free_port
from tests.support.wait import eventually
from wsgateway_operator.builders import CONFIG_HASH_ANNOTATION
from wsgateway_operator.controller import Controller, OperatorConfig
from wsgateway_operator.kube import KubeClient

GW = "wsgateway.dev/v1alpha1"
CHILDREN = (("v1", "configmaps", "{}-config"), ("apps/v1", "deployments", "{}"), ("v1", "services", "{}"),
            ("policy/v1", "poddisruptionbudgets", "{}"), ("autoscaling/v2", "horizontalpodautoscalers", "{}"))
T = TypeVar("T")
HOLD = "test.wsgateway.dev/hold"  # a finalizer the test puts on a pod, as a draining kubelet would hold it


def gateway(namespace: str, name: str, nats_url: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": GW, "kind": "WebSocketGateway", "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": "ghcr.io/wsgateway/wsgateway:0.1.0", "nats": {"urls": [nats_url]},
                     "auth": {"issuer": "https://login.example.com/realms/platform"}, **spec}}


def gw_path(namespace: str, name: str | None = None) -> str:
    return path(GW, "websocketgateways", namespace, name)


def child_path(namespace: str, api_version: str, plural: str, name: str) -> str:
    return path(api_version, plural, namespace, name)


async def until(check: Callable[[], Awaitable[T | None]], *, what: str) -> T:
    """`eventually` for a check that returns the awaited object, or None while it is not there yet."""
    value = await eventually(check, what=what)
    assert value is not None
    return value


def condition(gw: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = ((gw or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


async def when_condition(admin: Kube, namespace: str, name: str, type_: str, status: str,
                         reason: str | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the gateway's condition is so; returns the gateway."""
    async def check() -> dict[str, Any] | None:
        gw = await admin.get(gw_path(namespace, name))
        c = condition(gw, type_)
        return gw if c.get("status") == status and (reason is None or c.get("reason") == reason) else None

    gw: dict[str, Any] | None = await eventually(check, timeout=timeout,
                                                 what=f"{namespace}/{name} {type_}={status} {reason or ''}")
    assert gw is not None
    return gw


async def events_of(admin: Kube, namespace: str, uid: str) -> list[dict[str, Any]]:
    return [e for e in await admin.items(path("v1", "events", namespace)) if e["involvedObject"].get("uid") == uid]


async def owned(admin: Kube, api_version: str, plural: str, namespace: str, owner_uid: str) -> list[dict[str, Any]]:
    return [o for o in await admin.items(path(api_version, plural, namespace))
            if any(r["uid"] == owner_uid for r in o["metadata"].get("ownerReferences") or [])]


async def stream_names(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return sorted(s.config.name or "" for s in await nc.jetstream().streams_info())
    finally:
        await nc.close()


async def consumer_count(url: str, stream: str = "EVENTS") -> int:
    nc = await nats.connect(url)
    try:
        return len(await nc.jetstream().consumers_info(stream))
    finally:
        await nc.close()


async def leave_pod_consumer(url: str, prefix: str = "events", stream: str = "EVENTS") -> None:
    """The live consumer a gateway pod makes (gateway/core/bus.py), left behind by a pod that died."""
    nc = await nats.connect(url)

    async def ignore(msg: Any) -> None:
        return None

    await nc.jetstream().subscribe(f"{prefix}.>", stream=stream, cb=ignore, ordered_consumer=True,
                                   idle_heartbeat=2.0,
                                   config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=30.0))
    await nc.close()


async def refreshes(op: OperatorProcess) -> float:
    """How many periodic reconciles the operator counted (its own /metrics)."""
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        text = (await http.get(f"http://127.0.0.1:{op.metrics_port}/metrics")).text
    return sum(float(s.value) for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "wsgateway_operator_reconciles_total" and s.labels.get("trigger") == "refresh")


def log_of(op: OperatorProcess) -> str:
    return op.output()[-6000:]


# ------------------------------------------------------------------------------------- reconcile


async def test_reconcile_rollout_drift_restart_and_deletion(
    admin: Kube, operator_rbac: OperatorRbac, nats_server: NatsProcess, tmp_path: Path
) -> None:
    ns = operator_rbac.namespace
    log = tmp_path / "operator.log"
    async with operator_running(operator_rbac.kubeconfig, ns, log) as op:
        created = await admin.create(gw_path(ns), gateway(ns, "gw", nats_server.url))
        uid = created["metadata"]["uid"]

        # --- children with ownerReferences, the status through its subresource ---
        gw = await when_condition(admin, ns, "gw", "NatsReady", "True", "StreamReady")
        for api_version, plural, name in CHILDREN:
            child = await admin.get(child_path(ns, api_version, plural, name.format("gw")))
            assert child is not None, (plural, log_of(op))
            assert child["metadata"]["ownerReferences"] == [{
                "apiVersion": GW, "kind": "WebSocketGateway", "name": "gw", "uid": uid, "controller": True,
                "blockOwnerDeletion": True}]
            assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "gw"
        status = gw["status"]
        assert status["observedGeneration"] == gw["metadata"]["generation"] == 1
        assert status["stream"] == "EVENTS" and status["aclBucket"] == "wsgateway-acl"
        assert sorted(c["type"] for c in status["conditions"]) == ["Degraded", "NatsReady", "Progressing", "Ready"]
        assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] for c in status["conditions"])
        status_writers = {m["manager"] for m in gw["metadata"]["managedFields"] if m.get("subresource") == "status"}
        assert status_writers, "the status was not written through the status subresource"
        assert await stream_names(nats_server.url) == ["EVENTS", "KV_wsgateway-acl", "KV_wsgateway-presence"]

        # --- the controller-manager: a ReplicaSet for the Deployment, its pods Pending (no kubelet) ---
        deployment = await admin.get(child_path(ns, "apps/v1", "deployments", "gw"))
        assert deployment is not None
        deployment_uid = deployment["metadata"]["uid"]
        (rs,) = await eventually(lambda: owned(admin, "apps/v1", "replicasets", ns, deployment_uid),
                                 what="the Deployment's ReplicaSet")
        pods = await until(lambda: _count(owned(admin, "v1", "pods", ns, rs["metadata"]["uid"]), 2),
                           what="two pods of the ReplicaSet")
        assert all(p["status"]["phase"] == "Pending" and not p["spec"].get("nodeName") for p in pods)
        # ... and the status says so instead of pretending the rollout is complete.
        gw = await when_condition(admin, ns, "gw", "Progressing", "True", "WaitingForPods")
        assert "2 Pending (2 not scheduled to a node" in condition(gw, "Progressing")["message"]
        gw = await when_condition(admin, ns, "gw", "Ready", "False", "NoReadyPods")
        assert "0 of 2 pods are ready; 2 Pending" in condition(gw, "Ready")["message"]
        assert gw["status"]["replicas"] == 2 and gw["status"]["readyReplicas"] == 0
        # kopf posts Events in the background, and a list returns them by name (generated, not in order).
        await eventually(lambda: _applied(admin, ns, uid, "created Deployment/gw"), what="the Applied Event")

        # --- a reconcile that finds nothing to do writes nothing ---
        quiet = {plural: (await admin.get(child_path(ns, v, plural, n.format("gw"))) or {})["metadata"][
            "resourceVersion"] for v, plural, n in CHILDREN if plural != "deployments"}
        gw_version = (await admin.get(gw_path(ns, "gw")) or {})["metadata"]["resourceVersion"]
        start = await refreshes(op)
        await eventually(lambda: _at_least(refreshes(op), start + 2), what="two periodic reconciles")
        for v, plural, n in CHILDREN:
            if plural in quiet:
                assert (await admin.get(child_path(ns, v, plural, n.format("gw"))) or {})["metadata"][
                    "resourceVersion"] == quiet[plural], plural
        assert (await admin.get(gw_path(ns, "gw")) or {})["metadata"]["resourceVersion"] == gw_version

        # --- a spec change rolls out: new template, new ReplicaSet from the Deployment controller ---
        before = deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        await admin.patch(gw_path(ns, "gw"), {"spec": {"image": "ghcr.io/wsgateway/wsgateway:0.2.0",
                                                       "gateway": {"maxConnections": 1000}}})
        deployment = await until(lambda: _image_is(admin, ns, "gw", ":0.2.0"), what="the new image")
        deployment_uid = deployment["metadata"]["uid"]
        assert deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != before
        config = await admin.get(child_path(ns, "v1", "configmaps", "gw-config"))
        assert config is not None and config["data"]["WSGATEWAY_MAX_CONNECTIONS"] == "1000"
        replicasets: list[dict[str, Any]] = await until(
            lambda: _count(owned(admin, "apps/v1", "replicasets", ns, deployment_uid), 2), what="a second ReplicaSet")
        new = next(r for r in replicasets if r["metadata"]["uid"] != rs["metadata"]["uid"])
        assert new["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")
        gw = await when_condition(admin, ns, "gw", "Progressing", "True", "RollingOut")
        assert gw["status"]["observedGeneration"] == gw["metadata"]["generation"] == 2

        # --- drift: the Deployment deleted, the ConfigMap edited by hand ---
        old_uid = deployment_uid
        await admin.delete(child_path(ns, "apps/v1", "deployments", "gw"))
        await admin.patch(child_path(ns, "v1", "configmaps", "gw-config"), {"data": {"WSGATEWAY_MAX_CONNECTIONS": "5"}})
        restored: dict[str, Any] = await until(lambda: _recreated(admin, ns, old_uid), what="the Deployment re-created")
        assert restored["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")
        await eventually(lambda: _data_is(admin, ns, "gw-config", "WSGATEWAY_MAX_CONNECTIONS", "1000"),
                         what="the ConfigMap restored")
        for fix in ("re-created Deployment/gw", "restored ConfigMap/gw-config"):
            await eventually(functools.partial(warned, admin, ns, uid, "DriftCorrected", fix),
                             what=f"a DriftCorrected Event: {fix}")
        # The garbage collector removed the old Deployment's ReplicaSets (their owner is gone).
        await eventually(lambda: _none(owned(admin, "apps/v1", "replicasets", ns, old_uid)),
                         what="the old ReplicaSets gone")
    assert op.proc is not None and op.proc.returncode == 0, log_of(op)

    # --- what changes while the operator is down is fixed when it starts (resume, not the timer) ---
    deployment_uid = restored["metadata"]["uid"]
    await admin.delete(child_path(ns, "v1", "services", "gw"))
    await admin.patch(gw_path(ns, "gw"), {"spec": {"service": {"port": 8080}}})
    async with operator_running(operator_rbac.kubeconfig, ns, log, resync=600.0) as op:
        service: dict[str, Any] = await until(lambda: admin.get(child_path(ns, "v1", "services", "gw")),
                                              what="the Service back")
        assert service["spec"]["ports"][0]["port"] == 8080
        await until(lambda: _observed(admin, ns, "gw", 3), what="observedGeneration 3")
        assert (await admin.get(child_path(ns, "apps/v1", "deployments", "gw")) or {})["metadata"]["uid"] == \
            deployment_uid  # picked up, not re-created

        # --- deletion (Retain): the finalizer waits for the pods, cleans their consumers, keeps the data;
        # then the garbage collector deletes the remaining children by their ownerReferences ---
        await leave_pod_consumer(nats_server.url)
        assert await consumer_count(nats_server.url) == 1
        pods = await owned_pods(admin, ns, deployment_uid)
        held = pods[0]["metadata"]["name"]
        await admin.patch(child_path(ns, "v1", "pods", held), {"metadata": {"finalizers": [HOLD]}})
        await admin.delete(gw_path(ns, "gw"))
        await when_condition(admin, ns, "gw", "Ready", "False", "Terminating")

        async def waiting_for_the_held_pod() -> bool:  # the other pod goes at once (no node ran it)
            ready = condition(await admin.get(gw_path(ns, "gw")), "Ready")
            return "waiting for 1 gateway pod" in ready.get("message", "")

        await eventually(waiting_for_the_held_pod, what="the finalizer waiting for the held pod")
        assert await admin.get(child_path(ns, "apps/v1", "deployments", "gw")) is None  # stopped first
        assert await admin.get(child_path(ns, "autoscaling/v2", "horizontalpodautoscalers", "gw")) is None
        assert await consumer_count(nats_server.url) == 1  # not while a pod could re-create it
        await admin.patch(child_path(ns, "v1", "pods", held), {"metadata": {"finalizers": None}})  # it drained
        await eventually(lambda: _gone(admin, gw_path(ns, "gw")), what="the gateway gone")
        for api_version, plural, name in CHILDREN:
            url = child_path(ns, api_version, plural, name.format("gw"))
            await eventually(functools.partial(_gone, admin, url), what=f"{url} deleted by the garbage collector")
        # kopf posts the finalizer's Events in the background: they may land after the gateway is gone.
        await eventually(functools.partial(deletion_events, admin, ns, uid, {
            "deleted 1 gateway consumer(s) on stream EVENTS",
            "kept stream EVENTS and ACL bucket wsgateway-acl (deletionPolicy Retain)"}), what="the Deleting events")
    assert await consumer_count(nats_server.url) == 0
    assert await stream_names(nats_server.url) == ["EVENTS", "KV_wsgateway-acl", "KV_wsgateway-presence"]  # Retain


async def _applied(admin: Kube, namespace: str, uid: str, text: str) -> bool:
    return any(e["reason"] == "Applied" and text in e["message"] for e in await events_of(admin, namespace, uid))


async def warned(admin: Kube, namespace: str, uid: str, reason: str, text: str) -> bool:
    """Whether the gateway got a Warning Event with this reason whose message mentions `text`."""
    return any(e["type"] == "Warning" and e["reason"] == reason and text in e["message"]
               for e in await events_of(admin, namespace, uid))


async def deletion_events(admin: Kube, namespace: str, uid: str, expected: set[str]) -> bool:
    """Whether the gateway's `Deleting` Events include every message in `expected`."""
    return expected <= {e["message"] for e in await events_of(admin, namespace, uid) if e["reason"] == "Deleting"}


async def owned_pods(admin: Kube, namespace: str, deployment_uid: str) -> list[dict[str, Any]]:
    async def pods() -> list[dict[str, Any]]:
        out = []
        for rs in await owned(admin, "apps/v1", "replicasets", namespace, deployment_uid):
            out += await owned(admin, "v1", "pods", namespace, rs["metadata"]["uid"])
        return out

    return await eventually(pods, what="the Deployment's pods")


async def _count(items: Awaitable[list[dict[str, Any]]], n: int) -> list[dict[str, Any]] | None:
    got = await items
    return got if len(got) == n else None


async def _at_least(value: Awaitable[float], n: float) -> bool:
    return bool(await value >= n)


async def _none(items: Awaitable[list[dict[str, Any]]]) -> bool:
    return not await items


async def _gone(admin: Kube, url: str) -> bool:
    return await admin.get(url) is None


async def _image_is(admin: Kube, namespace: str, name: str, suffix: str) -> dict[str, Any] | None:
    d = await admin.get(child_path(namespace, "apps/v1", "deployments", name))
    return d if d and d["spec"]["template"]["spec"]["containers"][0]["image"].endswith(suffix) else None


async def _recreated(admin: Kube, namespace: str, old_uid: str) -> dict[str, Any] | None:
    d = await admin.get(child_path(namespace, "apps/v1", "deployments", "gw"))
    return d if d and d["metadata"]["uid"] != old_uid else None


async def _data_is(admin: Kube, namespace: str, name: str, key: str, value: str) -> bool:
    cm = await admin.get(child_path(namespace, "v1", "configmaps", name))
    return bool(cm and cm["data"].get(key) == value)


async def _observed(admin: Kube, namespace: str, name: str, generation: int) -> dict[str, Any] | None:
    gw = await admin.get(gw_path(namespace, name))
    return gw if gw and gw.get("status", {}).get("observedGeneration") == generation else None


# -------------------------------------------------------------------------------------- deletion


async def test_delete_policy_and_shared_streams(admin: Kube, operator_rbac: OperatorRbac, tmp_path: Path) -> None:
    """Two gateways on one stream: deleting one leaves what the other uses. Deleting the last one
    (deletionPolicy Delete) removes the consumers, the stream and the ACL bucket, then the garbage
    collector its children."""
    ns = operator_rbac.namespace
    with NatsProcess() as server:
        async with operator_running(operator_rbac.kubeconfig, ns, tmp_path / "operator.log") as op:
            doomed = await admin.create(gw_path(ns), gateway(ns, "gw", server.url, nats={
                "urls": [server.url], "deletionPolicy": "Delete"}))
            await admin.create(gw_path(ns), gateway(ns, "gw2", server.url))
            await when_condition(admin, ns, "gw", "NatsReady", "True")
            await when_condition(admin, ns, "gw2", "NatsReady", "True")
            await leave_pod_consumer(server.url)
            await admin.delete(gw_path(ns, "gw2"))
            await eventually(lambda: _gone(admin, gw_path(ns, "gw2")), what="gw2 gone")
            assert await consumer_count(server.url) == 1  # gw still reads this stream
            assert f"stream EVENTS is also used by {ns}/gw" in op.output()
            await admin.delete(gw_path(ns, "gw"))
            await eventually(lambda: _gone(admin, gw_path(ns, "gw")), what="gw gone")
            await eventually(lambda: _gone(admin, child_path(ns, "v1", "configmaps", "gw-config")),
                             what="the garbage collector deleting gw's ConfigMap")
            await eventually(functools.partial(deletion_events, admin, ns, doomed["metadata"]["uid"], {
                "deleted bucket wsgateway-acl, bucket wsgateway-presence, stream EVENTS"}), what="the Deleting event")
        assert await stream_names(server.url) == []


# ---------------------------------------------------------------------- problems, not crash loops


async def test_forbidden_calls_and_other_problems_are_reported(
    admin: Kube, operator_rbac: OperatorRbac, nats_server: NatsProcess, tmp_path: Path
) -> None:
    """One RBAC rule removed from the chart's Role: the server refuses the operator's calls (403), the
    gateway says so in a condition and an Event, the operator keeps running and heals when the rule is
    back. Also: KEDA asked for but not installed, and a foreign Service in the way."""
    ns = operator_rbac.namespace
    role_url = path("rbac.authorization.k8s.io/v1", "roles", ns, operator_rbac.role)
    role = await admin.get(role_url)
    assert role is not None
    rules = role["rules"]
    without_pdb = [r for r in rules if "poddisruptionbudgets" not in r["resources"]]
    assert len(without_pdb) == len(rules) - 1
    await admin.patch(role_url, {"rules": without_pdb})
    user = f"system:serviceaccount:{ns}:{operator_rbac.service_account}"
    # The authoriser sees the changed Role through its informers: wait until it refuses, or the operator
    # could still be allowed its first PodDisruptionBudget.
    await admin.until_allowed(user, "get", "poddisruptionbudgets", ns, "policy", allowed=False)
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gw2", "namespace": ns},
               "spec": {"ports": [{"port": 1}]}}
    await admin.create(path("v1", "services", ns), foreign)
    async with operator_running(operator_rbac.kubeconfig, ns, tmp_path / "operator.log") as op:
        created = await admin.create(gw_path(ns), gateway(ns, "gw", nats_server.url))
        gw = await when_condition(admin, ns, "gw", "Degraded", "True", "ChildrenNotApplied")
        message = condition(gw, "Degraded")["message"]
        assert "Forbidden" in message and f'User "{user}" cannot get resource "poddisruptionbudgets"' in message
        for api_version, plural, name in CHILDREN:  # everything else is in place
            if plural != "poddisruptionbudgets":
                assert await admin.get(child_path(ns, api_version, plural, name.format("gw"))) is not None, plural

        async def forbidden_event() -> list[dict[str, Any]]:
            return [e for e in await events_of(admin, ns, created["metadata"]["uid"])
                    if e["type"] == "Warning" and e["reason"] == "ChildrenNotApplied"]

        (event, *_) = await eventually(forbidden_event, what="a Warning Event about the refused call")
        assert f'User "{user}" cannot get resource "poddisruptionbudgets"' in event["message"]

        await admin.create(gw_path(ns), gateway(ns, "gw2", nats_server.url))
        await admin.create(gw_path(ns), gateway(ns, "gw3", nats_server.url, autoscaling={
            "mode": "keda", "prometheusAddress": "http://prometheus:9090"}))
        gw2 = await when_condition(admin, ns, "gw2", "Degraded", "True", "ChildrenNotApplied")
        assert f"Service {ns}/gw2 exists but does not belong" in condition(gw2, "Degraded")["message"]
        gw3 = await when_condition(admin, ns, "gw3", "Degraded", "True", "ChildrenNotApplied")
        assert "install KEDA" in condition(gw3, "Degraded")["message"]
        assert (await admin.get(child_path(ns, "v1", "services", "gw2")) or {})["spec"]["ports"][0]["port"] == 1
        assert op.running, log_of(op)

        await admin.patch(role_url, {"rules": rules})  # the admin restores the rule
        await eventually(lambda: admin.get(child_path(ns, "policy/v1", "poddisruptionbudgets", "gw")),
                         what="the PodDisruptionBudget once allowed")
        gw = await when_condition(admin, ns, "gw", "Degraded", "False")
        assert op.running, log_of(op)
    assert op.proc is not None and op.proc.returncode == 0, log_of(op)
    assert "Traceback" not in op.output(), log_of(op)


async def test_nats_unreachable_then_back(admin: Kube, operator_rbac: OperatorRbac, tmp_path: Path) -> None:
    """NATS down: NatsReady False with the reason, retried with backoff (no crash loop), the Kubernetes
    objects exist anyway; when NATS comes up, the stream and bucket appear and NatsReady turns True."""
    ns = operator_rbac.namespace
    server = NatsProcess()  # its port is in the spec; the server is not running yet
    try:
        async with operator_running(operator_rbac.kubeconfig, ns, tmp_path / "operator.log") as op:
            await admin.create(gw_path(ns), gateway(ns, "gw", server.url))
            gw = await when_condition(admin, ns, "gw", "NatsReady", "False", "NatsUnreachable")
            assert server.url in condition(gw, "NatsReady")["message"]
            await eventually(functools.partial(warned, admin, ns, gw["metadata"]["uid"], "NatsUnreachable", server.url),
                             what="a NatsUnreachable Warning Event")
            assert condition(gw, "Ready")["reason"] == "NatsNotReady"
            assert await admin.get(child_path(ns, "apps/v1", "deployments", "gw")) is not None
            await eventually(lambda: op.output().count("failed temporarily") >= 2, what="two retries")
            server.start()
            await when_condition(admin, ns, "gw", "NatsReady", "True", "StreamReady")
            assert await stream_names(server.url) == ["EVENTS", "KV_wsgateway-acl", "KV_wsgateway-presence"]
            assert op.running
        assert "NatsReady=False (NatsUnreachable)" in op.output()
    finally:
        server.cleanup()


# --------------------------------------------------------------------------------- 409 Conflict


@contextlib.asynccontextmanager
async def racing_writer(cp: ControlPlane, admin: Kube, rbac: OperatorRbac) -> AsyncIterator[list[str]]:
    """A second writer that wins a race against the operator, made deterministic with a real admission
    webhook: when the operator creates a ConfigMap, the webhook first creates the very same object
    itself (as another operator instance would, e.g. during a hand-over) and then lets the operator's
    request through, so the API server answers the operator 409 AlreadyExists. Yields the names of the
    objects it created."""
    created: list[str] = []
    probes: list[str] = []
    cert, key = cp.pki.issue("webhook", "webhook", server=True, ips=("127.0.0.1",))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(cert), str(key))

    async def review(request: web.Request) -> web.Response:
        req = (await request.json())["request"]
        obj = req["object"]
        if req.get("dryRun"):
            probes.append(obj["metadata"]["name"])
        elif not created:
            twin = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "data")}
            twin["metadata"] = {k: v for k, v in obj["metadata"].items()
                                if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
            await admin.create(path("v1", "configmaps", rbac.namespace), twin)
            created.append(obj["metadata"]["name"])
        return web.json_response({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                  "response": {"uid": req["uid"], "allowed": True}})

    app = web.Application()
    app.router.add_post("/race", review)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    name = f"race-{rbac.namespace}"
    user = f"system:serviceaccount:{rbac.namespace}:{rbac.service_account}"
    config_url = path("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", name=name)
    await admin.create(path("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations"), {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "race.test.wsgateway.dev", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": f"https://127.0.0.1:{port}/race",
                             "caBundle": base64.b64encode(cp.pki.ca_pem).decode()},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["configmaps"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": rbac.namespace}},
            "matchConditions": [{"name": "the-operator-only", "expression": f"request.userInfo.username == '{user}'"}],
        }],
    })
    try:
        # The API server picks the configuration up asynchronously: probe (a dry run as the operator's
        # ServiceAccount) until the webhook is called.
        async with cp.as_token(rbac.token) as operator_client:
            probe = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "probe", "namespace": rbac.namespace}}

            async def webhook_called() -> bool:
                await operator_client.call("POST", path("v1", "configmaps", rbac.namespace), body=probe,
                                           params={"dryRun": "All"})
                return bool(probes)

            await eventually(webhook_called, what="the webhook to be active")
        yield created
    finally:
        await admin.delete(config_url)
        await runner.cleanup()


async def test_conflict_is_retried(admin: Kube, operator_rbac: OperatorRbac, nats_server: NatsProcess,
                                   control_plane: ControlPlane, tmp_path: Path) -> None:
    """The operator's create answered 409 (AlreadyExists) because another writer got there first: the
    operator says so, retries, finds the object is its own (same controller reference) and carries on
    with it instead of failing or replacing it."""
    ns = operator_rbac.namespace
    async with racing_writer(control_plane, admin, operator_rbac) as raced, \
            operator_running(operator_rbac.kubeconfig, ns, tmp_path / "operator.log") as op:
        created = await admin.create(gw_path(ns), gateway(ns, "gw", nats_server.url))
        await eventually(lambda: raced == ["gw-config"], what="the race")
        twin = await admin.get(child_path(ns, "v1", "configmaps", "gw-config"))
        assert twin is not None

        async def conflict_event() -> list[dict[str, Any]]:
            return [e for e in await events_of(admin, ns, created["metadata"]["uid"])
                    if "AlreadyExists" in e["message"]]

        (event, *_) = await eventually(conflict_event, what="an Event about the 409")
        assert (event["type"], event["reason"]) == ("Warning", "ChildrenNotApplied")
        assert 'configmaps "gw-config" already exists' in event["message"]
        gw = await when_condition(admin, ns, "gw", "Degraded", "False")
        assert condition(gw, "NatsReady")["status"] == "True"
        kept = await admin.get(child_path(ns, "v1", "configmaps", "gw-config"))
        assert kept is not None and kept["metadata"]["uid"] == twin["metadata"]["uid"]  # taken as it is
        for api_version, plural, name in CHILDREN:
            assert await admin.get(child_path(ns, api_version, plural, name.format("gw"))) is not None, plural
        assert 'AlreadyExists: configmaps "gw-config" already exists' in op.output()
        assert op.running
    assert raced == ["gw-config"]


# ------------------------------------------------------------------------------------- stopping


@dataclass(frozen=True)
class TokenLogin:
    """What the operator's client takes from kopf's login: the server, a bearer token, the server's CA."""

    server: str
    token: str
    tls: ssl.SSLContext

    def as_http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def as_ssl_context(self) -> ssl.SSLContext:
        return self.tls


async def test_stopping_lets_a_running_reconcile_finish(
    admin: Kube, operator_rbac: OperatorRbac, nats_server: NatsProcess, control_plane: ControlPlane
) -> None:
    """kopf runs the operator's cleanup while a timer's reconcile may still be running (seen in CI: the
    client closed under it, a RuntimeError traceback at every such stop). Stopping waits for the
    running pass, then no pass starts any more."""
    ns = operator_rbac.namespace
    created = await admin.create(gw_path(ns), gateway(ns, "gw", nats_server.url))
    meta = created["metadata"]
    ctrl = Controller(OperatorConfig(nats_timeout=5.0, scrape_timeout=0.5))
    ctrl.kube = KubeClient(TokenLogin(control_plane.server, operator_rbac.token, control_plane.ssl_context()))
    args = {"name": "gw", "namespace": ns, "uid": meta["uid"], "generation": meta["generation"],
            "spec": created["spec"], "status": None}
    running = asyncio.create_task(ctrl.reconcile(**args, trigger="refresh"))
    # Polled at every turn of the loop: the task takes its lock at its first step and then holds it
    # across many API calls, so this sees it in the middle of its pass, however fast the machine.
    await eventually(lambda: ctrl._lock(meta["uid"]).locked(), what="the reconcile holding its lock", interval=0)
    await ctrl.close()
    assert running.done()  # close() waited for it
    result = running.result()  # and it ran to its end with the client open
    assert result is not None and not result.applied.errors and result.nats_problem is None, result
    assert await admin.get(child_path(ns, "apps/v1", "deployments", "gw")) is not None
    assert ctrl.kube is None
    assert await ctrl.reconcile(**args, trigger="refresh") is None  # a late timer tick: nothing
    step = await ctrl.finalize(name="gw", namespace=ns, uid=meta["uid"], spec=created["spec"], annotations={},
                               stream_shared_with=[])
    assert step.pending and "stopping" in step.pending and not step.done
