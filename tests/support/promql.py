"""Metric names in PromQL expressions, and every expression the repository's dashboards and rules query.

Used to prove that what a dashboard panel or an alert rule asks Prometheus for is really exported
(tests/test_metrics.py for the gateway, tests/operator/test_operator_metrics.py for the operator).
The extractor is a careful tokenizer, not a parser: it drops what cannot be a metric name (strings,
label matchers in `{}`, ranges and subqueries in `[]`, grouping label lists after by/without/on/
ignoring/group_left/group_right, Grafana variables, numbers and durations), then takes every remaining
identifier that is neither a keyword nor followed by `(` (a function or aggregation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = ROOT / "dashboards" / "grafana"
RULES_DIR = ROOT / "dashboards" / "prometheus"

KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
})
# Metrics other exporters provide (Prometheus itself, kube-state-metrics): not ours to export.
EXTERNAL_METRICS = frozenset({"up"})
EXTERNAL_PREFIXES = ("kube_",)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", flags=re.I)
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w.])(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (e.g. `wsgateway_delivery_latency_seconds_bucket`)."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1", text)  # $__rate_interval, ${datasource}, $namespace
    text = _GROUPING.sub(" ", text)
    text = _BRACES.sub(" ", text)  # label matchers (after the strings inside them are gone)
    text = _BRACKETS.sub(" ", text)  # [5m], [1h:5m]
    text = re.sub(r"(?<![\w.])\d[\w.]*", " ", text)  # numbers and durations: 0.99, 5m, 1e3
    names = set()
    for name, call in _IDENTIFIER.findall(text):
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def is_external(name: str) -> bool:
    return name in EXTERNAL_METRICS or name.startswith(EXTERNAL_PREFIXES)


def _panel_exprs(panels: list[dict[str, Any]]) -> Iterator[str]:
    for panel in panels:
        for target in panel.get("targets") or []:
            if target.get("expr"):
                yield target["expr"]
        yield from _panel_exprs(panel.get("panels") or [])  # collapsed rows hold their panels


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression of a dashboard: panel targets and template variable queries."""
    yield from _panel_exprs(dashboard.get("panels") or [])
    for var in (dashboard.get("templating") or {}).get("list") or []:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            m = re.fullmatch(r"\s*(label_values|query_result)\((.*)\)\s*", query, flags=re.S)
            if m and m.group(1) == "query_result":
                yield m.group(2)
            elif m and "," in m.group(2):  # label_values(<series selector>, <label>): the selector is PromQL
                yield m.group(2).rsplit(",", 1)[0]


def rule_exprs(document: dict[str, Any]) -> Iterator[str]:
    """Every `expr` of a Prometheus rule file, or of a PrometheusRule object (spec.groups)."""
    groups = (document.get("spec") or {}).get("groups") if "spec" in document else document.get("groups")
    for group in groups or []:
        for rule in group.get("rules") or []:
            if rule.get("expr"):
                yield str(rule["expr"])


def queried_expressions() -> dict[str, list[str]]:
    """file (relative to the repository) -> expressions, for dashboards/grafana/*.json and
    dashboards/prometheus/*.yaml|yml (whatever is there now)."""
    out: dict[str, list[str]] = {}
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        out[str(path.relative_to(ROOT))] = list(dashboard_exprs(json.loads(path.read_text())))
    for path in sorted([*RULES_DIR.glob("*.yaml"), *RULES_DIR.glob("*.yml")]):
        exprs: list[str] = []
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                exprs.extend(rule_exprs(doc))
        out[str(path.relative_to(ROOT))] = exprs
    return out


def queried_metrics(prefix: str = "") -> dict[str, set[str]]:
    """Metric name -> the files that query it (external metrics left out)."""
    out: dict[str, set[str]] = {}
    for where, exprs in queried_expressions().items():
        for expr in exprs:
            for name in metric_names(expr):
                if not is_external(name) and name.startswith(prefix):
                    out.setdefault(name, set()).add(where)
    return out
