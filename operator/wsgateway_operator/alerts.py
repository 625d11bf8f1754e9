"""The gateway's Prometheus alert rules, defined once for the committed rules file and for the operator.

Two consumers render the same definitions with different selectors:

* `dashboards/gen_rules.py` writes `dashboards/prometheus/wsgateway-alerts.yaml` with a selector that
  matches every gateway (`GENERIC_SELECTOR`); every expression aggregates `by (namespace, job)` (and
  `instance` for per-pod alerts), so one file covers any number of gateways, each alert naming the one
  it is about;
* the operator's PrometheusRule (`builders.build_prometheus_rule`) renders them with one gateway's own
  selector (`namespace="<ns>",job="<name>"`: the ServiceMonitor's job label is the Service name).

Pure functions, no I/O. Thresholds are module constants (docs/operations.md#alerts lists them); every
alert carries `labels.severity` and the annotations `summary`, `description` and `runbook_url`
(`<runbook base URL>#<section>` of docs/runbooks.md; a test checks every section exists). Promtool unit
tests of every alert: dashboards/prometheus/tests/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Where runbook_url points by default; override with `gen_rules.py --runbook-base-url` or the
# WebSocketGateway's `spec.observability.runbookBaseUrl` (e.g. an internal copy of docs/runbooks.md).
DEFAULT_RUNBOOK_BASE_URL = "https://github.com/wsgateway/wsgateway/blob/main/docs/runbooks.md"
# The committed file's selector: scrape jobs whose name contains "wsgateway" (the operator's ServiceMonitor
# names the job after the gateway's Service, e.g. `wsgateway`). Other naming: gen_rules.py --selector.
GENERIC_SELECTOR = 'job=~".*wsgateway.*"'
DEFAULT_GROUP = "wsgateway"

# --- thresholds ------------------------------------------------------------------------------------
AUTH_FAILURE_RATE = 0.5  # refused tokens per second, one reason, one gateway ...
AUTH_FAILURE_RATIO = 0.1  # ... and more than this share of its connection attempts
AUTH_MIN_ATTEMPT_RATE = 1.0  # attempts/s floor of the ratio's denominator (quiet gateways: no 0/0, no noise)
DELIVERY_P99_SECONDS = 0.05
SLOW_CLIENT_RATE = 0.2  # 4429 "too slow" disconnects per second, one gateway
CONSUMER_LAG = 1000  # stream messages behind, one pod
CONNECTIONS_LIMIT_RATIO = 0.9  # of wsgateway_connections_limit, one pod
CONNECTIONS_TARGET_RATIO = 1.2  # average per pod vs wsgateway_connections_target (HPA tolerance is 10%)

GATEWAY = "{{ $labels.namespace }}/{{ $labels.job }}"
POD = "{{ $labels.instance }}"
RATE = '{{ printf "%.2f" $value }}'  # rates: humanize would write 0.5 as "500m"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    duration: str  # the rule's `for`
    severity: str  # critical: users are affected now; warning: look at it today
    summary: str
    description: str  # `<for>` becomes the duration in words ("10 minutes")
    runbook: str  # section anchor in docs/runbooks.md

    def rule(self, runbook_base_url: str) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.duration,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "description": self.description.replace("<for>", _words(self.duration)),
                "runbook_url": runbook_url(runbook_base_url, self.runbook),
            },
        }


def runbook_url(base: str, anchor: str) -> str:
    return f"{base.split('#', 1)[0]}#{anchor}"


def _m(metric: str, selector: str, *extra: str) -> str:
    """`metric{selector,extra...}` (no braces when there is nothing to match)."""
    matchers = ",".join(p for p in (selector, *extra) if p)
    return f"{metric}{{{matchers}}}" if matchers else metric


def _n(value: float) -> str:
    value = round(value, 6)  # 1.2 * 100 is 120.00000000000001
    return str(int(value)) if float(value).is_integer() else str(value)


def _words(duration: str) -> str:
    """`10m` -> `10 minutes` for the descriptions."""
    m = re.fullmatch(r"(\d+)([smh])", duration)
    if not m:
        return duration
    n, unit = int(m.group(1)), {"s": "second", "m": "minute", "h": "hour"}[m.group(2)]
    return f"{n} {unit}{'' if n == 1 else 's'}"


def gateway_alerts(selector: str) -> list[Alert]:
    """The alerts on the gateway's own metrics (and `up`), restricted to series matching `selector`."""
    s = selector
    auth_rate = f"sum by (namespace, job, reason) (rate({_m('wsgateway_auth_failures_total', s)}[5m]))"
    attempts = f"sum by (namespace, job) (rate({_m('wsgateway_connection_attempts_total', s)}[5m]))"
    jwks_failures = _m("wsgateway_auth_failures_total", s, 'reason="jwks_unavailable"')
    alerts = [
        Alert(
            "WSGatewayDown",
            f"sum by (namespace, job) ({_m('up', s)}) == 0\nor\nabsent({_m('up', s)})",
            "5m", "critical",
            "wsgateway {{ if $labels.job }}" + GATEWAY + "{{ else }}(no scrape target){{ end }} is down",
            "No scrape target of {{ if $labels.job }}gateway " + GATEWAY + "{{ else }}any gateway{{ end }} "
            "has been up for <for> (every target fails its scrape, or Prometheus has none): clients "
            "cannot connect and connected clients receive nothing.",
            "gateway-down",
        ),
        Alert(
            "WSGatewayNatsDisconnected",
            f"min by (namespace, job, instance) ({_m('wsgateway_nats_connected', s)}) == 0",
            "2m", "critical",
            f"wsgateway {GATEWAY}: pod {POD} lost its NATS connection",
            f"Pod {POD} of gateway {GATEWAY} has had no NATS connection for <for>: its clients stay "
            "connected but receive no events, resumes and history requests fail, /readyz answers 503.",
            "nats-disconnected--not-ready",
        ),
        Alert(
            "WSGatewayAuthFailureSpike",
            f"{auth_rate} > {_n(AUTH_FAILURE_RATE)}\nand\n{auth_rate}\n  / on (namespace, job) group_left\n"
            f"clamp_min({attempts}, {_n(AUTH_MIN_ATTEMPT_RATE)}) > {_n(AUTH_FAILURE_RATIO)}",
            "10m", "warning",
            f"wsgateway {GATEWAY}: tokens refused ({{{{ $labels.reason }}}})",
            f"Gateway {GATEWAY} refuses {RATE} tokens per second with reason "
            f"{{{{ $labels.reason }}}} (alert: above {_n(AUTH_FAILURE_RATE)}/s and above "
            f"{_n(AUTH_FAILURE_RATIO * 100)}% of connection attempts, for <for>). Clients are closed with "
            "4401 (HTTP 401 on history and SSE).",
            "auth-failure-spike",
        ),
        Alert(
            "WSGatewayJwksUnavailable",
            f"sum by (namespace, job) (rate({jwks_failures}[5m])) > 0",
            "5m", "critical",
            f"wsgateway {GATEWAY}: JWKS not loaded, every token is refused",
            f"Gateway {GATEWAY} refuses tokens with reason jwks_unavailable ({RATE}/s for "
            "<for>): a pod has never loaded the identity provider's keys, so it can authenticate nobody.",
            "jwks-unavailable",
        ),
        Alert(
            "WSGatewayDeliveryLatencyHigh",
            "histogram_quantile(0.99,\n  sum by (namespace, job, le) "
            f"(rate({_m('wsgateway_delivery_latency_seconds_bucket', s)}[5m]))\n) > {_n(DELIVERY_P99_SECONDS)}",
            "5m", "warning",
            f"wsgateway {GATEWAY}: p99 delivery latency above {_n(DELIVERY_P99_SECONDS * 1000)} ms",
            f"The 99th percentile of event delivery latency (publisher's envelope time to socket write) of "
            f"gateway {GATEWAY} is {{{{ $value | humanizeDuration }}}}, above "
            f"{_n(DELIVERY_P99_SECONDS * 1000)} ms for <for>.",
            "delivery-latency-high",
        ),
        Alert(
            "WSGatewaySlowClientDisconnects",
            f"sum by (namespace, job) (rate({_m('wsgateway_slow_client_disconnects_total', s)}[5m])) "
            f"> {_n(SLOW_CLIENT_RATE)}",
            "10m", "warning",
            f"wsgateway {GATEWAY}: clients disconnected for falling behind",
            f"Gateway {GATEWAY} closes {RATE} connections per second with 4429 because "
            f"they cannot keep up (above {_n(SLOW_CLIENT_RATE)}/s for <for>). They resume, but may "
            "fall behind again.",
            "slow-client-disconnects-rising",
        ),
        Alert(
            "WSGatewayConsumerLagGrowing",
            f"max by (namespace, job, instance) ({_m('wsgateway_consumer_lag', s)}) > {_n(CONSUMER_LAG)}\nand\n"
            f"max by (namespace, job, instance) (deriv({_m('wsgateway_consumer_lag', s)}[10m])) > 0",
            "10m", "warning",
            f"wsgateway {GATEWAY}: pod {POD} falls behind the event stream",
            f"Pod {POD} of gateway {GATEWAY} is {{{{ $value | humanize }}}} events behind the stream and the "
            f"lag keeps rising (above {_n(CONSUMER_LAG)} and growing for <for>): its live deliveries "
            "are late.",
            "consumer-lag-growing",
        ),
        Alert(
            "WSGatewayConnectionsNearLimit",
            f"max by (namespace, job, instance) (\n  {_m('wsgateway_connections', s)}\n"
            f"  / on (namespace, job, instance) ({_m('wsgateway_connections_limit', s)} > 0)\n"
            f") > {_n(CONNECTIONS_LIMIT_RATIO)}",
            "5m", "warning",
            f"wsgateway {GATEWAY}: pod {POD} near its connection limit",
            f"Pod {POD} of gateway {GATEWAY} holds {{{{ $value | humanizePercentage }}}} of its connection "
            f"limit (above {_n(CONNECTIONS_LIMIT_RATIO * 100)}% for <for>); beyond the limit new "
            "connections are closed with 4429.",
            "connections-near-the-limit",
        ),
        Alert(
            "WSGatewayConnectionsAboveTarget",
            f"sum by (namespace, job) ({_m('wsgateway_connections', s)})\n"
            f"  / sum by (namespace, job) ({_m('wsgateway_connections_target', s)} > 0)\n"
            f"> {_n(CONNECTIONS_TARGET_RATIO)}",
            "15m", "warning",
            f"wsgateway {GATEWAY}: more connections per pod than the autoscaling target",
            f"Gateway {GATEWAY} averages {{{{ $value | humanizePercentage }}}} of its per-pod autoscaling "
            f"target (above {_n(CONNECTIONS_TARGET_RATIO * 100)}% for <for>): the autoscaler is not "
            "keeping up (at its maximum, or not getting the metric).",
            "autoscaler-not-keeping-up",
        ),
        Alert(
            "WSGatewayInvalidEvents",
            f"sum by (namespace, job, reason) (increase({_m('wsgateway_events_invalid_total', s)}[10m])) > 0",
            "1m", "warning",
            f"wsgateway {GATEWAY}: invalid events dropped ({{{{ $labels.reason }}}})",
            f"Gateway {GATEWAY} dropped about {{{{ printf \"%.0f\" $value }}}} invalid events with reason "
            "{{ $labels.reason }} in the last 10 minutes: they are never delivered, subscribers miss them.",
            "invalid-events-rising",
        ),
    ]
    return alerts


def hpa_alert(selector: str, hpa_selector: str = "") -> Alert:
    """The HPA at replicas.max for 15 minutes (kube-state-metrics series; the HPA is named like the
    gateway's scrape job, as the operator names both after the gateway). `hpa_selector` narrows the
    kube-state-metrics series (the operator: its namespace and HPA name)."""
    current = _m("kube_horizontalpodautoscaler_status_current_replicas", hpa_selector)
    maximum = _m("kube_horizontalpodautoscaler_spec_max_replicas", hpa_selector)
    return Alert(
        "WSGatewayAtMaxReplicas",
        "label_replace(\n"
        f"  max by (namespace, horizontalpodautoscaler) ({current})\n"
        f"  >= max by (namespace, horizontalpodautoscaler) ({maximum}),\n"
        '  "job", "$1", "horizontalpodautoscaler", "(.*)"\n'
        f")\nand on (namespace, job)\ngroup by (namespace, job) ({_m('up', selector)})",
        "15m", "warning",
        f"wsgateway {GATEWAY}: autoscaler at its maximum",
        f"The HorizontalPodAutoscaler of gateway {GATEWAY} has run {{{{ $value }}}} pods, its maximum, for "
        "<for>: more connections will not get more pods.",
        "autoscaler-not-keeping-up",
    )


def alerts(selector: str = GENERIC_SELECTOR, *, hpa: bool = True, hpa_selector: str = "") -> list[Alert]:
    return [*gateway_alerts(selector), *([hpa_alert(selector, hpa_selector)] if hpa else [])]


def alert_groups(
    selector: str = GENERIC_SELECTOR,
    *,
    runbook_base_url: str = DEFAULT_RUNBOOK_BASE_URL,
    group_name: str = DEFAULT_GROUP,
    hpa: bool = True,
    hpa_selector: str = "",
) -> list[dict[str, Any]]:
    """Prometheus rule groups (the `groups:` of a rules file, or a PrometheusRule's `spec.groups`).

    `selector`: PromQL label matchers (without braces) choosing the gateways' series, e.g.
    `namespace="realtime",job="wsgateway"`; `hpa`: include WSGatewayAtMaxReplicas (needs
    kube-state-metrics; only meaningful when an HPA scales the gateway).
    """
    rules = [a.rule(runbook_base_url) for a in alerts(selector, hpa=hpa, hpa_selector=hpa_selector)]
    return [{"name": group_name, "rules": rules}]
