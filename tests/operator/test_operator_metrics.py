"""The operator's own metrics, scraped over HTTP from the real operator (kopf.testing.KopfRunner with our
registry) running against the emulated API server and a real nats-server.

On the emulator (kmock), not the real control plane, because it needs what the real one cannot give:
ready gateway pods whose /metrics answer (no kubelet runs pods there) and an invalid spec reaching the
operator (the real API server refuses it). See test_operator_kmock.py.

Reconciles that succeed, one with an invalid spec and one whose NATS is unreachable; a gateway whose pods
report connections; then deletion. The scrape must show each of them, label values only from fixed sets
or the gateways' own names, and every wsgateway_operator_* metric that a dashboard or an alert rule
queries (dashboards/grafana/*.json, dashboards/prometheus/*.yaml).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.devtools.natsproc import NatsProcess
from tests.operator.conftest import FAST, NAMESPACE, Client, running_operator
from tests.operator.emulator import GATEWAYS, ApiServer
from tests.operator.test_operator_kmock import (
    PODS,
    deployment_controller,
    fake_pod,
    gateway,
    is_condition,
    metrics_endpoint,
)
from tests.support.ports import free_port
from tests.support.promql import queried_metrics
from tests.support.wait import eventually
from wsgateway_operator.metrics import (
    CONDITION_TYPES,
    ERROR_REASONS,
    METRICS,
    OUTCOMES,
    REPLICA_STATES,
    TRIGGERS,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
KINDS = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
         "ServiceMonitor", "PrometheusRule"}


async def scrape(port: int) -> tuple[str, Samples]:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = float(s.value)
    return response.text, out


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def series(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {ls: v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)}


async def test_operator_metrics_over_http(api: ApiServer, kubectl: Client, nats_server: NatsProcess) -> None:
    port = free_port()
    config = FAST.model_copy(update={"metrics_port": port, "metrics_host": "127.0.0.1"})
    dead_nats = NatsProcess()  # a reserved port nothing listens on
    try:
        async with metrics_endpoint(3) as pod_a, metrics_endpoint(4) as pod_b, running_operator(config):
            await kubectl.create(GATEWAYS, gateway("gw", nats_server.url))
            await kubectl.create(GATEWAYS, gateway("broken", nats_server.url, replicas={"min": 5, "max": 2}))
            await kubectl.create(GATEWAYS, gateway("offline", dead_nats.url))
            await eventually(lambda: api.get_object("apps/v1/deployments", NAMESPACE, "gw"), what="Deployment")
            for pod in (fake_pod("gw-1-a", "gw", pod_a), fake_pod("gw-1-b", "gw", pod_b)):
                await kubectl.create(PODS, pod)
            await deployment_controller(api, kubectl, "gw", ready=2)
            await eventually(lambda: is_condition(api, "gw", "Ready", "True", "Serving"), what="gw Ready")
            await eventually(lambda: is_condition(api, "offline", "NatsReady", "False"), what="offline")
            await eventually(lambda: is_condition(api, "broken", "Ready", "False", "InvalidSpec"), what="broken")
            gw = {"namespace": NAMESPACE, "gateway": "gw"}

            async def refreshed() -> tuple[str, Samples] | None:
                """A scrape after gw's first successful periodic refresh (resync 1 s)."""
                text, samples = await scrape(port)
                done = value(samples, "wsgateway_operator_reconciles_total", **gw, trigger="refresh",
                             outcome="success")
                return (text, samples) if done >= 1 else None

            scraped = await eventually(refreshed, what="a periodic refresh of gw")
            assert scraped is not None
            text, samples = scraped
            for trigger in TRIGGERS:
                assert value(samples, "wsgateway_operator_reconciles_total", **gw, trigger=trigger,
                             outcome="success") >= 1, trigger
            assert value(samples, "wsgateway_operator_reconciles_total", **gw, outcome="error") == 0
            assert value(samples, "wsgateway_operator_reconcile_errors_total", **gw) == 0  # present, at 0
            assert len(series(samples, "wsgateway_operator_reconcile_errors_total", **gw)) == len(ERROR_REASONS)
            assert value(samples, "wsgateway_operator_reconcile_duration_seconds_count", **gw) >= 2
            assert value(samples, "wsgateway_operator_reconcile_duration_seconds_sum", **gw) > 0
            managed = series(samples, "wsgateway_operator_managed_resources", **gw)
            assert {dict(ls)["kind"]: v for ls, v in managed.items()} == {
                "ConfigMap": 1, "Deployment": 1, "Service": 1, "PodDisruptionBudget": 1, "HorizontalPodAutoscaler": 1}
            replicas = series(samples, "wsgateway_operator_gateway_replicas", **gw)
            assert {dict(ls)["state"]: v for ls, v in replicas.items()} == {
                "desired": 2, "current": 2, "ready": 2, "updated": 2}
            assert value(samples, "wsgateway_operator_gateway_connections", **gw) == 7  # 3 + 4 from the pods
            conditions = series(samples, "wsgateway_operator_gateway_condition", **gw)
            assert {dict(ls)["type"]: v for ls, v in conditions.items()} == {
                "Ready": 1, "Progressing": 0, "NatsReady": 1, "Degraded": 0}

            broken = {"namespace": NAMESPACE, "gateway": "broken"}
            assert value(samples, "wsgateway_operator_reconciles_total", **broken, outcome="error") >= 1
            assert value(samples, "wsgateway_operator_reconciles_total", **broken, outcome="success") == 0
            assert value(samples, "wsgateway_operator_reconcile_errors_total", **broken, reason="invalid_spec") >= 1
            assert value(samples, "wsgateway_operator_gateway_condition", **broken, type="Ready") == 0
            offline = {"namespace": NAMESPACE, "gateway": "offline"}
            assert value(samples, "wsgateway_operator_reconcile_errors_total", **offline, reason="nats") >= 1
            assert value(samples, "wsgateway_operator_gateway_condition", **offline, type="NatsReady") == 0

            # every operator metric a dashboard or an alert rule queries is exported
            queried = queried_metrics("wsgateway_operator_")
            assert queried, "no dashboard queries the operator's metrics"
            names = {name for name, _ in samples}
            missing = {m: sorted(files) for m, files in queried.items() if m not in names}
            assert not missing, f"queried but not exported by the operator: {missing}"
            assert {m.name.removesuffix("_total") for m in METRICS} <= {
                f.name for f in text_string_to_metric_families(text)}

            # bounded labels: gateways' names and fixed sets, nothing else
            allowed = {"namespace": {NAMESPACE}, "gateway": {"gw", "broken", "offline"}, "trigger": set(TRIGGERS),
                       "outcome": set(OUTCOMES), "reason": set(ERROR_REASONS), "state": set(REPLICA_STATES),
                       "type": set(CONDITION_TYPES), "kind": KINDS}
            for name, labels in samples:
                assert name.startswith("wsgateway_operator_"), name
                for label, v in labels:
                    if label == "le":
                        continue
                    assert v in allowed[label], f"{name}: {label}={v!r}"

            # a deleted gateway's series go away
            for pod in ("gw-1-a", "gw-1-b"):  # (the finalizer waits for the pods)
                await kubectl.delete(PODS, NAMESPACE, pod)
            await kubectl.delete(GATEWAYS, NAMESPACE, "gw")
            await eventually(lambda: api.get_object(GATEWAYS, NAMESPACE, "gw") is None, what="gw gone")
            _, after = await scrape(port)
            assert not [k for k in after if ("gateway", "gw") in k[1]]
            assert value(after, "wsgateway_operator_reconciles_total", **broken) >= 1
    finally:
        dead_nats.cleanup()


async def test_metrics_port_in_use_stops_the_operator(api: ApiServer) -> None:
    """A taken port is a clear start-up failure, not an operator running unobserved."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = FAST.model_copy(update={"metrics_port": port, "metrics_host": "127.0.0.1"})
        try:
            async with running_operator(config) as runner:
                await eventually(lambda: runner.future.done(), what="the operator to stop")
        except Exception as exc:  # KopfRunner re-raises the operator's failure on exit
            assert "metrics" in str(exc) or "metrics" in repr(exc.__cause__), exc
        assert f"cannot serve the operator's metrics on 127.0.0.1:{port}" in runner.output


async def test_wsgateway_operator_command_serves_metrics(
    api: ApiServer, kubectl: Client, nats_server: NatsProcess
) -> None:
    """`wsgateway operator --metrics-port`: the real entry point serves /metrics (the chart's container args)."""
    port = free_port()
    env = {**os.environ, "WSGATEWAY_OPERATOR_NAMESPACES": NAMESPACE, "WSGATEWAY_OPERATOR_RESYNC_S": "1",
           "WSGATEWAY_OPERATOR_METRICS_HOST": "127.0.0.1"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "wsgateway"), "operator", "--standalone", f"--metrics-port={port}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await kubectl.create(GATEWAYS, gateway("gw", nats_server.url))
        await eventually(lambda: is_condition(api, "gw", "NatsReady", "True"), timeout=30, what="NatsReady")

        async def reconciled() -> float:
            try:
                _, samples = await scrape(port)
            except httpx.HTTPError:
                return 0
            return value(samples, "wsgateway_operator_reconciles_total", gateway="gw", outcome="success")

        await eventually(lambda: _at_least(reconciled(), 1), what="a successful reconcile on /metrics")
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, output.decode()[-2000:]
    assert f"serving the operator's metrics on http://127.0.0.1:{port}/metrics" in output.decode()


async def _at_least(value: Awaitable[float], n: float) -> bool:
    return await value >= n
