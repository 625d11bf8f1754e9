"""The optional APIs (KEDA's ScaledObject, the Prometheus Operator's ServiceMonitor and PrometheusRule)
through a real kube-apiserver: the operator finds them by API discovery, creates its objects as the
chart's ServiceAccount (so the chart's `rbac.keda` and `rbac.prometheusOperator` rules are checked by the
server's RBAC authoriser), replaces and removes them when the spec changes, and the garbage collector
deletes them by their ownerReferences.

KEDA and the Prometheus Operator are not available offline, so their CRDs are stand-ins: the real group,
version, kind and plural with an open schema (`x-kubernetes-preserve-unknown-fields`); what the operator
sends is checked by tests/operator/test_builders.py, what the server does with it here. They live in a
control plane of their own (this module's): in the session's shared one they would change API discovery
for every other test (test_cluster_operator.py expects KEDA to be missing), and removing them afterwards
would change it again under that control plane's garbage collector and namespace controller.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.operator.kube import CHART, ControlPlane, Helm, Kube, k8s_bin_dir, operator_running, path
from tests.operator.test_cluster_operator import gateway, gw_path, owned, until, when_condition
from tests.support.wait import eventually, eventually_sync

# (group, version, plural, kind) as KEDA and the Prometheus Operator serve them
STAND_INS = (
    ("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject"),
    ("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor"),
    ("monitoring.coreos.com", "v1", "prometheusrules", "PrometheusRule"),
)
OUR_CRDS = ("websocketgateways.wsgateway.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")
SCALED_OBJECTS, SERVICE_MONITORS, PROMETHEUS_RULES = (f"{g}/{v}" for g, v, _, _ in STAND_INS)
HPA = "autoscaling/v2"


def stand_in_crd(group: str, version: str, plural: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
                 "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    }


def _established(cp: ControlPlane, names: tuple[str, ...]) -> bool:
    with cp.sync_client() as http:
        for name in names:
            r = http.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = r.json().get("status", {}).get("conditions", []) if r.status_code == 200 else []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, Helm]]:
    """etcd and kube-apiserver; the chart's CRDs (helm install) and the stand-ins; then the
    controller-manager, whose garbage collector thus knows all of them from its start."""
    workdir = tmp_path_factory.mktemp("k8s-optional-apis")
    cp = ControlPlane(k8s_bin_dir(), workdir).start(controller_manager=False)
    try:
        helm = Helm(cp.bin_dir / "helm", workdir / "helm", cp.admin_kubeconfig)
        helm.run("install", "wsgateway-operator", str(CHART), "-n", "wsgateway-system", "--create-namespace",
                 check=True)
        with cp.sync_client() as http:
            for crd in STAND_INS:
                r = http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=stand_in_crd(*crd))
                assert r.status_code == 201, r.text
        names = OUR_CRDS + tuple(f"{plural}.{group}" for group, _, plural, _ in STAND_INS)
        eventually_sync(lambda: _established(cp, names), what="the CRDs established")
        cp.start_controller_manager()
        yield cp, helm
    finally:
        cp.stop()


@pytest.fixture
async def admin(plane: tuple[ControlPlane, Helm]) -> AsyncIterator[Kube]:
    async with plane[0].admin() as client:
        yield client


async def test_keda_and_prometheus_operator_objects(plane: tuple[ControlPlane, Helm], admin: Kube,
                                                    nats_server: NatsProcess, tmp_path: Path) -> None:
    cp, helm = plane
    ns = "realtime"
    await admin.create(path("v1", "namespaces"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    release = "op"
    account = f"{release}-wsgateway-operator"
    user = f"system:serviceaccount:{ns}:{account}"
    await asyncio.to_thread(helm.run, "install", release, str(CHART), "-n", ns, check=True)  # default rbac.*
    for group, _, plural, _ in STAND_INS:
        await admin.until_allowed(user, "create", plural, ns, group)
    await admin.until_allowed(user, "watch", "websocketgateways", ns, "wsgateway.dev")
    kubeconfig = cp.token_kubeconfig(await admin.token(ns, account), tmp_path / "operator.kubeconfig")

    async with operator_running(kubeconfig, ns, tmp_path / "operator.log") as op:
        created = await admin.create(gw_path(ns), gateway(ns, "gw", nats_server.url, autoscaling={
            "mode": "keda", "prometheusAddress": "http://prometheus.monitoring:9090"}))
        uid = created["metadata"]["uid"]
        await when_condition(admin, ns, "gw", "NatsReady", "True")
        await when_condition(admin, ns, "gw", "Degraded", "False")  # every child applied, none refused

        # --- KEDA instead of the HPA; the monitoring objects; all owned by the gateway ---
        for api_version, plural in ((SCALED_OBJECTS, "scaledobjects"), (SERVICE_MONITORS, "servicemonitors"),
                                    (PROMETHEUS_RULES, "prometheusrules")):
            (child,) = await eventually(functools.partial(owned, admin, api_version, plural, ns, uid), what=plural)
            assert child["metadata"]["name"] == "gw"
            assert [(r["kind"], r["controller"]) for r in child["metadata"]["ownerReferences"]] == [
                ("WebSocketGateway", True)]
        scaled = await admin.get(path(SCALED_OBJECTS, "scaledobjects", ns, "gw"))
        assert scaled is not None
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
        assert scaled["spec"]["scaleTargetRef"]["name"] == "gw"
        assert await admin.get(path(HPA, "horizontalpodautoscalers", ns, "gw")) is None

        # --- back to the HPA, no alert rules: replaced and removed ---
        await admin.patch(gw_path(ns, "gw"), {"spec": {"autoscaling": {"mode": "hpa", "prometheusAddress": None},
                                                       "observability": {"prometheusRule": False}}})
        await until(lambda: admin.get(path(HPA, "horizontalpodautoscalers", ns, "gw")), what="the HPA")
        for api_version, plural in ((SCALED_OBJECTS, "scaledobjects"), (PROMETHEUS_RULES, "prometheusrules")):
            await eventually(functools.partial(_gone, admin, path(api_version, plural, ns, "gw")),
                             what=f"{plural} removed")
        assert await admin.get(path(SERVICE_MONITORS, "servicemonitors", ns, "gw")) is not None
        await when_condition(admin, ns, "gw", "Degraded", "False")

        # --- deletion: the garbage collector deletes the ServiceMonitor by its ownerReference ---
        await admin.delete(gw_path(ns, "gw"))
        await eventually(lambda: _gone(admin, gw_path(ns, "gw")), what="the gateway gone")
        await eventually(lambda: _gone(admin, path(SERVICE_MONITORS, "servicemonitors", ns, "gw")),
                         what="the ServiceMonitor deleted by the garbage collector")
        assert op.running
    assert "Traceback" not in op.output(), op.output()[-6000:]


async def _gone(admin: Kube, url: str) -> bool:
    return await admin.get(url) is None
