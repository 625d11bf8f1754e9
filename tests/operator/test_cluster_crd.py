"""WebSocketGateways through the real kube-apiserver (tests/operator/kube.py): the CRD the chart installs
is accepted and established, resources get the server's defaults, and invalid ones are refused by the
server itself with the CRD's messages: the openAPIV3Schema (bounds, patterns, enums, required fields,
unknown fields under strict field validation) and every x-kubernetes-validations rule, transition
rules included, evaluated by the server's CEL within its cost limits.

The cases are the ones tests/operator/test_crd.py checks offline with jsonschema and cel-python: here
the API server is the judge, so a difference between the offline checks and Kubernetes shows up.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.operator.kube import CHART, ApiFailure, Kube, path
from tests.operator.test_crd import _DELETE, CEL_CASES, INVALID, SAMPLES, _with
from wsgateway_operator.crd import build_crd
from wsgateway_operator.spec import (
    CEL_RULES,
    RULE_NAME,
    RULE_STORAGE_IMMUTABLE,
    RULE_STREAM_NAME_IMMUTABLE,
    WebSocketGatewaySpec,
)

pytestmark = pytest.mark.usefixtures("control_plane")

GATEWAYS = "wsgateway.dev/v1alpha1"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
STRICT = {"fieldValidation": "Strict"}  # what kubectl sends: unknown fields are errors, not pruned
DRY_RUN = {**STRICT, "dryRun": "All"}  # admission and validation run in full; nothing is stored

MINIMAL = yaml.safe_load((SAMPLES / "minimal.yaml").read_text())["spec"]


def gateway(namespace: str, spec: dict[str, Any], name: str = "gw") -> dict[str, Any]:
    return {"apiVersion": GATEWAYS, "kind": "WebSocketGateway", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def model_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """What the operator reads for this spec: the pydantic model with its defaults."""
    return WebSocketGatewaySpec.model_validate(spec).model_dump(by_alias=True, exclude_none=True)


async def refused(admin: Kube, body: dict[str, Any], params: dict[str, str] = DRY_RUN) -> ApiFailure:
    namespace = body["metadata"]["namespace"]
    with pytest.raises(ApiFailure) as info:
        await admin.call("POST", path(GATEWAYS, "websocketgateways", namespace), body=body, params=params)
    return info.value


async def test_crd_is_established_as_generated(admin: Kube) -> None:
    """The server took the generated CRD as it is (structural, so nothing was dropped) and serves it."""
    crd = await admin.get(f"{CRD_PATH}/websocketgateways.wsgateway.dev")
    assert crd is not None
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == ["wsgw"]
    ours = build_crd()["spec"]["versions"][0]
    (served,) = crd["spec"]["versions"]
    assert served["schema"] == ours["schema"] and served["subresources"] == {"status": {}}
    # Discovery lists the resource with its status subresource (kopf and kubectl find it there).
    resources = {r["name"] for r in (await admin.get("/apis/wsgateway.dev/v1alpha1") or {})["resources"]}
    assert {"websocketgateways", "websocketgateways/status"} <= resources


GATEWAY_SAMPLES = sorted(p.stem for p in SAMPLES.glob("*.yaml") if "WebSocketGateway" in p.read_text())


@pytest.mark.parametrize("sample", GATEWAY_SAMPLES)
async def test_shipped_samples_are_accepted_with_the_servers_defaults(admin: Kube, namespace: str,
                                                                      sample: str) -> None:
    body = yaml.safe_load((SAMPLES / f"{sample}.yaml").read_text())
    body["metadata"]["namespace"] = namespace
    created = await admin.call("POST", path(GATEWAYS, "websocketgateways", namespace), body=body, params=STRICT)
    assert created is not None
    assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
    # The server defaulted exactly what the operator's model defaults: one source of truth.
    assert created["spec"] == model_defaults(body["spec"])
    assert "status" not in created  # nobody but the operator writes it (status subresource)


OWN = {
    "jwks-only": {**MINIMAL, "auth": {"jwksUrl": "https://idp.example.com/jwks"}},
    "keda": {**MINIMAL, "autoscaling": {"mode": "keda", "prometheusAddress": "http://prometheus:9090"}},
    "prefix-and-subjects": {**MINIMAL, "nats": {"urls": ["nats://a:4222", "tls://b:4222"], "subjectPrefix": "app.ev",
                                                "stream": {"name": "APP", "subjects": ["app.ev.>", "audit.>"],
                                                           "storage": "memory", "replicas": 3},
                                                "deletionPolicy": "Delete"}},
    "replicas-equal": {**MINIMAL, "replicas": {"min": 4, "max": 4}, "service": {"type": "NodePort", "port": 8080}},
}


@pytest.mark.parametrize("case", sorted(OWN))
async def test_own_resources_are_accepted_with_the_servers_defaults(admin: Kube, namespace: str, case: str) -> None:
    spec = OWN[case]
    created = await admin.call("POST", path(GATEWAYS, "websocketgateways", namespace),
                               body=gateway(namespace, spec, name=case), params=STRICT)
    assert created is not None
    assert created["spec"] == model_defaults(spec)
    stored = await admin.get(path(GATEWAYS, "websocketgateways", namespace, case))
    assert stored is not None and stored["spec"] == created["spec"]


def _server_field(where: str) -> str:
    """A JSON Schema error path (spec.nats.urls.0) as the API server names the field (spec.nats.urls[0])."""
    return ".".join(f"[{p}]" if p.isdigit() else p for p in where.split(".")).replace(".[", "[")


@pytest.mark.parametrize(("field", "value", "keyword", "where"), INVALID,
                         ids=[f"{p}={v!r}" for p, v, *_ in INVALID])
async def test_schema_violations_are_refused_by_the_server(admin: Kube, namespace: str, field: str, value: Any,
                                                           keyword: str, where: str) -> None:
    error = await refused(admin, gateway(namespace, _with(field, value)))
    if keyword == "additionalProperties":  # strict field validation: the decoder refuses the field
        unknown = f"spec.{field}" if where == "spec" else f"{where}.{next(iter(value))}"
        assert (error.code, error.reason) == (400, "BadRequest"), error
        assert f'unknown field "{unknown}"' in error.message
        return
    assert (error.code, error.reason) == (422, "Invalid"), error
    fields = [c.get("field", "") for c in error.causes]
    if keyword == "required":
        missing = f"spec.{field}" if value is _DELETE else f"{where}.name"
        assert missing in fields and "Required value" in error.message, error
        return
    # Refused at that field for that keyword, with the bound the CRD's schema sets.
    causes = [c for c in error.causes if c.get("field") == _server_field(where)]
    assert causes, (fields, error.message)
    expected = _server_message(keyword, _schema_at(where))
    assert any(expected in c["message"] for c in causes), (expected, causes)


def _schema_at(where: str) -> dict[str, Any]:
    """The CRD's schema node at a JSON Schema error path (spec.nats.urls.0: the items of spec.nats.urls)."""
    node: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in where.split("."):
        node = node["items"] if part.isdigit() else node["properties"][part]
    return node


def _server_message(keyword: str, schema: dict[str, Any]) -> str:
    """How the API server words a violation of this keyword of `schema` (k8s.io/kube-openapi's validate)."""
    value = schema[keyword]
    if keyword == "enum":
        return "supported values: " + ", ".join(f'"{v}"' for v in value)
    return {
        "minimum": f"should be greater than or equal to {value}",
        "maximum": f"should be less than or equal to {value}",
        "minItems": f"should have at least {value} items",
        "pattern": f"should match '{value}'",
        "type": f"must be of type {value}",
    }[keyword]


async def test_unknown_fields_are_pruned_without_strict_validation(admin: Kube, namespace: str) -> None:
    """Without fieldValidation=Strict the server drops unknown fields (and warns), as for every CRD."""
    body = gateway(namespace, {**MINIMAL, "replica": {"min": 3}})
    r = await admin.http.post(path(GATEWAYS, "websocketgateways", namespace), json=body,
                              params={"fieldValidation": "Warn"})
    assert r.status_code == 201, r.text
    assert "replica" not in r.json()["spec"]
    assert r.headers.get("warning", "") == '299 - "unknown field \\"spec.replica\\""'


@pytest.mark.parametrize(("rule", "at", "spec", "ok"), CEL_CASES,
                         ids=[f"{at}-{i}-{'ok' if ok else 'refused'}" for i, (_, at, _, ok) in enumerate(CEL_CASES)])
async def test_cel_rules_are_evaluated_by_the_server(admin: Kube, namespace: str, rule: dict[str, str], at: str,
                                                     spec: dict[str, Any], ok: bool) -> None:
    body = gateway(namespace, spec)
    if ok:
        accepted = await admin.call("POST", path(GATEWAYS, "websocketgateways", namespace), body=body, params=DRY_RUN)
        assert accepted is not None and accepted["spec"] == model_defaults(spec)
        return
    error = await refused(admin, body)
    assert (error.code, error.reason) == (422, "Invalid")
    assert [c.get("field") for c in error.causes] == [f"spec.{at}"]
    assert f"spec.{at}: Invalid value: {rule['message']}" in error.message


@pytest.mark.parametrize(("name", "ok"), [("a" * 52, True), ("a" * 53, False), ("gw.prod", False),
                                          ("events-gw-2", True)])
async def test_the_name_rule(admin: Kube, namespace: str, name: str, ok: bool) -> None:
    """A valid Kubernetes name is not enough: the Deployment's pods and the autoscaler add suffixes."""
    body = gateway(namespace, MINIMAL, name=name)
    if ok:
        await admin.call("POST", path(GATEWAYS, "websocketgateways", namespace), body=body, params=DRY_RUN)
        return
    error = await refused(admin, body)
    assert error.code == 422 and RULE_NAME["message"] in error.message


async def test_transition_rules_make_the_stream_immutable(admin: Kube, namespace: str) -> None:
    """nats.stream.name and .storage: rules on oldSelf, which only the API server evaluates (updates)."""
    url = path(GATEWAYS, "websocketgateways", namespace, "gw")
    await admin.create(path(GATEWAYS, "websocketgateways", namespace), gateway(namespace, MINIMAL))
    for change, rule in (({"name": "EVENTS2"}, RULE_STREAM_NAME_IMMUTABLE),
                         ({"storage": "memory"}, RULE_STORAGE_IMMUTABLE)):
        with pytest.raises(ApiFailure) as info:
            await admin.patch(url, {"spec": {"nats": {"stream": change}}})
        assert info.value.code == 422 and rule["message"] in info.value.message, info.value
    changed = await admin.patch(url, {"spec": {"image": "ghcr.io/wsgateway/wsgateway:0.2.0",
                                               "nats": {"stream": {"maxAge": "24h"}}}})
    assert changed["metadata"]["generation"] == 2 and changed["spec"]["nats"]["stream"]["name"] == "EVENTS"
    # A status write through the main resource is ignored (status subresource): the generation stays.
    unchanged = await admin.patch(url, {"status": {"replicas": 5}})
    assert "status" not in unchanged and unchanged["metadata"]["generation"] == 2


def test_every_cel_rule_is_enforced_by_the_server() -> None:
    """Each x-kubernetes-validations rule of the CRD has a case above that the server must refuse with
    its message: a new rule without one fails here."""
    def key(rule: dict[str, str]) -> tuple[str, str]:
        return rule["rule"], rule["message"]

    refused_here = ({key(rule) for rule, _, _, ok in CEL_CASES if not ok}  # test_cel_rules_are_evaluated_...
                    | {key(RULE_NAME)}  # test_the_name_rule
                    | {key(RULE_STREAM_NAME_IMMUTABLE), key(RULE_STORAGE_IMMUTABLE)})  # test_transition_rules_...
    assert refused_here == {key(rule) for rule in CEL_RULES}


def _without_bounds(node: Any) -> Any:
    """A schema without maxLength/maxItems (the inputs of the server's CEL cost estimate)."""
    if isinstance(node, dict):
        return {k: _without_bounds(v) for k, v in node.items() if k not in ("maxLength", "maxItems")}
    if isinstance(node, list):
        return [_without_bounds(v) for v in node]
    return node


async def test_cel_rules_pass_the_servers_cost_check(admin: Kube) -> None:
    """The server estimates every rule's worst-case cost from the schema and refuses a CRD whose rules
    could cost more than its budget. Ours passes (the same CRD under another name, dry run); the check
    is live: a rule that compares every pair of unbounded strings is refused by it."""
    crd = copy.deepcopy(build_crd())
    crd["metadata"]["name"] = "costchecks.wsgateway.dev"
    crd["spec"]["names"] = {"kind": "CostCheck", "listKind": "CostCheckList", "plural": "costchecks",
                            "singular": "costcheck"}
    await admin.call("POST", CRD_PATH, body=crd, params={"dryRun": "All"})
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["nats"] = _without_bounds(spec["properties"]["nats"])
    spec["x-kubernetes-validations"] = [{"rule": "self.nats.urls.all(a, self.nats.urls.all(b, a.matches(b)))",
                                         "message": "expensive"}]
    with pytest.raises(ApiFailure) as info:
        await admin.call("POST", CRD_PATH, body=crd, params={"dryRun": "All"})
    assert info.value.code == 422 and "exceeds budget" in info.value.message, info.value.message


def test_chart_ships_the_generated_crd() -> None:
    shipped = yaml.safe_load((CHART / "crds" / "websocketgateways.yaml").read_text())
    assert shipped == build_crd()
