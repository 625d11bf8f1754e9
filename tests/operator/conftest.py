"""Fixtures for the operator tests.

A real control plane (tests/operator/kube.py), one per session: `api_server` (etcd, kube-apiserver),
`helm_cli` (the helm built with them), `control_plane` (the chart installed once, which installs its
CRDs, then kube-controller-manager), `admin` (an async cluster-admin client), `namespace`
(a fresh namespace per test) and `operator_rbac` (the chart installed into that namespace: the
operator's ServiceAccount, its Role and a kubeconfig holding a TokenRequest token of that account).

The emulated API server (kmock, tests/operator/emulator.py) for the fault-injection tests that remain:
`api`, a kubeconfig pointing at it, and the operator running under kopf.testing.KopfRunner. Tests wait
with tests/support/wait.py. NATS is a real nats-server (the `nats_server` fixture of tests/conftest.py,
or a NatsProcess the test controls)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kmock
import kopf
import pytest
from kmock._internal import parsing
from kopf.testing import KopfRunner

from tests.operator.emulator import GATEWAYS, ApiServer, parse_path_with_namespaces
from tests.operator.kube import CHART, ControlPlane, Helm, Kube, k8s_bin_dir, path
from tests.support.wait import eventually_sync
from wsgateway_operator.controller import OperatorConfig
from wsgateway_operator.handlers import register

NAMESPACE = "realtime"
FAST = OperatorConfig(
    resync_seconds=1.0, scrape_timeout=0.5, nats_timeout=1.0, retry_base_seconds=0.5, retry_max_seconds=1.0,
    drain_poll_seconds=0.5, api_cache_seconds=0.5, metrics_port=0,  # metrics: test_operator_metrics.py
)

CORE = {
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs={"get", "list", "create", "patch",
                                                                                   "delete"}),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs={"get", "list", "create", "patch",
                                                                               "delete"}),
    "v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True, verbs={"get", "list"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs={"get"}),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", namespaced=True,
                                              verbs={"get", "list", "create", "patch", "delete"},
                                              subresources={"status"}),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(kind="PodDisruptionBudget", namespaced=True,
                                                         verbs={"get", "create", "patch", "delete"}),
    "autoscaling/v2/horizontalpodautoscalers": kmock.ResourceInfo(kind="HorizontalPodAutoscaler", namespaced=True,
                                                                  verbs={"get", "create", "patch", "delete"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get"}),
    GATEWAYS: kmock.ResourceInfo(kind="WebSocketGateway", namespaced=True, shortnames={"wsgw"},
                                 verbs={"get", "list", "watch", "create", "patch", "delete"},
                                 subresources={"status"}),
}


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[ApiServer]:
    """The emulated API server with the core resources and our CRD, and KUBECONFIG pointing at it."""
    monkeypatch.setattr(parsing, "parse_path", parse_path_with_namespaces)
    async with ApiServer() as server, kmock.Server(server):
        for key, info in CORE.items():
            server.resources[key] = info
        server.objects["v1/namespaces", None, NAMESPACE] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "uid": "ns-uid"}}
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            "contexts: [{name: test, context: {cluster: test, user: test}}]\n"
            f"clusters: [{{name: test, cluster: {{server: '{server.url}'}}}}]\n"
            "users: [{name: test, user: {}}]\n"
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield server


@contextlib.asynccontextmanager
async def running_operator(config: OperatorConfig = FAST) -> AsyncIterator[KopfRunner]:
    """The operator (our registry, kopf's CLI `run`) in a thread; the test's loop keeps serving the API."""
    registry = kopf.OperatorRegistry()
    register(registry, config)
    runner = KopfRunner(["run", "--standalone", "-n", NAMESPACE, "--verbose"], registry=registry, timeout=30)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        if os.environ.get("WSGATEWAY_TEST_OPERATOR_LOG"):  # debugging aid: the operator's whole log
            print(runner.output)


class Client:
    """The admin's kubectl: plain HTTP to the emulated API server."""

    def __init__(self, server: ApiServer) -> None:
        self.http = httpx.AsyncClient(base_url=str(server.url), timeout=5)

    async def aclose(self) -> None:
        await self.http.aclose()

    @staticmethod
    def path(resource: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
        p = f"{base}/namespaces/{namespace}/{plural}"
        return p + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(self.path(resource, body["metadata"]["namespace"]), json=body)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    async def patch(self, resource: str, namespace: str, name: str, patch: dict[str, Any],
                    sub: str | None = None) -> dict[str, Any]:
        r = await self.http.patch(self.path(resource, namespace, name, sub), json=patch,
                                  headers={"Content-Type": "application/merge-patch+json"})
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    async def delete(self, resource: str, namespace: str, name: str) -> None:
        r = await self.http.delete(self.path(resource, namespace, name))
        r.raise_for_status()


@pytest.fixture
async def kubectl(api: ApiServer) -> AsyncIterator[Client]:
    c = Client(api)
    try:
        yield c
    finally:
        await c.aclose()


# ---------------------------------------------------------------------- the real control plane

OPERATOR_RELEASE, OPERATOR_RELEASE_NS = "wsgateway-operator", "wsgateway-system"
CRD_NAMES = ("websocketgateways.wsgateway.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd and kube-apiserver for the whole session (binaries built on first use); `control_plane`
    adds the CRDs and the controller-manager."""
    cp = ControlPlane(k8s_bin_dir(), tmp_path_factory.mktemp("k8s")).start(controller_manager=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def helm_cli(api_server: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm (built with the control plane) as cluster admin."""
    return Helm(api_server.bin_dir / "helm", tmp_path_factory.mktemp("helm"), api_server.admin_kubeconfig)


def _crds_established(cp: ControlPlane) -> dict[str, bool]:
    with cp.sync_client() as http:
        out = {}
        for name in CRD_NAMES:
            r = http.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = r.json().get("status", {}).get("conditions", []) if r.status_code == 200 else []
            out[name] = any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
        return out


@pytest.fixture(scope="session")
def control_plane(api_server: ControlPlane, helm_cli: Helm) -> ControlPlane:
    """The whole control plane with the chart's CRDs: the chart installed once with its defaults (`helm
    install` creates the CRDs from crds/, which the API server must accept -- structural schema, CEL
    rules within the cost limits -- and establish), then kube-controller-manager."""
    assert not any(_crds_established(api_server).values()), "a fresh API server has no CRDs"
    helm_cli.run("install", OPERATOR_RELEASE, str(CHART), "-n", OPERATOR_RELEASE_NS, "--create-namespace",
                 check=True)
    eventually_sync(lambda: all(_crds_established(api_server).values()), what="the chart's CRDs established",
                    info=lambda: str(_crds_established(api_server)))
    api_server.start_controller_manager()
    return api_server


@pytest.fixture
async def admin(control_plane: ControlPlane) -> AsyncIterator[Kube]:
    async with control_plane.admin() as client:
        yield client


@pytest.fixture
async def namespace(admin: Kube) -> AsyncIterator[str]:
    """A fresh namespace; deleted afterwards (the namespace controller removes what is left in it)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    await admin.create(path("v1", "namespaces"), {"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": name}})
    yield name
    await admin.delete(path("v1", "namespaces", name=name))


@dataclass
class OperatorRbac:
    """The chart installed into one namespace, which the operator serves with the chart's RBAC."""

    namespace: str
    release: str
    service_account: str
    role: str
    kubeconfig: Path
    token: str


@pytest.fixture
async def operator_rbac(helm_cli: Helm, control_plane: ControlPlane, admin: Kube,
                        namespace: str, tmp_path: Path) -> AsyncIterator[OperatorRbac]:
    """`helm install` into `namespace` (default values: the operator serves its release namespace), then a
    TokenRequest token of the chart's ServiceAccount in a kubeconfig."""
    release = f"op-{namespace}"
    fullname = f"{release}-wsgateway-operator"
    await asyncio.to_thread(helm_cli.run, "install", release, str(CHART), "-n", namespace,
                            check=True)
    # The authoriser sees the new Role and bindings through its informers: the operator starts once it
    # is allowed to watch its resources (what kopf does first), not while its first calls could be refused.
    user = f"system:serviceaccount:{namespace}:{fullname}"
    await admin.until_allowed(user, "watch", "customresourcedefinitions", None, "apiextensions.k8s.io")
    await admin.until_allowed(user, "watch", "websocketgateways", namespace, "wsgateway.dev")
    await admin.until_allowed(user, "create", "deployments", namespace, "apps")
    token = await admin.token(namespace, fullname)
    config = control_plane.token_kubeconfig(token, tmp_path / "operator.kubeconfig")
    yield OperatorRbac(namespace, release, fullname, fullname, config, token)
    await asyncio.to_thread(helm_cli.run, "uninstall", release, "-n", namespace)
