"""The Helm chart charts/wsgateway-operator: linted and rendered by the real ``helm`` binary, every
rendered object validated against the official Kubernetes schemas, the RBAC held to least privilege.

Why: a chart that renders but is rejected by the API server (or grants the operator more than it
needs) fails only at install time in someone's cluster. Here ``helm lint --strict`` and ``helm template``
run for a matrix of values; built-in kinds are validated strictly (unknown fields rejected) with
``kubernetes-validate`` against the oldest Kubernetes the chart supports and the newest the validator
knows; custom objects (the sample WebSocketGateway, kopf peering objects) against the
openAPIV3Schema of their CRDs in ``crds/`` with ``jsonschema``. No API server runs here: installing,
upgrading and uninstalling against a real kube-apiserver is tests/operator/test_cluster_chart.py.

``helm`` is built from helm.sh/helm/v4 (tools/k8s/go.mod) by scripts/build-k8s.sh, which ``make test``
runs and which runs here on demand (a no-op once cached): a missing helm fails these tests, it never
skips them.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import subprocess
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.operator.kube import k8s_bin_dir

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "wsgateway-operator"
GATEWAY_CRD = CHART / "crds" / "websocketgateways.yaml"
# the image `make image` builds (scripts/build-image.sh: wsgateway/wsgateway:<version of pyproject.toml>)
MAKE_IMAGE = f"wsgateway/wsgateway:{tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}"
RELEASE, RELEASE_NS = "wsgw", "wsgateway-system"
FULLNAME = f"{RELEASE}-wsgateway-operator"
SA = FULLNAME
# The chart's kubeVersion floor (Chart.yaml) and the newest Kubernetes kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Groups whose objects are custom resources defined by the chart's crds/.
CUSTOM_GROUPS = {"wsgateway.dev", "kopf.dev"}

READ = frozenset({"get", "list", "watch"})
CHILD = frozenset({"get", "create", "patch", "delete"})
PEER = frozenset({"get", "list", "watch", "patch"})
# Exactly what the operator needs inside a served namespace (cluster-wide: the same in a ClusterRole):
# kopf lists/watches/patches the gateways (status through the subresource) and posts Events; the
# operator's own client (operator/wsgateway_operator/kube.py) gets/creates/merge-patches/deletes the
# children, lists the gateway pods and reads the NATS credentials Secret by name.
OPERATOR_GRANTS: dict[tuple[str, str], frozenset[str]] = {
    ("wsgateway.dev", "websocketgateways"): frozenset({"list", "watch", "patch"}),
    ("wsgateway.dev", "websocketgateways/status"): frozenset({"patch"}),
    ("wsgateway.dev", "websocketgateways/finalizers"): frozenset({"update"}),
    ("", "configmaps"): CHILD,
    ("", "services"): CHILD,
    ("apps", "deployments"): CHILD,
    ("autoscaling", "horizontalpodautoscalers"): CHILD,
    ("policy", "poddisruptionbudgets"): CHILD,
    ("keda.sh", "scaledobjects"): CHILD,
    ("monitoring.coreos.com", "servicemonitors"): CHILD,
    ("monitoring.coreos.com", "prometheusrules"): CHILD,
    ("", "pods"): frozenset({"list"}),
    ("", "secrets"): frozenset({"get"}),
    ("", "events"): frozenset({"create"}),
}
# kopf's resource discovery lists and watches CRDs; cluster-scoped, so always a ClusterRole.
CRD_GRANTS = {("apiextensions.k8s.io", "customresourcedefinitions"): READ}

ADAPTER_SERIES = 'wsgateway_connections{namespace!="",pod!=""}'
ADAPTER_QUERY = "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"


# ---------------------------------------------------------------------------------------------- helm


_counter = itertools.count()


@dataclass
class Helm:
    binary: Path
    env: dict[str, str]
    values_dir: Path

    def run(self, *args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), *args]
        if values:
            path = self.values_dir / f"values-{next(_counter)}.yaml"
            path.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(path)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120, check=False)

    def lint(self, values: dict[str, Any] | None = None, *, strict: bool = True) -> str:
        args = ["lint", str(CHART), "--namespace", RELEASE_NS] + (["--strict"] if strict else [])
        result = self.run(*args, values=values)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "0 chart(s) failed" in output, output
        assert "[WARNING]" not in output and "[ERROR]" not in output, output
        return output

    def template(self, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        result = self.run("template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--include-crds",
                          "--kube-version", K8S_VERSIONS[0], values=values)
        assert result.returncode == 0, result.stderr
        return load_documents(result.stdout)

    def template_error(self, values: dict[str, Any]) -> str:
        result = self.run("template", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                          "--kube-version", K8S_VERSIONS[0], values=values)
        assert result.returncode != 0, f"expected helm template to refuse {values}"
        return result.stderr


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The real helm binary built by scripts/build-k8s.sh, with its config/cache/data in a temp dir."""
    binary = k8s_bin_dir() / "helm"  # raises (test error, not skip) when the build fails
    if not (binary.exists() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} missing: scripts/build-k8s.sh must build helm (tools/k8s/go.mod)")
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }
    h = Helm(binary, env, tmp_path_factory.mktemp("helm-values"))
    version = h.run("version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stdout + version.stderr
    return h


# ------------------------------------------------------------------------------------------ parsing


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently; the API
    server's strict decoding does not)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_documents(text: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    return docs


def group_of(doc: dict[str, Any]) -> str:
    api_version: str = doc["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


# ------------------------------------------------------------------------------------- validation


def _strict_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural openAPIV3Schema as a JSON Schema (draft 4, as OpenAPI 3.0) that, like
    ``kubectl apply --validate=strict``, rejects unknown fields instead of pruning them."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: _strict_openapi(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict_openapi(s["additionalProperties"])
    elif (
        schema.get("type") == "object"
        and "additionalProperties" not in s
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and not schema.get("x-kubernetes-embedded-resource")
    ):
        s["additionalProperties"] = False
    if isinstance(s.get("items"), dict):
        s["items"] = _strict_openapi(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s and key in schema:
            s[key] = [_strict_openapi(sub) for sub in schema[key]]
    if "not" in s:
        s["not"] = _strict_openapi(s["not"])
    return s


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON Schema, for every served version of every CRD in crds/."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in load_documents(path.read_text()):
            assert crd["kind"] == "CustomResourceDefinition", path
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version["served"]:
                    continue
                schema = _strict_openapi(version["schema"]["openAPIV3Schema"])
                # apiVersion, kind and metadata are always allowed; the API server validates metadata
                # itself (a CRD may only narrow name/generateName), so it stays open here.
                properties = schema.setdefault("properties", {})
                properties.setdefault("apiVersion", {"type": "string"})
                properties.setdefault("kind", {"type": "string"})
                metadata = properties.setdefault("metadata", {"type": "object"})
                metadata.pop("additionalProperties", None)
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return schemas


def validate_custom(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    assert key in schemas, f"no CRD in {CHART / 'crds'} serves {key}"
    jsonschema.Draft4Validator(schemas[key]).validate(doc)
    if doc["kind"] == "WebSocketGateway":
        # jsonschema cannot evaluate the CRD's CEL rules (x-kubernetes-validations); the operator's
        # model, which the CRD is generated from, carries the same rules as validators.
        from wsgateway_operator.spec import WebSocketGatewaySpec, check_name

        check_name(doc["metadata"]["name"])
        WebSocketGatewaySpec.model_validate(doc["spec"])


def validate_builtin(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {path}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(e.message)


def validate_all(docs: list[dict[str, Any]]) -> None:
    schemas = crd_schemas()
    unvalidated = []
    for doc in docs:
        if doc["apiVersion"].startswith("wsgateway.dev/") and not GATEWAY_CRD.exists():
            unvalidated.append(doc["metadata"]["name"])
        elif group_of(doc) in CUSTOM_GROUPS:
            validate_custom(doc, schemas)
        else:
            validate_builtin(doc)
    if unvalidated:  # everything else passed
        pytest.skip(f"{GATEWAY_CRD.relative_to(REPO)} not generated yet: {unvalidated} not validated")


# ------------------------------------------------------------------------------------------- RBAC


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], frozenset[str]]:
    """Rules flattened to (apiGroup, resource) -> verbs; refuses wildcards and anything exotic."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, (
            f"unexpected rule fields (resourceNames? URLs?): {rule}"
        )
        for field in ("apiGroups", "resources", "verbs"):
            assert rule[field], f"empty {field}: {rule}"
            assert not any("*" in item for item in rule[field]), f"wildcard in {field}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return {k: frozenset(v) for k, v in out.items()}


def expected_grants(*, peering: str | None = None, keda: bool = True, monitoring: bool = True) -> dict:
    expected = dict(OPERATOR_GRANTS)
    if not keda:
        del expected[("keda.sh", "scaledobjects")]
    if not monitoring:
        del expected[("monitoring.coreos.com", "servicemonitors")]
        del expected[("monitoring.coreos.com", "prometheusrules")]
    if peering:
        expected[("kopf.dev", peering)] = PEER
    return expected


def assert_binding(binding: dict[str, Any], role_kind: str, role_name: str, role_docs: list[dict[str, Any]]) -> None:
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role_name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SA, "namespace": RELEASE_NS}]
    assert any(r["metadata"]["name"] == role_name for r in role_docs), f"binding to a {role_kind} not rendered"


def assert_rbac(docs: list[dict[str, Any]], *, cluster_wide: bool, namespaces: list[str], **expect: Any) -> None:
    operator_grants = expected_grants(**expect)
    cluster_roles = {r["metadata"]["name"]: grants(r["rules"]) for r in of_kind(docs, "ClusterRole")}
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): grants(r["rules"]) for r in of_kind(docs, "Role")}
    bindings = of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding")
    # CRDs are cluster-scoped: read-only, in a ClusterRole of their own, in both modes.
    crd_role = f"{FULLNAME}-crd-reader"
    if cluster_wide:
        assert cluster_roles == {crd_role: CRD_GRANTS, FULLNAME: operator_grants}
        assert roles == {}
        assert sorted(b["metadata"]["name"] for b in bindings) == sorted([crd_role, FULLNAME])
        for binding in bindings:
            assert binding["kind"] == "ClusterRoleBinding"
            name = binding["metadata"]["name"]
            assert_binding(binding, "ClusterRole", name, of_kind(docs, "ClusterRole"))
    else:
        assert cluster_roles == {crd_role: CRD_GRANTS}
        assert roles == {(ns, FULLNAME): operator_grants for ns in namespaces}
        (crb,) = of_kind(docs, "ClusterRoleBinding")
        assert_binding(crb, "ClusterRole", crd_role, of_kind(docs, "ClusterRole"))
        role_bindings = of_kind(docs, "RoleBinding")
        assert sorted(b["metadata"]["namespace"] for b in role_bindings) == sorted(namespaces)
        for binding in role_bindings:
            ns = binding["metadata"]["namespace"]
            assert_binding(
                binding, "Role", FULLNAME, [r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] == ns]
            )
    sa = one(docs, "ServiceAccount")
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == (SA, RELEASE_NS)


# --------------------------------------------------------------------------------------- matrix


@dataclass(frozen=True)
class Case:
    id: str
    values: dict[str, Any]
    cluster_wide: bool
    namespaces: tuple[str, ...]
    peering: str | None = None  # kopf peering resource granted
    args: tuple[str, ...] = ()  # expected watch/peering args of `wsgateway operator`


CASES = [
    Case("defaults", {}, False, (RELEASE_NS,), args=(f"--namespace={RELEASE_NS}", "--standalone")),
    Case(
        "all-namespaces",
        {"watch": {"allNamespaces": True}},
        True,
        (),
        args=("--all-namespaces", "--standalone"),
    ),
    Case(
        "two-namespaces",
        {"watch": {"namespaces": ["team-a", "team-b"]}},
        False,
        ("team-a", "team-b"),
        args=("--namespace=team-a", "--namespace=team-b", "--standalone"),
    ),
    Case(
        "sample-and-adapter",
        {
            "sampleGateway": {"enabled": True},
            "prometheusAdapter": {"rules": {"enabled": True, "namespace": "monitoring"}},
        },
        False,
        (RELEASE_NS,),
        args=(f"--namespace={RELEASE_NS}", "--standalone"),
    ),
    Case(
        "namespaced-peering-sample",
        {
            "watch": {"namespaces": ["team-a", "team-b"]},
            "peering": {"enabled": True, "name": "wsgw-peers"},
            "sampleGateway": {"enabled": True, "namespace": "team-b"},
        },
        False,
        ("team-a", "team-b"),
        peering="kopfpeerings",
        args=("--namespace=team-a", "--namespace=team-b", "--peering=wsgw-peers"),
    ),
    Case(
        "cluster-peering-everything",
        {
            "watch": {"allNamespaces": True},
            "peering": {"enabled": True},
            "sampleGateway": {"enabled": True, "namespace": "apps"},
            "prometheusAdapter": {"rules": {"enabled": True}},
            "image": {"repository": "registry.example.com/wsgateway", "tag": "1.2.3"},
            "imagePullSecrets": [{"name": "registry"}],
            "operator": {"extraArgs": ["--verbose"], "extraEnv": [{"name": "TZ", "value": "UTC"}]},
            "podAnnotations": {"example.com/team": "platform"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "priorityClassName": "system-cluster-critical",
        },
        True,
        (),
        peering="clusterkopfpeerings",
        args=("--all-namespaces", "--peering=wsgateway-operator"),
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def rendered(request: pytest.FixtureRequest, helm: Helm) -> Iterator[tuple[Case, list[dict[str, Any]]]]:
    case: Case = request.param
    yield case, helm.template(case.values)


# ------------------------------------------------------------------------------------------ tests


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert (chart["name"], chart["version"], chart["appVersion"]) == ("wsgateway-operator", "0.1.0", "0.1.0")
    assert chart["description"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lint_strict(helm: Helm, case: Case) -> None:
    helm.lint(case.values)


def test_lint_without_strict_is_clean_too(helm: Helm) -> None:
    helm.lint(strict=False)


def test_rendered_objects_validate(rendered: tuple[Case, list[dict[str, Any]]]) -> None:
    """Every built-in object against the official schemas (strict), custom ones against their CRD."""
    _case, docs = rendered
    validate_all(docs)


def test_rendered_objects_have_namespaces(rendered: tuple[Case, list[dict[str, Any]]]) -> None:
    _case, docs = rendered
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering"}
    for doc in docs:
        assert ("namespace" in doc["metadata"]) == (doc["kind"] not in cluster_scoped), doc["metadata"]


def test_rbac_is_least_privilege(rendered: tuple[Case, list[dict[str, Any]]]) -> None:
    case, docs = rendered
    assert_rbac(docs, cluster_wide=case.cluster_wide, namespaces=list(case.namespaces), peering=case.peering)


def test_operator_deployment(rendered: tuple[Case, list[dict[str, Any]]]) -> None:
    case, docs = rendered
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # never two kopf operators
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == SA
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["command"] == ["wsgateway"]
    args = container["args"]
    assert args[0] == "operator"
    watch_args = [a for a in args if a.startswith(("--namespace", "--all-namespaces", "--peering", "--standalone"))]
    assert tuple(watch_args) == case.args
    # The very parser of the `wsgateway` command accepts them and reads what the chart means.
    from gateway.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.func.__name__ == "_operator"
    assert parsed.all_namespaces is case.cluster_wide
    assert (parsed.namespaces or []) == ([] if case.cluster_wide else list(case.namespaces))
    assert parsed.peering == next((a.split("=", 1)[1] for a in case.args if a.startswith("--peering=")), None)
    assert parsed.standalone is ("--standalone" in case.args)
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # kopf's liveness endpoint and the probe agree.
    probe = container["livenessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])
    assert f"--liveness=http://0.0.0.0:{port}{probe['path']}" in args
    # The operator's /metrics: the flag, the container port and the scrape annotations agree.
    assert parsed.metrics_port == 9090
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    annotations = spec["template"]["metadata"]["annotations"]
    assert {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert selector_matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_non_default_values_are_applied(helm: Helm) -> None:
    case = next(c for c in CASES if c.id == "cluster-peering-everything")
    docs = helm.template(case.values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/wsgateway:1.2.3"
    assert container["args"][-1] == "--verbose"
    from gateway.cli import build_parser

    assert build_parser().parse_args(container["args"]).verbose is True
    assert {"name": "TZ", "value": "UTC"} in container["env"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "wsgateway-operator"
    assert of_kind(docs, "KopfPeering") == []


def test_defaults_render_only_the_operator(helm: Helm) -> None:
    docs = helm.template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * len(crd_documents())
        + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment"]
    )
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == MAKE_IMAGE


def crd_documents() -> list[dict[str, Any]]:
    return [d for p in sorted((CHART / "crds").glob("*.yaml")) for d in load_documents(p.read_text())]


def test_namespaced_peering_objects(helm: Helm) -> None:
    docs = helm.template({"watch": {"namespaces": ["team-a", "team-b"]}, "peering": {"enabled": True, "name": "p"}})
    peerings = of_kind(docs, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", "p"),
        ("team-b", "p"),
    ]
    validate_all(docs)
    docs = helm.template({"peering": {"enabled": True, "createObjects": False}})
    assert of_kind(docs, "KopfPeering") == [] and of_kind(docs, "ClusterKopfPeering") == []


def test_secrets_cannot_be_enumerated(helm: Helm) -> None:
    """The operator reads the one credentials Secret a gateway names; it can neither list nor watch
    Secrets (which would reveal every Secret's content in the namespace) nor change any."""
    for values in ({}, {"watch": {"allNamespaces": True}}):
        docs = helm.template(values)
        for role in of_kind(docs, "Role") + of_kind(docs, "ClusterRole"):
            secrets = grants(role["rules"]).get(("", "secrets"), frozenset())
            assert secrets <= {"get"}, role["metadata"]["name"]


def test_rbac_toggles(helm: Helm) -> None:
    docs = helm.template({"rbac": {"keda": False, "prometheusOperator": False}})
    assert_rbac(docs, cluster_wide=False, namespaces=[RELEASE_NS], keda=False, monitoring=False)
    docs = helm.template({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops-sa"}})
    assert not [d for d in docs if group_of(d) == "rbac.authorization.k8s.io"]
    assert of_kind(docs, "ServiceAccount") == []
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"


def test_liveness_can_be_switched_off(helm: Helm) -> None:
    docs = helm.template({"operator": {"liveness": {"enabled": False}}})
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "livenessProbe" not in container and [p["name"] for p in container["ports"]] == ["metrics"]
    assert not any(a.startswith("--liveness") for a in container["args"])
    validate_all(docs)


def test_operator_metrics_values(helm: Helm) -> None:
    """Another port, annotations the admin overrides, or no metrics endpoint at all."""
    from gateway.cli import build_parser

    docs = helm.template({"operator": {"metrics": {"port": 9300}},
                          "podAnnotations": {"prometheus.io/scrape": "false", "team": "ops"}})
    template = one(docs, "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert build_parser().parse_args(container["args"]).metrics_port == 9300
    assert {"name": "metrics", "containerPort": 9300, "protocol": "TCP"} in container["ports"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "false", "prometheus.io/port": "9300", "prometheus.io/path": "/metrics", "team": "ops"}
    validate_all(docs)
    docs = helm.template({"operator": {"metrics": {"enabled": False}, "liveness": {"enabled": False}}})
    template = one(docs, "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert build_parser().parse_args(container["args"]).metrics_port == 0  # 0: not served
    assert "ports" not in container and "annotations" not in template["metadata"]
    validate_all(docs)


def test_sample_gateway(helm: Helm) -> None:
    docs = helm.template({"sampleGateway": {"enabled": True}})
    gw = one(docs, "WebSocketGateway")
    assert gw["apiVersion"] == "wsgateway.dev/v1alpha1"
    assert gw["metadata"]["namespace"] == RELEASE_NS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert gw["spec"] == values["sampleGateway"]["spec"]
    if not GATEWAY_CRD.exists():
        pytest.skip(f"{GATEWAY_CRD.relative_to(REPO)} not generated yet: the sample cannot be validated")
    validate_custom(gw, crd_schemas())


def test_the_defaults_and_samples_name_what_make_image_builds() -> None:
    """`make image` tags wsgateway/wsgateway:<pyproject version> (scripts/build-image.sh); the chart's
    operator image (above), its sample gateway, the operator's minimal sample and README name exactly that."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["sampleGateway"]["spec"]["image"] == MAKE_IMAGE
    minimal = yaml.safe_load((REPO / "operator" / "samples" / "minimal.yaml").read_text())
    assert minimal["spec"]["image"] == MAKE_IMAGE
    readme = (REPO / "operator" / "README.md").read_text()
    assert {line.split("image:", 1)[1].strip() for line in readme.splitlines() if "  image: " in line} == {MAKE_IMAGE}
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == MAKE_IMAGE.rsplit(":", 1)[1]


def test_crd_schema_validation_can_fail() -> None:
    """The custom-resource check rejects what the API server (strict field validation) would."""
    schemas = crd_schemas()
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "p", "namespace": "n"}}
    validate_custom(peering, schemas)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom({**peering, "spec": {"unknown": 1}}, schemas)
    if not GATEWAY_CRD.exists():
        pytest.skip(f"{GATEWAY_CRD.relative_to(REPO)} not generated yet")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gw = {"apiVersion": "wsgateway.dev/v1alpha1", "kind": "WebSocketGateway", "metadata": {"name": "g"}}
    validate_custom({**gw, "spec": values["sampleGateway"]["spec"]}, schemas)
    broken = copy.deepcopy(values["sampleGateway"]["spec"])
    broken["noSuchField"] = True
    with pytest.raises(jsonschema.ValidationError, match="noSuchField"):
        validate_custom({**gw, "spec": broken}, schemas)
    broken = copy.deepcopy(values["sampleGateway"]["spec"])
    broken["replicas"] = {"min": 3, "max": 2}  # passes the JSON schema, fails the CEL rule's twin
    with pytest.raises(ValueError, match=r"replicas.min must be less than or equal to replicas.max"):
        validate_custom({**gw, "spec": broken}, schemas)


def test_builtin_validation_can_fail(helm: Helm) -> None:
    """The built-in check rejects unknown fields and wrong types (strict), so the tests above mean something."""
    deployment = one(helm.template(), "Deployment")
    validate_builtin(deployment)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGets"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_crds_validate() -> None:
    for crd in crd_documents():
        validate_builtin(crd)
    names = {d["metadata"]["name"] for d in crd_documents()}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= names
    if GATEWAY_CRD.exists():
        (crd,) = load_documents(GATEWAY_CRD.read_text())
        assert crd["metadata"]["name"] == "websocketgateways.wsgateway.dev"
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["kind"] == "WebSocketGateway"
        assert "wsgw" in crd["spec"]["names"]["shortNames"]
        assert any(v["name"] == "v1alpha1" and v["served"] for v in crd["spec"]["versions"])


def test_prometheus_adapter_rules(helm: Helm) -> None:
    docs = helm.template({"prometheusAdapter": {"rules": {"enabled": True, "namespace": "monitoring"}}})
    cm = one(docs, "ConfigMap")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == (f"{FULLNAME}-adapter-rules", "monitoring")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config == {
        "rules": [
            {
                "seriesQuery": ADAPTER_SERIES,
                "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                "name": {"matches": "^wsgateway_connections$", "as": "wsgateway_connections"},
                "metricsQuery": ADAPTER_QUERY,
            }
        ]
    }
    # The same rule as the operator's sample for the prometheus-adapter chart, and as documented in
    # values.yaml for that chart's rules.custom.
    sample = yaml.safe_load((REPO / "operator" / "samples" / "prometheus-adapter-rule.yaml").read_text())
    assert sample["rules"]["custom"] == config["rules"]
    values_text = (CHART / "values.yaml").read_text()
    assert f"seriesQuery: '{ADAPTER_SERIES}'" in values_text and f"metricsQuery: '{ADAPTER_QUERY}'" in values_text


def test_contradicting_values_are_refused(helm: Helm) -> None:
    err = helm.template_error({"watch": {"allNamespaces": True, "namespaces": ["a"]}})
    assert "watch.namespaces must be empty when watch.allNamespaces is true" in err
    err = helm.template_error({"watch": {"namespaces": ["a"]}, "sampleGateway": {"enabled": True, "namespace": "b"}})
    assert 'sampleGateway.namespace "b" is not watched' in err
    err = helm.template_error({"watch": {"namespaces": ["a", "a"]}})
    assert "lists a namespace twice" in err
    err = helm.template_error({"serviceAccount": {"create": False}})
    assert "serviceAccount.name is required" in err
    err = helm.template_error({"operator": {"metrics": {"port": 8080}}})
    assert "operator.metrics.port and operator.liveness.port must differ" in err


def test_values_schema_refuses_typos(helm: Helm) -> None:
    """values.schema.json: a misspelt key or a wrong type stops helm instead of being ignored."""
    # helm 4's messages (helm 3 worded them "Additional property allNamespace is not allowed" and
    # named fields operator.liveness.port).
    err = helm.template_error({"watch": {"allNamespace": True}})
    assert "at '/watch': additional properties 'allNamespace' not allowed" in err
    err = helm.template_error({"operator": {"liveness": {"port": "http"}}})
    assert "at '/operator/liveness/port': got string, want integer" in err
    err = helm.template_error({"watch": {"namespaces": ["Team_A"]}})
    assert "at '/watch/namespaces/0': 'Team_A' does not match pattern" in err
    result = helm.run("lint", str(CHART), "--strict", values={"rbac": {"kedaa": True}})
    assert result.returncode != 0 and "kedaa" in result.stdout + result.stderr


def test_notes_render(helm: Helm, tmp_path: Path) -> None:
    """NOTES.txt (which ``helm template`` never prints) rendered through a ConfigMap in a temp copy of
    the chart; the WebSocketGateway it tells the admin to apply must be valid too."""
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.check")
    (chart / "templates" / "zz-notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-check\ndata:\n"
        '  notes: |\n    {{- tpl (.Files.Get "notes.check") . | nindent 4 }}\n'
    )
    values = {"watch": {"namespaces": ["team-a", "team-b"]}, "prometheusAdapter": {"rules": {"enabled": True}}}
    result = helm.run("template", RELEASE, str(chart), "--namespace", RELEASE_NS,
                      "--kube-version", K8S_VERSIONS[0], values=values)
    assert result.returncode == 0, result.stderr
    notes = next(d for d in load_documents(result.stdout) if d["metadata"]["name"] == "notes-check")["data"]["notes"]
    assert "in: team-a, team-b." in notes
    assert f"deployment/{FULLNAME}" in notes and "kubectl get wsgw" in notes
    assert f"rules.existing={FULLNAME}-adapter-rules" in notes
    # The resource NOTES shows between "kubectl apply -f -" and "YAML".
    block = notes.split("<<'YAML' | kubectl apply -f -\n", 1)[1].split("\n  YAML\n", 1)[0]
    gw = yaml.safe_load(textwrap.dedent(block))
    assert (gw["kind"], gw["metadata"]["namespace"]) == ("WebSocketGateway", "team-a")
    if not GATEWAY_CRD.exists():
        pytest.skip(f"{GATEWAY_CRD.relative_to(REPO)} not generated yet: the NOTES sample cannot be validated")
    validate_custom(gw, crd_schemas())
