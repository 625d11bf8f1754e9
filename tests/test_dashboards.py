"""The Grafana dashboards in dashboards/grafana/: current with their generator, valid Grafana JSON, every
expression valid PromQL (promtool), every panel filtered by the dashboard's namespace and gateway.

That every metric they query is exported is proven against real processes elsewhere (tests/test_metrics.py,
tests/operator/test_operator_metrics.py); the metric-name extractor those tests use is checked here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.support.promql import GRAFANA_DIR, dashboard_exprs, metric_names, queried_metrics, rule_exprs

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "dashboards" / "gen_dashboards.py"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The selector every panel of a dashboard must apply (its template variables).
SELECTORS = {
    "wsgateway-overview.json": ('namespace=~"$namespace"', 'job=~"$gateway"'),
    "wsgateway-operator.json": ('namespace=~"$namespace"', 'gateway=~"$gateway"'),
}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_dashboards", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA_DIR.glob("*.json"))}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels") or [])
    return out


# --- generated, committed, current -------------------------------------------------------------------


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    """Edit dashboards/gen_dashboards.py, then `make dashboards`: the JSON must never be edited by hand."""
    generated = generator().generate()
    assert set(generated) == {"wsgateway-overview.json", "wsgateway-operator.json"}
    assert {p.name for p in GRAFANA_DIR.glob("*.json")} == set(generated)
    for name, text in generated.items():
        assert (GRAFANA_DIR / name).read_text() == text, f"{name} is stale: run `make dashboards`"


def test_generator_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    gen = generator()
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    board = tmp_path / "wsgateway-overview.json"
    board.write_text(board.read_text().replace("Open connections", "Open sockets"))
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


def test_make_dashboards_runs_the_generator() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^dashboards:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe and "dashboards/gen_dashboards.py" in recipe.group(1)
    readme = (ROOT / "dashboards" / "README.md").read_text()
    for name in SELECTORS:
        assert name in readme


# --- Grafana's schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_dashboard_is_valid_grafana_json(name: str) -> None:
    board = committed()[name]
    assert board["schemaVersion"] >= 39
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"]) and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in ("namespace", "gateway"):
        assert variables[var]["type"] == "query" and variables[var]["datasource"] == DATASOURCE
        assert variables[var]["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys() and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), panel["title"]


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_panel_follows_the_template_variables(name: str) -> None:
    board = committed()[name]
    for panel in panels(board):
        for t in panel.get("targets") or []:
            for selector in re.findall(r"\w+\{[^}]*\}", t["expr"]):
                if selector.split("{")[0] in ("up",):
                    continue
                for wanted in SELECTORS[name]:
                    assert wanted in selector, f"{panel['title']}: {selector} does not filter by {wanted}"


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (Grafana's variables replaced by values of the right shape)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make deps` installs the Debian package prometheus"
    rules = []
    for name, board in committed().items():
        for i, expr in enumerate(dashboard_exprs(board)):
            concrete = (expr.replace("$__rate_interval", "1m").replace("$namespace", "realtime")
                        .replace("$gateway", "wsgateway"))
            rules.append({"record": f"check:{name.split('.')[0].replace('-', '_')}:{i}", "expr": concrete})
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_panels_cover_what_operators_watch() -> None:
    """The overview shows latency quantiles and a heatmap per kind, the connections against the target, ..."""
    overview = json.dumps(committed()["wsgateway-overview.json"])
    for needle in ("histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                   "wsgateway_connections_target", "wsgateway_connections_limit", "wsgateway_consumer_lag",
                   "wsgateway_auth_failures_total", "wsgateway_connection_attempts_total",
                   "wsgateway_events_replayed_total", "wsgateway_slow_client_disconnects_total"):
        assert needle in overview, needle
    heatmaps = [p for p in panels(committed()["wsgateway-overview.json"]) if p["type"] == "heatmap"]
    assert sorted(re.search(r'kind="(\w+)"', p["targets"][0]["expr"]).group(1) for p in heatmaps) == [  # type: ignore[union-attr]
        "agent", "conversation", "process"]
    assert all(p["targets"][0]["format"] == "heatmap" for p in heatmaps)
    metrics = queried_metrics("wsgateway_operator_")
    assert {"wsgateway_operator_reconciles_total", "wsgateway_operator_reconcile_errors_total",
            "wsgateway_operator_reconcile_duration_seconds_bucket", "wsgateway_operator_managed_resources",
            "wsgateway_operator_gateway_replicas"} <= set(metrics)


# --- the metric-name extractor -------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "names"), [
    ("up", {"up"}),
    ('sum(wsgateway_connections{namespace=~"$namespace", job=~"$gateway"})', {"wsgateway_connections"}),
    ("histogram_quantile(0.99, sum by (le, kind) (rate(wsgateway_delivery_latency_seconds_bucket"
     '{job="x", kind="agent"}[$__rate_interval])))', {"wsgateway_delivery_latency_seconds_bucket"}),
    ("sum(rate(a_total[5m])) by (pod) / ignoring(code) group_left(le) sum without (instance) (b_count[1h:5m])",
     {"a_total", "b_count"}),
    ("min(x) == 0 or absent(up{job=\"a,b\"}) and on() vector(1) unless y offset 5m > bool 0.5",
     {"x", "up", "y"}),
    ('label_replace(m1, "dst", "$1", "src", "(rate|sum)") * on (pod) group_right kube_pod_info',
     {"m1", "kube_pod_info"}),
    ("max_over_time(lag[10m]) > 1e3 and topk(3, count_values(\"v\", other)) @ end()", {"lag", "other"}),
    ('sum by (reason)(rate(wsgateway_auth_failures_total{reason="jwks_unavailable"}[5m])) > 0',
     {"wsgateway_auth_failures_total"}),
    ("SUM BY (le) (rate(h_bucket[5m])) atan2 Inf", {"h_bucket"}),
])
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_dashboard_and_rule_expressions_are_found() -> None:
    board = {
        "panels": [{"type": "row", "panels": [{"targets": [{"expr": "a"}]}]}, {"targets": [{"expr": "b"}, {}]}],
        "templating": {"list": [
            {"type": "query", "query": {"query": 'label_values(c{ns="x"}, job)'}},
            {"type": "query", "query": "label_values(job)"},
            {"type": "custom", "query": "a,b"},
        ]},
    }
    assert [metric_names(e) for e in dashboard_exprs(board)] == [{"a"}, {"b"}, {"c"}]
    rules = {"groups": [{"rules": [{"alert": "A", "expr": "d > 1"}, {"record": "r", "expr": "sum(e)"}]}]}
    assert list(rule_exprs(rules)) == ["d > 1", "sum(e)"]
    assert list(rule_exprs({"kind": "PrometheusRule", "spec": rules})) == ["d > 1", "sum(e)"]
