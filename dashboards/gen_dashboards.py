#!/usr/bin/env python3
"""Generate the Grafana dashboards in dashboards/grafana/ from plain Python (dashboards as code).

    .venv/bin/python dashboards/gen_dashboards.py           # (re)write the JSON files (`make dashboards`)
    .venv/bin/python dashboards/gen_dashboards.py --check   # exit 1 if a committed file is stale

The JSON files are committed so that they can be imported as they are; tests/test_dashboards.py
regenerates them in memory and fails when the committed ones differ, when a panel breaks the layout
or the datasource convention, or when an expression does not parse (promtool). Every metric a panel
queries must also be exported by the real gateway or operator (tests/test_metrics.py and
tests/operator/test_operator_metrics.py scrape them).

Both dashboards are templated on the Prometheus data source (`${datasource}`), the namespace and the
gateway. For the gateway's own metrics the gateway is the `job` label: the operator's ServiceMonitor
scrapes the gateway's Service, and the Prometheus Operator names the job after the Service, which is
named after the WebSocketGateway. The operator's metrics carry `namespace` and `gateway` labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.events import KINDS  # the `kind` label's values (gateway.metrics.KIND_LABELS)
from wsgateway_operator.generated import write_or_check

OUT = Path(__file__).resolve().parent / "grafana"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

Panel = dict[str, Any]


# --- building blocks ------------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False, fmt: str | None = None) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
    }
    if fmt:
        t["format"] = fmt
    return t


def _with_refs(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]


def timeseries(
    title: str, targets: list[dict[str, Any]], *, unit: str = "short", description: str = "",
    stack: bool = False, min_zero: bool = True, decimals: int | None = None,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40, "showPoints": "never",
            "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min_zero:
        defaults["min"] = 0
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str, expr: str, *, unit: str = "short", description: str = "",
    thresholds: list[tuple[float | None, str]] | None = None, decimals: int | None = None,
) -> Panel:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
                                "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": _with_refs([target(expr, instant=True)]),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    }


def heatmap(title: str, expr: str, *, description: str = "") -> Panel:
    """A latency histogram's buckets over time (the expression must keep `le`)."""
    return {
        "type": "heatmap", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": _with_refs([{**target(expr, "{{le}}"), "format": "heatmap"}]),
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Spectral", "scale": "exponential", "exponent": 0.5,
                      "steps": 64, "reverse": True},
            "yAxis": {"axisPlacement": "left", "unit": "s"},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "legend": {"show": True},
            "filterValues": {"le": 1e-9},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
    }


def state_timeline(title: str, targets: list[dict[str, Any]], *, description: str = "") -> Panel:
    """0/1 series as a timeline (conditions): 1 green, 0 red."""
    return {
        "type": "state-timeline", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                               {"color": "green", "value": 1}]},
                "mappings": [{"type": "value", "options": {"0": {"text": "False", "index": 0},
                                                           "1": {"text": "True", "index": 1}}}],
            },
            "overrides": [],
        },
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8, "alignValue": "left",
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                    "tooltip": {"mode": "single", "sort": "none"}},
    }


def table(title: str, expr: str, *, description: str = "", transformations: list[dict[str, Any]]) -> Panel:
    return {
        "type": "table", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": _with_refs([target(expr, instant=True, fmt="table")]),
        "fieldConfig": {"defaults": {"custom": {"align": "auto"}}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"],
                                                                        "fields": ""}},
        "transformations": transformations,
    }


class Layout:
    """Places panels left to right in rows of 24 grid units; `row()` starts a titled row."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.x = 0
        self.y = 0
        self.line_height = 0

    def _id(self) -> int:
        return len(self.panels) + 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.line_height
            self.x = 0
            self.line_height = 0

    def add(self, panel: Panel, w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        self.panels.append({"id": self._id(), **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}})
        self.x += w
        self.line_height = max(self.line_height, h)


def datasource_variable() -> dict[str, Any]:
    return {
        "type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
        "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
    }


def query_variable(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    return {
        "type": "query", "name": name, "label": label, "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {}, "hide": 0, "includeAll": multi, "multi": multi, "options": [], "refresh": 2,
        "regex": "", "sort": 1,
    }


def dashboard(
    uid: str, title: str, description: str, layout: Layout, variables: list[dict[str, Any]], tags: list[str],
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "liveNow": False,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": layout.panels,
    }


def quantiles(metric: str, sel: str, by: str = "") -> list[dict[str, Any]]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))", f"p{p}{suffix}")
        for q, p in ((0.5, "50"), (0.95, "95"), (0.99, "99"))
    ]


# --- the gateway overview -------------------------------------------------------------------------

GW = 'namespace=~"$namespace", job=~"$gateway"'


def overview() -> dict[str, Any]:
    lay = Layout()
    latency = "wsgateway_delivery_latency_seconds"
    lay.add(stat("Open connections", f"sum(wsgateway_connections{{{GW}}})",
                 description="WebSocket and SSE connections of the selected gateways."), 4, 4)
    lay.add(stat("Pods", f"count(wsgateway_connections{{{GW}}})",
                 description="Gateway pods reporting metrics."), 4, 4)
    lay.add(stat("Delivery p99", f"histogram_quantile(0.99, sum by (le) (rate({latency}_bucket{{{GW}}}[5m])))",
                 unit="s", description="99th percentile of live delivery latency over the last 5 minutes.",
                 thresholds=[(None, "green"), (0.25, "orange"), (1.0, "red")]), 4, 4)
    lay.add(stat("Events delivered/s", f"sum(rate(wsgateway_events_delivered_total{{{GW}}}[5m]))", unit="ops",
                 description="Live event frames written to client sockets."), 4, 4)
    lay.add(stat("NATS connected", f"min(wsgateway_nats_connected{{{GW}}})",
                 description="0 when any pod lost its NATS connection.",
                 thresholds=[(None, "red"), (1, "green")]), 4, 4)
    lay.add(stat("Consumer lag", f"max(wsgateway_consumer_lag{{{GW}}})",
                 description="Largest backlog of a pod's consumer (stream messages not yet delivered to it).",
                 thresholds=[(None, "green"), (1000, "orange"), (10000, "red")]), 4, 4)

    lay.row("Delivery latency")
    lay.add(timeseries("Delivery latency p50 / p95 / p99", quantiles(latency, GW), unit="s",
                       description="Time from the event's envelope time (publisher's clock) to the socket "
                                   "write, per live delivery. Includes the clock skew between hosts."), 12)
    lay.add(timeseries("Delivery latency p99 by kind", [
        target(f"histogram_quantile(0.99, sum by (le, kind) (rate({latency}_bucket{{{GW}}}[{RATE}])))",
               "p99 {{kind}}")], unit="s", description="99th percentile per scope kind."), 12)
    for kind in KINDS:
        lay.add(heatmap(f"Delivery latency: {kind}",
                        f'sum by (le) (increase({latency}_bucket{{{GW}, kind="{kind}"}}[{RATE}]))',
                        description=f"Deliveries of {kind} events per latency bucket."), 8, 9)

    lay.row("Connections")
    lay.add(timeseries("Connections per pod", [target(f"sum by (pod) (wsgateway_connections{{{GW}}})", "{{pod}}")],
                       description="Open connections of each pod (its workers summed)."), 12)
    lay.add(timeseries("Connections vs autoscaling target and limit", [
        target(f"sum by (job) (wsgateway_connections{{{GW}}})", "{{job}} connections"),
        target(f"sum by (job) (wsgateway_connections_target{{{GW}}}) > 0", "{{job}} target x pods"),
        target(f"sum by (job) (wsgateway_connections_limit{{{GW}}})", "{{job}} limit"),
    ], description="Total connections against the autoscaling target (targetConnectionsPerPod, per pod) "
                   "times the pods running, and against the hard connection limit of all pods "
                   "(beyond it new connections get 4429). Target 0 (not set) is not drawn."), 12)
    lay.add(timeseries("Connections per pod vs target", [
        target(f"sum by (job) (wsgateway_connections{{{GW}}}) / count by (job) (wsgateway_connections{{{GW}}})",
               "{{job}} average per pod"),
        target(f"max by (job) (wsgateway_connections{{{GW}}})", "{{job}} busiest pod"),
        target(f"max by (job) (wsgateway_connections_target{{{GW}}}) > 0", "{{job}} target per pod"),
    ], description="What the autoscaler compares: the average per pod against the target."), 12)
    lay.add(timeseries("Connection attempts by outcome", [
        target(f"sum by (outcome) (rate(wsgateway_connection_attempts_total{{{GW}}}[{RATE}]))", "{{outcome}}")],
        unit="reqps", stack=True,
        description="accepted; unauthorized (no valid token); rejected (over the connection limit or a bad "
                    "URL parameter)."), 12)
    lay.add(timeseries("Auth failures by reason", [
        target(f"sum by (reason) (rate(wsgateway_auth_failures_total{{{GW}}}[{RATE}]))", "{{reason}}")],
        unit="reqps", stack=True,
        description="Refused tokens (handshakes, refresh frames, history and SSE requests). jwks_unavailable "
                    "means the identity provider cannot be reached."), 12)
    lay.add(timeseries("Subscriptions", [
        target(f"sum by (job) (wsgateway_subscriptions{{{GW}}})", "{{job}} subscriptions")],
        description="Active subscriptions, pending ones and `*` included."), 12)

    lay.row("Events")
    lay.add(timeseries("Events in and out", [
        target(f"sum(rate(wsgateway_events_received_total{{{GW}}}[{RATE}]))", "received (per pod consumer)"),
        target(f"sum(rate(wsgateway_events_delivered_total{{{GW}}}[{RATE}]))", "delivered (live frames)"),
        target(f"sum(rate(wsgateway_events_replayed_total{{{GW}}}[{RATE}]))", "replayed (resume, history)"),
    ], unit="ops", description="Every pod reads every event, so `received` is events/s times pods."), 12)
    lay.add(timeseries("Denied, coalesced, invalid", [
        target(f"sum(rate(wsgateway_events_denied_total{{{GW}}}[{RATE}]))", "denied by permissions"),
        target(f"sum(rate(wsgateway_events_coalesced_total{{{GW}}}[{RATE}]))", "coalesced (slow clients)"),
        target(f"sum by (reason) (rate(wsgateway_events_invalid_total{{{GW}}}[{RATE}]))", "invalid: {{reason}}"),
    ], unit="ops", description="Deliveries withheld by the permission check; queued frames merged or dropped "
                               "for slow clients; events that failed validation."), 12)
    lay.add(timeseries("Slow-client disconnects", [
        target(f"sum by (pod) (rate(wsgateway_slow_client_disconnects_total{{{GW}}}[{RATE}]))", "{{pod}}")],
        unit="reqps", stack=True,
        description="Connections closed with 4429 because they fell behind (they resume)."), 12)
    lay.add(timeseries("Client frames rejected", [
        target(f"sum by (code) (rate(wsgateway_client_frames_rejected_total{{{GW}}}[{RATE}]))", "{{code}}")],
        unit="reqps", stack=True, description="Bad client frames answered with an error frame."), 12)

    lay.row("Presence")
    lay.add(timeseries("Presence: listed watchers and scopes", [
        target(f"sum by (job) (wsgateway_presence_members{{{GW}}})", "{{job}} listed memberships"),
        target(f"max by (job) (wsgateway_presence_scopes{{{GW}}})", "{{job}} scopes with presence"),
        target(f"min by (job) (wsgateway_presence_instances{{{GW}}})", "{{job}} instances alive (fewest seen)"),
    ], description="Listed memberships (allowed, listed subscriptions) of all pods; scopes with watchers or "
                   "active agents in the cluster-wide view; the gateway processes each pod sees alive in the "
                   "presence bucket (fewer than the pods running: a pod does not reach the bucket)."), 12)
    lay.add(timeseries("Presence frames and bucket writes", [
        target(f"sum(rate(wsgateway_presence_deltas_total{{{GW}}}[{RATE}]))", "deltas"),
        target(f"sum(rate(wsgateway_presence_snapshots_total{{{GW}}}[{RATE}]))", "snapshots"),
        target(f"sum(rate(wsgateway_presence_kv_writes_total{{{GW}}}[{RATE}]))", "bucket writes"),
        target(f"sum(rate(wsgateway_presence_kv_errors_total{{{GW}}}[{RATE}]))", "bucket write errors"),
    ], unit="ops", description="Presence frames queued to clients (deltas are coalesced: at most one per "
                               "watcher, scope and WSGATEWAY_PRESENCE_FLUSH_MS) and this gateway's writes to "
                               "the presence bucket; errors are retried."), 12)

    lay.row("NATS")
    lay.add(timeseries("NATS connected per pod", [
        target(f"min by (pod) (wsgateway_nats_connected{{{GW}}})", "{{pod}}")],
        decimals=0, description="1 while the pod's NATS connection is up (the minimum over its workers)."), 12)
    lay.add(timeseries("Consumer lag per pod", [
        target(f"max by (pod) (wsgateway_consumer_lag{{{GW}}})", "{{pod}}")],
        description="Stream messages not yet delivered to the pod's ordered consumer (the maximum over its "
                    "workers); refreshed every second."), 12)

    variables = [
        query_variable("namespace", "Namespace", "label_values(wsgateway_connections, namespace)", multi=False),
        query_variable("gateway", "Gateway", 'label_values(wsgateway_connections{namespace=~"$namespace"}, job)',
                       multi=True),
    ]
    return dashboard(
        "wsgateway-overview", "wsgateway / Overview",
        "Delivery latency, connections against the autoscaling target, event flow, auth and NATS of "
        "wsgateway pods (generated by dashboards/gen_dashboards.py).",
        lay, variables, ["wsgateway"],
    )


# --- the operator ---------------------------------------------------------------------------------

OP = 'namespace=~"$namespace", gateway=~"$gateway"'


def operator() -> dict[str, Any]:
    lay = Layout()
    lay.add(stat("Gateways", f"count(wsgateway_operator_gateway_connections{{{OP}}})",
                 description="WebSocketGateways the operator reconciled."), 4, 4)
    lay.add(stat("Ready", f'sum(wsgateway_operator_gateway_condition{{{OP}, type="Ready"}})',
                 description="Gateways whose Ready condition is True."), 4, 4)
    lay.add(stat("Degraded", f'sum(wsgateway_operator_gateway_condition{{{OP}, type="Degraded"}})',
                 description="Gateways whose Degraded condition is True: see kubectl describe wsgw.",
                 thresholds=[(None, "green"), (1, "red")]), 4, 4)
    lay.add(stat("Reconciles/s", f"sum(rate(wsgateway_operator_reconciles_total{{{OP}}}[5m]))", unit="ops",
                 decimals=2), 4, 4)
    lay.add(stat("Reconcile errors (1h)", f"sum(increase(wsgateway_operator_reconcile_errors_total{{{OP}}}[1h]))",
                 decimals=0, thresholds=[(None, "green"), (1, "orange")]), 4, 4)
    lay.add(stat("Connections", f"sum(wsgateway_operator_gateway_connections{{{OP}}})",
                 description="status.connections summed over the selected gateways."), 4, 4)

    lay.row("Reconciles")
    lay.add(timeseries("Reconciles by trigger and outcome", [
        target(f"sum by (trigger, outcome) (rate(wsgateway_operator_reconciles_total{{{OP}}}[{RATE}]))",
               "{{trigger}} {{outcome}}")], unit="ops",
        description="change: create, update or resume of the resource; refresh: the periodic drift correction "
                    "and status refresh."), 12)
    lay.add(timeseries("Reconcile errors by reason", [
        target(f"sum by (gateway, reason) (rate(wsgateway_operator_reconcile_errors_total{{{OP}}}[{RATE}]))",
               "{{gateway}} {{reason}}")], unit="ops", stack=True,
        description="invalid_spec, nats (stream or ACL bucket), children (objects not applied), exception."), 12)
    lay.add(timeseries("Reconcile duration", quantiles("wsgateway_operator_reconcile_duration_seconds", OP),
                       unit="s", description="Children, JetStream, the pods' /metrics and the status."), 12)
    lay.add(timeseries("Reconcile duration p99 by gateway", [
        target("histogram_quantile(0.99, sum by (le, gateway) "
               f"(rate(wsgateway_operator_reconcile_duration_seconds_bucket{{{OP}}}[{RATE}])))", "{{gateway}}")],
        unit="s"), 12)

    lay.row("Gateways")
    lay.add(state_timeline("Conditions", [
        target(f"max by (gateway, type) (wsgateway_operator_gateway_condition{{{OP}}})", "{{gateway}} {{type}}")],
        description="Ready, Progressing, NatsReady, Degraded of each gateway (green: True)."), 24, 8)
    lay.add(timeseries("Replicas", [
        target(f"sum by (gateway, state) (wsgateway_operator_gateway_replicas{{{OP}}})", "{{gateway}} {{state}}")],
        decimals=0, description="desired (the autoscaler's choice), current, ready and updated pods."), 12)
    lay.add(timeseries("Connections per gateway", [
        target(f"sum by (gateway) (wsgateway_operator_gateway_connections{{{OP}}})", "{{gateway}}")],
        description="status.connections: the sum over the gateway's ready pods, read by the operator."), 12)
    lay.add(table("Resources per gateway", f"sum by (gateway, kind) (wsgateway_operator_managed_resources{{{OP}}})",
                  description="Child objects the operator keeps in place, by kind.",
                  transformations=[{"id": "groupingToMatrix", "options": {
                      "columnField": "kind", "rowField": "gateway", "valueField": "Value"}}]), 24, 7)

    variables = [
        query_variable("namespace", "Namespace", "label_values(wsgateway_operator_gateway_connections, namespace)",
                       multi=False),
        query_variable("gateway", "Gateway",
                       'label_values(wsgateway_operator_gateway_connections{namespace=~"$namespace"}, gateway)',
                       multi=True),
    ]
    return dashboard(
        "wsgateway-operator", "wsgateway / Operator",
        "Reconciles, errors and duration of the wsgateway operator, and the gateways it manages "
        "(generated by dashboards/gen_dashboards.py).",
        lay, variables, ["wsgateway", "kubernetes"],
    )


DASHBOARDS = {"wsgateway-overview.json": overview, "wsgateway-operator.json": operator}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """file name -> JSON text, exactly as committed."""
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed files are current")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    args = parser.parse_args(argv)
    results = [write_or_check(args.out / name, text, check=args.check, how_to_regenerate="make dashboards")
               for name, text in generate().items()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
