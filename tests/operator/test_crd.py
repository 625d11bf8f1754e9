"""The generated CRD: fresh in the chart, a valid apiextensions.k8s.io/v1 object, and it accepts and
rejects resources as the pydantic spec model does.

What runs where: the openAPIV3Schema is checked with `jsonschema` (as the API server's structural
validation would, plus kubectl's strict field validation for unknown fields); the CEL rules
(`x-kubernetes-validations`) cannot be evaluated by jsonschema, so they are evaluated with cel-python
(the CEL reference grammar; Kubernetes adds library functions we do not use) and, for the same cases,
through the pydantic model that implements them for the operator. Both must agree.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import re2
import yaml
from pydantic import ValidationError

from tests.operator.emulator import apply_defaults
from wsgateway_operator.crd import CHART_CRD_PATH, build_crd, render_crd_yaml
from wsgateway_operator.spec import (
    CEL_RULES,
    RULE_IDP,
    RULE_KEDA_ADDRESS,
    RULE_NAME,
    RULE_REPLICAS,
    RULE_STORAGE_IMMUTABLE,
    RULE_STREAM_NAME_IMMUTABLE,
    RULE_STREAM_SUBJECTS,
    TRANSITION_RULES,
    WebSocketGatewaySpec,
    check_name,
)

SAMPLES = Path(__file__).resolve().parents[2] / "operator" / "samples"
K8S_VERSIONS = ("1.30", "1.33", kubernetes_validate.latest_version())

CRD = build_crd()
ROOT = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC = ROOT["properties"]["spec"]


def sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())  # type: ignore[no-any-return]


def strict(schema: Any) -> Any:
    """The schema as kubectl's strict field validation applies it: unknown fields are errors."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and schema["properties"] is not ROOT["properties"]["metadata"]:
            out["additionalProperties"] = False
        if "properties" in out and "metadata" in out["properties"]:
            out["properties"]["metadata"] = {"type": "object"}
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


VALIDATOR = jsonschema.Draft4Validator(strict(ROOT), format_checker=jsonschema.FormatChecker())


def errors_of(obj: dict[str, Any]) -> list[jsonschema.ValidationError]:
    return sorted(VALIDATOR.iter_errors(apply_defaults(ROOT, obj)), key=lambda e: list(e.absolute_path))


def resource(spec: dict[str, Any], name: str = "gw") -> dict[str, Any]:
    return {"apiVersion": "wsgateway.dev/v1alpha1", "kind": "WebSocketGateway",
            "metadata": {"name": name, "namespace": "ns"}, "spec": spec}


MINIMAL = sample("minimal")["spec"]


# --- the file and the object ----------------------------------------------------------------------


def test_committed_crd_matches_the_models() -> None:
    assert CHART_CRD_PATH.read_text(encoding="utf-8") == render_crd_yaml(), (
        "charts/wsgateway-operator/crds/websocketgateways.yaml is stale: run .venv/bin/python -m wsgateway_operator.crd"
    )
    assert yaml.safe_load(CHART_CRD_PATH.read_text()) == CRD


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_a_valid_apiextensions_v1_object(version: str) -> None:
    kubernetes_validate.validate(CRD, version, strict=True)


def test_crd_shape() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "websocketgateways.wsgateway.dev"
    assert spec["group"] == "wsgateway.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "WebSocketGateway" and spec["names"]["plural"] == "websocketgateways"
    assert spec["names"]["shortNames"] == ["wsgw"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Replicas", "Connections", "Age"} <= set(columns)
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Connections"]["jsonPath"] == ".status.connections"
    assert columns["Age"]["type"] == "date"
    assert SPEC["required"] == ["image", "nats", "auth"]
    status = ROOT["properties"]["status"]["properties"]
    assert {"observedGeneration", "replicas", "readyReplicas", "connections", "conditions"} <= set(status)
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["conditions"]["items"]["properties"]["type"]["enum"] == ["Ready", "Progressing", "NatsReady",
                                                                          "Degraded"]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if "type" in node or "properties" in node:
            out.append((path, node))
        for k, v in (node.get("properties") or {}).items():
            out += _walk(v, f"{path}.{k}")
        for k in ("items", "additionalProperties"):
            if isinstance(node.get(k), dict):
                out += _walk(node[k], f"{path}[{k}]")
    return out


def test_schema_is_structural_and_bounded() -> None:
    """Structural (a type everywhere, no $ref/anyOf, never properties next to additionalProperties) and
    bounded (every string and list under spec has a limit, so the API server can estimate CEL costs)."""
    for path, node in _walk(ROOT):
        assert "type" in node, path
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
    for path, node in _walk(SPEC, "spec"):
        if node["type"] == "string":
            assert "maxLength" in node or "enum" in node, path
        if node["type"] == "array":
            assert "maxItems" in node, path


def test_patterns_compile_as_re2() -> None:
    """Kubernetes evaluates `pattern` with Go's RE2: no look-arounds or backreferences."""
    patterns = [n["pattern"] for _, n in _walk(ROOT) if "pattern" in n]
    assert len(patterns) > 10
    for p in patterns:
        re2.compile(p)


# --- samples and defaults -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["minimal", "full"])
def test_samples_are_accepted(name: str) -> None:
    obj = sample(name)
    assert errors_of(obj) == []
    WebSocketGatewaySpec.model_validate(obj["spec"])
    check_name(obj["metadata"]["name"])


@pytest.mark.parametrize("name", ["minimal", "full"])
def test_crd_defaults_equal_the_models_defaults(name: str) -> None:
    """One source of truth: what the API server stores after defaulting is what the operator reads."""
    spec = sample(name)["spec"]
    defaulted = apply_defaults(ROOT, resource(spec))["spec"]
    assert defaulted == WebSocketGatewaySpec.model_validate(spec).model_dump(by_alias=True, exclude_none=True)


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(base or MINIMAL)
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


_DELETE = object()

# (spec path, value, JSON Schema keyword that must reject it, path of the error)
INVALID = [
    ("image", _DELETE, "required", "spec"),
    ("nats", _DELETE, "required", "spec"),
    ("image", "has spaces", "pattern", "spec.image"),
    ("replicas.min", 0, "minimum", "spec.replicas.min"),
    ("replicas.max", 1001, "maximum", "spec.replicas.max"),
    ("autoscaling.mode", "vpa", "enum", "spec.autoscaling.mode"),
    ("autoscaling.targetConnectionsPerPod", 0, "minimum", "spec.autoscaling.targetConnectionsPerPod"),
    ("nats.urls", [], "minItems", "spec.nats.urls"),
    ("nats.urls", ["http://nats:4222"], "pattern", "spec.nats.urls.0"),
    ("nats.stream", {"name": "bad name"}, "pattern", "spec.nats.stream.name"),
    ("nats.stream", {"replicas": 7}, "maximum", "spec.nats.stream.replicas"),
    ("nats.stream", {"maxAge": "a week"}, "pattern", "spec.nats.stream.maxAge"),
    ("nats.stream", {"storage": "s3"}, "enum", "spec.nats.stream.storage"),
    ("nats.subjectPrefix", "events.*", "pattern", "spec.nats.subjectPrefix"),
    ("nats.deletionPolicy", "Orphan", "enum", "spec.nats.deletionPolicy"),
    ("nats.credentialsSecret", {"key": "nats.creds"}, "required", "spec.nats.credentialsSecret"),
    ("auth.issuer", "login.example.com", "pattern", "spec.auth.issuer"),
    ("gateway", {"maxFrameBytes": 100}, "minimum", "spec.gateway.maxFrameBytes"),
    ("gateway", {"workers": 0}, "minimum", "spec.gateway.workers"),
    ("gateway", {"heartbeatSeconds": "20s"}, "type", "spec.gateway.heartbeatSeconds"),
    ("resources", {"requests": {"cpu": "lots"}}, "pattern", "spec.resources.requests.cpu"),
    ("service", {"type": "ExternalName"}, "enum", "spec.service.type"),
    ("service", {"port": 70000}, "maximum", "spec.service.port"),
    ("observability", {"serviceMonitor": "yes"}, "type", "spec.observability.serviceMonitor"),
    ("unknownField", 1, "additionalProperties", "spec"),
    ("gateway", {"maxConnection": 5}, "additionalProperties", "spec.gateway"),
]


@pytest.mark.parametrize(("path", "value", "keyword", "where"), INVALID, ids=[f"{p}={v!r}" for p, v, *_ in INVALID])
def test_invalid_resources_are_rejected_for_the_right_reason(path: str, value: Any, keyword: str, where: str) -> None:
    errors = errors_of(resource(_with(path, value)))
    assert errors, "accepted"
    reasons = {(e.validator, ".".join(str(p) for p in e.absolute_path)) for e in errors}
    assert (keyword, where) in reasons, reasons
    with pytest.raises(ValidationError):  # the operator's model has the same constraint
        WebSocketGatewaySpec.model_validate(_with(path, value))


# --- CEL ------------------------------------------------------------------------------------------


def _node(path: str) -> dict[str, Any]:
    node: dict[str, Any] = ROOT
    for part in path.split(".") if path else []:
        node = node["properties"][part]
    return node


RULE_PLACES = {
    "spec.replicas": RULE_REPLICAS, "spec.autoscaling": RULE_KEDA_ADDRESS, "spec.nats": RULE_STREAM_SUBJECTS,
    "spec.auth": RULE_IDP, "spec.nats.stream.name": RULE_STREAM_NAME_IMMUTABLE,
    "spec.nats.stream.storage": RULE_STORAGE_IMMUTABLE, "": RULE_NAME,
}


def test_cel_rules_are_in_the_crd_where_they_apply() -> None:
    for path, rule in RULE_PLACES.items():
        assert rule in _node(path)["x-kubernetes-validations"], path
    assert {r["rule"] for r in RULE_PLACES.values()} == {r["rule"] for r in CEL_RULES}
    committed = yaml.safe_load(CHART_CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    shipped = [(r["rule"], r["message"]) for _, n in _walk(committed) for r in n.get("x-kubernetes-validations", [])]
    assert sorted(shipped) == sorted((r["rule"], r["message"]) for r in CEL_RULES)


_CEL = celpy.Environment()


def cel_ok(rule: dict[str, str], value: Any, old: Any = None) -> bool:
    program = _CEL.program(_CEL.compile(rule["rule"]))
    activation = {"self": celpy.json_to_cel(value)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    return bool(program.evaluate(activation))


# (rule, spec path the rule sits on, spec, CEL and pydantic verdict)
CEL_CASES = [
    (RULE_REPLICAS, "replicas", _with("replicas", {"min": 2, "max": 10}), True),
    (RULE_REPLICAS, "replicas", _with("replicas", {"min": 5, "max": 5}), True),
    (RULE_REPLICAS, "replicas", _with("replicas", {"min": 6, "max": 5}), False),
    (RULE_REPLICAS, "replicas", _with("replicas", {"min": 20}), False),  # max defaults to 10
    (RULE_KEDA_ADDRESS, "autoscaling", _with("autoscaling", {"mode": "keda"}), False),
    (RULE_KEDA_ADDRESS, "autoscaling", _with("autoscaling", {"mode": "keda", "prometheusAddress": "http://p:9090"}),
     True),
    (RULE_KEDA_ADDRESS, "autoscaling", _with("autoscaling", {"mode": "hpa"}), True),
    (RULE_STREAM_SUBJECTS, "nats", MINIMAL, True),
    (RULE_STREAM_SUBJECTS, "nats", _with("nats.stream", {"subjects": ["events.>", "audit.>"]}), True),
    (RULE_STREAM_SUBJECTS, "nats", _with("nats.stream", {"subjects": ["other.>"]}), False),
    (RULE_STREAM_SUBJECTS, "nats",
     _with("nats.subjectPrefix", "app.events", _with("nats.stream", {"subjects": ["app.events.>"]})), True),
    (RULE_STREAM_SUBJECTS, "nats",
     _with("nats.subjectPrefix", "app.events", _with("nats.stream", {"subjects": ["events.>"]})), False),
    (RULE_IDP, "auth", _with("auth", {"jwksUrl": "https://idp/jwks"}), True),
    (RULE_IDP, "auth", _with("auth", {"audience": "x"}), False),
]


@pytest.mark.parametrize(("rule", "at", "spec", "ok"), CEL_CASES)
def test_cel_rules_and_the_model_agree(rule: dict[str, str], at: str, spec: dict[str, Any], ok: bool) -> None:
    defaulted = apply_defaults(ROOT, resource(spec))["spec"]
    value: Any = defaulted
    for part in at.split("."):
        value = value[part]
    assert cel_ok(rule, value) is ok
    assert errors_of(resource(spec)) == []  # the OpenAPI part alone accepts it: only CEL decides
    if ok:
        WebSocketGatewaySpec.model_validate(spec)
    else:
        with pytest.raises(ValidationError, match=re.escape(rule["message"])):
            WebSocketGatewaySpec.model_validate(spec)


def test_transition_rules_need_the_old_object() -> None:
    """Immutability needs oldSelf, which only the API server has: CEL-only, evaluated here."""
    assert set(map(str, TRANSITION_RULES)) == {str(RULE_STREAM_NAME_IMMUTABLE), str(RULE_STORAGE_IMMUTABLE)}
    assert cel_ok(RULE_STREAM_NAME_IMMUTABLE, "EVENTS", old="EVENTS")
    assert not cel_ok(RULE_STREAM_NAME_IMMUTABLE, "EVENTS2", old="EVENTS")
    assert cel_ok(RULE_STORAGE_IMMUTABLE, "file", old="file")
    assert not cel_ok(RULE_STORAGE_IMMUTABLE, "memory", old="file")


@pytest.mark.parametrize(("name", "ok"), [
    ("wsgateway", True), ("a", True), ("events-gw-2", True), ("a" * 52, True), ("a" * 53, False),
    ("Gateway", False), ("gw.prod", False), ("-gw", False), ("gw-", False), ("9gw", False),
])
def test_name_rule(name: str, ok: bool) -> None:
    assert cel_ok(RULE_NAME, {"metadata": {"name": name}}) is ok
    if ok:
        check_name(name)
    else:
        with pytest.raises(ValueError, match="DNS label"):
            check_name(name)
