"""The alert rules: one definition (wsgateway_operator.alerts), the committed rules file generated from it,
promtool's syntax check and unit tests (every alert both firing and silent), runbook links that resolve,
the documented table, and the operator's PrometheusRule accepted by promtool as well.

promtool comes from Debian's `prometheus` package (installed by `make test`, or here when missing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from tests.support.prometheus import promtool
from tests.test_docs import _anchors, _section, _table_rows
from wsgateway_operator.alerts import DEFAULT_RUNBOOK_BASE_URL, GENERIC_SELECTOR, alert_groups, alerts
from wsgateway_operator.builders import Owner, build_prometheus_rule
from wsgateway_operator.spec import WebSocketGatewaySpec

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "dashboards" / "prometheus" / "wsgateway-alerts.yaml"
PROMTOOL_TESTS = sorted((ROOT / "dashboards" / "prometheus" / "tests").glob("*.yaml"))
GENERATOR = ROOT / "dashboards" / "gen_rules.py"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
OPERATIONS = ROOT / "docs" / "operations.md"


def shipped_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def promtool_cases() -> list[tuple[str, list[Any]]]:
    """(alertname, exp_alerts) of every alert_rule_test in the promtool test files."""
    cases = []
    for path in PROMTOOL_TESTS:
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            cases += [(case["alertname"], case.get("exp_alerts") or []) for case in test.get("alert_rule_test", [])]
    return cases


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


# --- the committed file ------------------------------------------------------------------------------


def test_committed_rules_file_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + "\n(regenerate: make dashboards)"


def test_committed_rules_file_is_the_shared_definition() -> None:
    assert shipped_rules() == alert_groups(GENERIC_SELECTOR)[0]["rules"]
    assert [r["alert"] for r in shipped_rules()] == [a.name for a in alerts()]


def test_promtool_check_rules() -> None:
    _ok(promtool("check", "rules", str(RULES)))


def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL_TESTS, "no promtool tests in dashboards/prometheus/tests/"
    _ok(promtool("test", "rules", *map(str, PROMTOOL_TESTS)))


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    cases = promtool_cases()
    names = {r["alert"] for r in shipped_rules()}
    assert {name for name, _ in cases} <= names, "promtool tests name alerts the rules do not have"
    for name in sorted(names):
        assert any(n == name and exp for n, exp in cases), f"{name}: no promtool case where it fires"
        assert any(n == name and not exp for n, exp in cases), f"{name}: no promtool case where it stays silent"


def test_each_firing_case_needs_its_rule(tmp_path: Path) -> None:
    """The promtool tests can fail: with one alert's expression replaced by one that never fires, they do."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for name in [r["alert"] for r in shipped_rules()]:
        broken = yaml.safe_load(yaml.safe_dump(doc))
        for rule in broken["groups"][0]["rules"]:
            if rule["alert"] == name:
                rule["expr"] = "vector(1) < 0"
        work = tmp_path / name
        (work / "tests").mkdir(parents=True)
        (work / RULES.name).write_text(yaml.safe_dump(broken))
        for test in PROMTOOL_TESTS:
            shutil.copy(test, work / "tests" / test.name)
        result = promtool("test", "rules", *[f"tests/{t.name}" for t in PROMTOOL_TESTS], cwd=work)
        assert result.returncode != 0, f"the promtool tests still pass without {name}'s expression"
        assert f"alertname: {name}," in result.stdout + result.stderr


def test_rules_use_only_metrics_the_gateway_exposes() -> None:
    exposed = {s.name for family in Metrics(CollectorRegistry()).registry.collect() for s in family.samples}
    for rule in shipped_rules():
        for metric in re.findall(r"\b(wsgateway_[a-z_]+)\b", rule["expr"]):
            assert metric in exposed, (rule["alert"], metric)


# --- annotations, runbooks, docs ----------------------------------------------------------------------


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for rule in shipped_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert "$labels." in rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["annotations"]["runbook_url"].startswith(f"{DEFAULT_RUNBOOK_BASE_URL}#"), rule["alert"]


def test_every_runbook_url_points_to_a_section_of_the_runbooks() -> None:
    anchors = _anchors(RUNBOOKS)
    hpa_rule = alert_groups('namespace="n",job="j"', hpa=True)[0]["rules"]
    for rule in [*shipped_rules(), *hpa_rule]:
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: docs/runbooks.md has no section #{anchor}"
        # and the section names the alert, so a reader landing there knows they are right
        section = next(line for line in RUNBOOKS.read_text().splitlines()
                       if line.startswith("## ") and _anchors_of(line) == anchor)
        assert f"`{rule['alert']}`" in _section(RUNBOOKS.read_text(), section), (rule["alert"], section)


def _anchors_of(heading_line: str) -> str:
    from tests.test_docs import _slug

    return _slug(heading_line.lstrip("#").strip())


def test_operations_alert_table_lists_every_alert_with_severity_and_for() -> None:
    rows = {cells[0].strip("`"): cells for cells in _table_rows(_section(OPERATIONS.read_text(), "## Alerts"))}
    every = alerts(hpa=True)
    assert set(rows) == {a.name for a in every}
    for a in every:
        assert rows[a.name][1] == a.severity and rows[a.name][2] == a.duration, (a.name, rows[a.name])
        assert f"runbooks.md#{a.runbook}" in rows[a.name][4], (a.name, rows[a.name][4])


# --- generator options and the operator's PrometheusRule ----------------------------------------------


def test_generator_selector_and_runbook_base_url(tmp_path: Path) -> None:
    out = tmp_path / "edge.yaml"
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--selector", 'job="edge-gw"', "--runbook-base-url",
         "https://wiki.example.com/runbooks", "--no-hpa", "--output", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rules = yaml.safe_load(out.read_text())["groups"][0]["rules"]
    assert "WSGatewayAtMaxReplicas" not in {r["alert"] for r in rules}
    for rule in rules:
        assert 'job=~".*wsgateway.*"' not in rule["expr"] and 'job="edge-gw"' in rule["expr"]
        assert rule["annotations"]["runbook_url"].startswith("https://wiki.example.com/runbooks#")
    _ok(promtool("check", "rules", str(out)))


BASE: dict[str, Any] = {
    "image": "ghcr.io/wsgateway/wsgateway:0.1.0",
    "nats": {"urls": ["nats://nats:4222"]},
    "auth": {"issuer": "https://login.example.com/realms/platform"},
}


@pytest.mark.parametrize("extra", [
    {},
    {"autoscaling": {"mode": "keda", "prometheusAddress": "http://prometheus:9090"}},
    {"observability": {"runbookBaseUrl": "https://wiki.example.com/wsgateway/runbooks"}},
], ids=["hpa", "keda", "custom-runbooks"])
def test_operator_prometheus_rule_passes_promtool(tmp_path: Path, extra: dict[str, Any]) -> None:
    spec = WebSocketGatewaySpec.model_validate({**BASE, **extra})
    rule = build_prometheus_rule(Owner(name="edge-gw", namespace="realtime", uid="u-1"), spec)
    path = tmp_path / "rule.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    _ok(promtool("check", "rules", str(path)))
    names = [r["alert"] for r in rule["spec"]["groups"][0]["rules"]]
    assert ("WSGatewayAtMaxReplicas" in names) == (spec.autoscaling.mode == "hpa")
    assert names == [a.name for a in alerts(hpa=spec.autoscaling.mode == "hpa")]
    for r in rule["spec"]["groups"][0]["rules"]:
        assert r["annotations"]["runbook_url"].startswith(f"{spec.observability.runbook_base_url}#")
