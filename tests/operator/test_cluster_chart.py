"""`helm install`, `helm upgrade` (non-default values) and `helm uninstall` of charts/wsgateway-operator
against the real kube-apiserver (tests/operator/kube.py), with the helm built next to it.

The server decides here: it accepts the CRDs (the session's first install, `control_plane`), stores every
rendered object (the API server's validation, not only the schemas tests/test_chart.py checks offline),
and its RBAC authoriser says what the operator's ServiceAccount may do (SubjectAccessReview): exactly
what the chart grants in the namespaces it serves, nothing elsewhere, never Secrets in bulk.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.conftest import CRD_NAMES
from tests.operator.kube import CHART, ControlPlane, Helm, Kube, k8s_bin_dir, path

RBAC = "rbac.authorization.k8s.io/v1"


@pytest.fixture
async def namespaces(admin: Kube) -> AsyncIterator[tuple[str, str, str]]:
    """The release namespace and two namespaces for the operator to serve."""
    suffix = uuid.uuid4().hex[:6]
    names = (f"ops-{suffix}", f"team-a-{suffix}", f"team-b-{suffix}")
    for name in names:
        await admin.create(path("v1", "namespaces"), {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": name}})
    yield names
    for name in names:
        await admin.delete(path("v1", "namespaces", name=name))


async def helm(cli: Helm, *args: str, values: dict[str, Any] | None = None) -> str:
    result = await asyncio.to_thread(cli.run, *args, values=values, check=True)
    return result.stdout


async def test_install_upgrade_uninstall(admin: Kube, helm_cli: Helm, control_plane: ControlPlane,
                                         namespaces: tuple[str, str, str]) -> None:
    ops, team_a, team_b = namespaces
    release = f"wsgw-{ops}"
    fullname = f"{release}-wsgateway-operator"
    user = f"system:serviceaccount:{ops}:{fullname}"

    # --- install: the operator serves team-a and team-b ---
    await helm(helm_cli, "install", release, str(CHART), "-n", ops, values={"watch": {"namespaces": [team_a, team_b]}})
    status = yaml.safe_load(await helm(helm_cli, "status", release, "-n", ops, "-o", "yaml"))
    assert status["info"]["status"] == "deployed" and status["version"] == 1
    for name in CRD_NAMES:  # helm put them in place (this session's first install) and keeps them
        assert await admin.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") is not None
    deployment = await admin.get(path("apps/v1", "deployments", ops, fullname))
    assert deployment is not None
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["operator", f"--namespace={team_a}", f"--namespace={team_b}"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == fullname
    assert await admin.get(path("v1", "serviceaccounts", ops, fullname)) is not None
    for ns in (team_a, team_b):
        role = await admin.get(path(RBAC, "roles", ns, fullname))
        binding = await admin.get(path(RBAC, "rolebindings", ns, fullname))
        assert role is not None and binding is not None
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": ops}]
    assert await admin.get(path(RBAC, "roles", ops, fullname)) is None  # the release namespace is not served
    assert await admin.get(path(RBAC, "clusterroles", name=f"{fullname}-crd-reader")) is not None
    assert await admin.get(path(RBAC, "clusterrolebindings", name=f"{fullname}-crd-reader")) is not None
    # What the authoriser allows the operator: the children in the served namespaces, nothing elsewhere.
    # Its informers see new RBAC objects asynchronously: each grant is waited for, and the refusals are
    # read once the grants of the same objects are seen.
    await admin.until_allowed(user, "create", "deployments", team_a, "apps")
    await admin.until_allowed(user, "patch", "websocketgateways", team_b, "wsgateway.dev")
    await admin.until_allowed(user, "patch", "websocketgateways/status", team_b, "wsgateway.dev")
    await admin.until_allowed(user, "get", "secrets", team_a)
    await admin.until_allowed(user, "watch", "customresourcedefinitions", None, "apiextensions.k8s.io")
    assert not await admin.allowed(user, "list", "secrets", team_a)  # one named Secret, never all of them
    assert not await admin.allowed(user, "create", "deployments", ops, "apps")
    assert not await admin.allowed(user, "create", "configmaps", "default")
    assert not await admin.allowed(user, "create", "customresourcedefinitions", None, "apiextensions.k8s.io")

    # --- upgrade with non-default values: cluster-wide, peering, another image, a sample gateway ---
    values = {
        "watch": {"allNamespaces": True},
        "peering": {"enabled": True, "name": f"peers-{ops}"},
        "image": {"repository": "registry.example.com/wsgateway", "tag": "1.2.3"},
        "operator": {"extraArgs": ["--verbose"], "extraEnv": [{"name": "WSGATEWAY_OPERATOR_RESYNC_S", "value": "10"}]},
        "podAnnotations": {"example.com/team": "platform"},
        "sampleGateway": {"enabled": True, "namespace": team_a},
        "prometheusAdapter": {"rules": {"enabled": True}},
    }
    await helm(helm_cli, "upgrade", release, str(CHART), "-n", ops, values=values)
    status = yaml.safe_load(await helm(helm_cli, "status", release, "-n", ops, "-o", "yaml"))
    assert status["info"]["status"] == "deployed" and status["version"] == 2
    deployment = await admin.get(path("apps/v1", "deployments", ops, fullname))
    assert deployment is not None and deployment["metadata"]["generation"] == 2
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example.com/wsgateway:1.2.3"
    assert "--all-namespaces" in container["args"] and f"--peering=peers-{ops}" in container["args"]
    assert container["args"][-1] == "--verbose"
    assert {"name": "WSGATEWAY_OPERATOR_RESYNC_S", "value": "10"} in container["env"]
    assert pod["metadata"]["annotations"]["example.com/team"] == "platform"
    for ns in (team_a, team_b):  # the Roles made way for a ClusterRole
        assert await admin.get(path(RBAC, "roles", ns, fullname)) is None
    cluster_role = await admin.get(path(RBAC, "clusterroles", name=fullname))
    assert cluster_role is not None
    assert any("clusterkopfpeerings" in r["resources"] for r in cluster_role["rules"])
    assert await admin.get(path("kopf.dev/v1", "clusterkopfpeerings", name=f"peers-{ops}")) is not None
    sample = await admin.get(path("wsgateway.dev/v1alpha1", "websocketgateways", team_a, "wsgateway"))
    assert sample is not None and sample["spec"]["replicas"] == {"min": 2, "max": 10}
    assert sample["spec"]["autoscaling"]["mode"] == "hpa"  # defaulted by the server from the CRD
    assert await admin.get(path("v1", "configmaps", ops, f"{fullname}-adapter-rules")) is not None
    await admin.until_allowed(user, "create", "configmaps", "default")  # the new ClusterRoleBinding
    assert not await admin.allowed(user, "list", "secrets", "default")

    # --- uninstall: everything the release made is gone, the CRDs stay (helm never deletes crds/) ---
    await helm(helm_cli, "uninstall", release, "-n", ops)
    assert await admin.get(path("apps/v1", "deployments", ops, fullname)) is None
    assert await admin.get(path("v1", "serviceaccounts", ops, fullname)) is None
    assert await admin.get(path(RBAC, "clusterroles", name=fullname)) is None
    assert await admin.get(path(RBAC, "clusterrolebindings", name=f"{fullname}-crd-reader")) is None
    assert await admin.get(path("kopf.dev/v1", "clusterkopfpeerings", name=f"peers-{ops}")) is None
    assert await admin.get(path("wsgateway.dev/v1alpha1", "websocketgateways", team_a, "wsgateway")) is None
    for name in CRD_NAMES:
        assert await admin.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") is not None
    await admin.until_allowed(user, "create", "configmaps", "default", allowed=False)  # its binding is gone
    listed = await helm(helm_cli, "list", "-n", ops, "-q")
    assert release not in listed.split()


async def test_install_refuses_contradicting_values(helm_cli: Helm, control_plane: ControlPlane,
                                                    namespace: str) -> None:
    """Refused before anything reaches the server: values.schema.json and the chart's own checks."""
    result = await asyncio.to_thread(helm_cli.run, "install", f"bad-{namespace}", str(CHART), "-n", namespace,
                                     values={"watch": {"allNamespaces": True, "namespaces": ["a"]}})
    assert result.returncode != 0
    assert "watch.namespaces must be empty when watch.allNamespaces is true" in result.stderr
    listed = await asyncio.to_thread(helm_cli.run, "list", "-n", namespace, "-q", check=True)
    assert listed.stdout.strip() == ""


def test_the_server_is_the_pinned_release(control_plane: ControlPlane) -> None:
    """What docs/operations.md says the operator is tested against is what runs: the release pinned in
    tools/k8s/go.mod, which reports itself at /version (helm checks the chart's kubeVersion against it)."""
    go_mod = (CHART.parents[1] / "tools" / "k8s" / "go.mod").read_text()
    pinned = next(line.split()[1] for line in go_mod.splitlines() if line.split()[:1] == ["k8s.io/kubernetes"])
    assert control_plane.version["gitVersion"] == pinned
    assert (control_plane.version["major"], control_plane.version["minor"]) == ("1", pinned.split(".")[1])
    docs = (CHART.parents[1] / "docs" / "operations.md").read_text()
    assert f"**Kubernetes {pinned.removeprefix('v')}**" in docs
    for module, name in (("go.etcd.io/etcd/server/v3", "etcd"), ("helm.sh/helm/v4", "helm")):
        version = next(words[1] for line in go_mod.splitlines()
                       if (words := line.removeprefix("require ").split())[:1] == [module])
        assert f"**{name} {version.removeprefix('v')}**" in docs, (module, version)


def test_staging_modules_are_the_pinned_release() -> None:
    """Each k8s.io/<staging> module is replaced by the release matching the pinned Kubernetes (v1.37.2 ->
    v0.37.2), so a change of the pin that forgets one fails here, not as a silently mixed build."""
    go_mod = (CHART.parents[1] / "tools" / "k8s" / "go.mod").read_text()
    pinned = next(line.split()[1] for line in go_mod.splitlines() if line.split()[:1] == ["k8s.io/kubernetes"])
    staging = "v0." + pinned.removeprefix("v1.")
    replaces = [line.split() for line in go_mod.splitlines() if " => " in line]
    assert all(len(r) == 4 and r[0] == r[2] for r in replaces), replaces  # a module by its own release
    replaced = {r[0]: r[3] for r in replaces if r[0].startswith("k8s.io/")}
    assert len(replaced) > 20, replaced  # kube-apiserver and kube-controller-manager need about 30
    assert {m: v for m, v in replaced.items() if v != staging} == {}


def test_the_control_plane_starts_again_when_its_port_was_taken(tmp_path: Path) -> None:
    """`free_port` can only say that a port was free: another process may bind it first. The control
    plane then starts again on other ports instead of failing the whole session."""
    cp = ControlPlane(k8s_bin_dir(), tmp_path)
    taken = cp.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cp.start(controller_manager=False)
        try:
            assert cp.attempt == 2 and cp.port != taken
            with cp.sync_client() as http:
                assert http.get("/readyz").status_code == 200
        finally:
            cp.stop()
