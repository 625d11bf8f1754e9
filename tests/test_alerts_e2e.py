"""End to end: a real gateway, a real Prometheus loading the SHIPPED rules file, a burst of bad tokens, and
the auth-failure alert firing in Prometheus.

The only change to the shipped rules is transparent and stated here: every `for:` is rewritten to `0s`
in a temporary copy (the shipped 10 minutes would make the test take 10 minutes); expressions, labels,
thresholds and annotations are exactly those of dashboards/prometheus/wsgateway-alerts.yaml.
Prometheus scrapes the gateway every second as the operator's ServiceMonitor would (job = the Service
name, here `wsgateway`, plus a `namespace` label) and evaluates the rules every second.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tests.support.gateway import RunningGateway
from tests.support.prometheus import PrometheusServer, run_prometheus
from tests.support.wait import eventually
from tests.support.wsclient import closed, connect

RULES = Path(__file__).resolve().parent.parent / "dashboards" / "prometheus" / "wsgateway-alerts.yaml"
ALERT = "WSGatewayAuthFailureSpike"
NAMESPACE = "e2e"
BAD_CONNECTIONS = 300  # over a 5-minute rate window: about 1/s, twice the alert's 0.5/s


def rules_without_for(tmp: Path) -> Path:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    path = tmp / "wsgateway-alerts.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def epoch(rfc3339: str) -> float:
    """A timestamp of Prometheus' API (RFC 3339, nanoseconds) in seconds since the epoch."""
    m = re.fullmatch(r"([^.]+?)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m, rfc3339
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(m[1] + zone).timestamp() + float(m[2] or 0)


async def in_prometheus(prom: PrometheusServer, check: Any, what: str) -> Any:
    """`eventually(check)`, polled at Prometheus' pace; a failure shows its log."""
    return await eventually(check, what=what, interval=0.25, info=lambda: f"prometheus log:\n{prom.log_tail()}")


async def bad_token_burst(gw: RunningGateway, n: int) -> int:
    """n WebSocket connections with a malformed token, 50 at a time; returns how many got close 4401."""
    limit = asyncio.Semaphore(50)

    async def one() -> int:
        async with limit:
            ws = await connect(gw.ws, "not-a-jwt")
            code, _ = await closed(ws)
            return code

    codes = await asyncio.gather(*(one() for _ in range(n)))
    return sum(1 for c in codes if c == 4401)


async def test_bad_token_burst_fires_the_auth_failure_alert(gw: RunningGateway, tmp_path: Path) -> None:
    scrape = [{
        "job_name": "wsgateway",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [f"127.0.0.1:{gw.port}"], "labels": {"namespace": NAMESPACE}}],
    }]
    async with run_prometheus(scrape, [rules_without_for(tmp_path)]) as prom:

        async def firing() -> list[dict[str, Any]]:
            return [a for a in await prom.alerts() if a["labels"]["alertname"] == ALERT and a["state"] == "firing"]

        # Baseline: the rule's own rate() sees the gateway's series (two scrapes at least), and the rule
        # has been evaluated on them since, without error, and is not firing.
        rate = ('sum by (namespace, job, reason) (rate(wsgateway_auth_failures_total'
                '{job=~".*wsgateway.*",reason="malformed"}[5m]))')

        async def baseline() -> bool:
            return any(s["metric"].get("namespace") == NAMESPACE for s in await prom.query(rate))

        await in_prometheus(prom, baseline, "the gateway's auth failure series in Prometheus")
        since = await prom.time()

        async def evaluated_since() -> bool:  # every rule, not "two seconds later" (a loaded machine lags)
            return all(epoch(r["lastEvaluation"]) > since for r in await prom.alert_rules())

        await in_prometheus(prom, evaluated_since, "a rule evaluation after the baseline")
        rules = await prom.alert_rules()
        assert {r["name"] for r in rules} == {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
                                              for r in g["rules"]}
        for rule in rules:  # the shipped expressions evaluate on a real gateway's series without error
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert next(r for r in rules if r["name"] == ALERT)["state"] == "inactive"
        assert await firing() == []

        refused = await bad_token_burst(gw, BAD_CONNECTIONS)
        assert refused == BAD_CONNECTIONS

        alerts = await in_prometheus(prom, firing, f"{ALERT} firing")
        (alert,) = alerts
        labels = alert["labels"]
        assert labels == {"alertname": ALERT, "severity": "warning", "namespace": NAMESPACE, "job": "wsgateway",
                          "reason": "malformed"}
        assert alert["annotations"]["summary"] == "wsgateway e2e/wsgateway: tokens refused (malformed)"
        assert alert["annotations"]["runbook_url"].endswith("/docs/runbooks.md#auth-failure-spike")
        assert float(alert["value"]) > 0.5  # refused tokens per second over the 5-minute window

