"""Prometheus metrics of the operator itself: how its reconciles go and what it saw of each gateway.

Served over HTTP on their own port (`wsgateway operator --metrics-port`, default 9090; `0` turns the
endpoint off) by a small aiohttp server started with kopf (aiohttp comes with kopf). The Grafana
dashboard `dashboards/grafana/wsgateway-operator.json` reads them.

Label values are bounded: `namespace` and `gateway` name WebSocketGateway resources (one set of series
per gateway, removed when the gateway is deleted), every other label takes values from the fixed tuples
below. The per-gateway gauges are computed at scrape time from the last reconcile's observations.

The `namespace` label is the gateway's namespace, not the operator's: scrape with `honor_labels: true`
(the usual `prometheus.io/scrape` annotation job does; a ServiceMonitor or PodMonitor needs
`honorLabels: true`), or Prometheus renames it to `exported_namespace`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from aiohttp import web

DEFAULT_PORT = 9090

# What started a reconcile: a change of the resource (kopf's create, update and resume handlers), or the
# periodic refresh (drift correction and status, every WSGATEWAY_OPERATOR_RESYNC_S).
TRIGGERS = ("change", "refresh")
OUTCOMES = ("success", "error")
# Why a reconcile ended in `error` (one reconcile may count under several reasons):
#   invalid_spec  the spec failed validation (status Ready=False, InvalidSpec)
#   nats          the stream or the ACL bucket could not be ensured (NatsReady=False)
#   children      a child object could not be applied (Degraded, ChildrenNotApplied)
#   exception     the reconcile raised something unexpected (kopf retries it; see the operator's log)
ERROR_REASONS = ("invalid_spec", "nats", "children", "exception")
REPLICA_STATES = ("desired", "current", "ready", "updated")
CONDITION_TYPES = ("Ready", "Progressing", "NatsReady", "Degraded")
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricInfo(NamedTuple):
    """One exported metric, as docs/operations.md lists it (tests/test_docs.py checks the table)."""

    name: str  # as exposed (counters with _total)
    type: str
    labels: tuple[str, ...]
    help: str


GATEWAY = ("namespace", "gateway")
METRICS = (
    MetricInfo("wsgateway_operator_reconciles_total", "counter", (*GATEWAY, "trigger", "outcome"),
               "Reconciles of a WebSocketGateway by trigger and outcome."),
    MetricInfo("wsgateway_operator_reconcile_errors_total", "counter", (*GATEWAY, "reason"),
               "Reconciles that ended in error, by reason."),
    MetricInfo("wsgateway_operator_reconcile_duration_seconds", "histogram", GATEWAY,
               "Time one reconcile took (children, JetStream, pods' /metrics, status)."),
    MetricInfo("wsgateway_operator_managed_resources", "gauge", (*GATEWAY, "kind"),
               "Child objects of a gateway the operator keeps in place, by kind."),
    MetricInfo("wsgateway_operator_gateway_replicas", "gauge", (*GATEWAY, "state"),
               "Gateway pods: desired (the Deployment's replicas), current, ready, updated."),
    MetricInfo("wsgateway_operator_gateway_connections", "gauge", GATEWAY,
               "Open connections of a gateway (status.connections: the sum over its ready pods)."),
    MetricInfo("wsgateway_operator_gateway_condition", "gauge", (*GATEWAY, "type"),
               "1 while the gateway's status condition of this type is True, else 0."),
)
_INFO = {m.name: m for m in METRICS}


@dataclass
class GatewayObservation:
    """What the last reconcile of one gateway saw (exported by the collector below)."""

    replicas: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    conditions: dict[str, bool] = field(default_factory=dict)
    managed: list[str] = field(default_factory=list)


class _GatewayCollector(Collector):
    def __init__(self, gateways: dict[tuple[str, str], GatewayObservation]) -> None:
        self.gateways = gateways

    def _family(self, name: str) -> GaugeMetricFamily:
        info = _INFO[name]
        return GaugeMetricFamily(name, info.help, labels=info.labels)

    def describe(self) -> Iterator[Metric]:
        for info in METRICS:
            if info.type == "gauge":
                yield self._family(info.name)

    def collect(self) -> Iterator[Metric]:
        managed = self._family("wsgateway_operator_managed_resources")
        replicas = self._family("wsgateway_operator_gateway_replicas")
        connections = self._family("wsgateway_operator_gateway_connections")
        conditions = self._family("wsgateway_operator_gateway_condition")
        for (namespace, gateway), obs in sorted(self.gateways.items()):
            for kind in sorted(set(obs.managed)):
                managed.add_metric([namespace, gateway, kind], obs.managed.count(kind))
            for state in REPLICA_STATES:
                if state in obs.replicas:
                    replicas.add_metric([namespace, gateway, state], obs.replicas[state])
            connections.add_metric([namespace, gateway], obs.connections)
            for type_ in CONDITION_TYPES:
                if type_ in obs.conditions:
                    conditions.add_metric([namespace, gateway, type_], 1.0 if obs.conditions[type_] else 0.0)
        yield from (managed, replicas, connections, conditions)


class OperatorMetrics:
    """The operator's registry; one per Controller (tests run several operators in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        info = _INFO["wsgateway_operator_reconciles_total"]
        self.reconciles = Counter(info.name, info.help, info.labels, registry=self.registry)
        info = _INFO["wsgateway_operator_reconcile_errors_total"]
        self.errors = Counter(info.name, info.help, info.labels, registry=self.registry)
        info = _INFO["wsgateway_operator_reconcile_duration_seconds"]
        self.duration = Histogram(info.name, info.help, info.labels, buckets=DURATION_BUCKETS,
                                  registry=self.registry)
        self.gateways: dict[tuple[str, str], GatewayObservation] = {}
        self.registry.register(_GatewayCollector(self.gateways))
        self._known: set[tuple[str, str]] = set()

    def _create_series(self, namespace: str, gateway: str) -> None:
        """Every counter series of a gateway from its first reconcile, at 0: rates and alerts see them."""
        if (namespace, gateway) in self._known:
            return
        self._known.add((namespace, gateway))
        for trigger in TRIGGERS:
            for outcome in OUTCOMES:
                self.reconciles.labels(namespace, gateway, trigger, outcome)
        for reason in ERROR_REASONS:
            self.errors.labels(namespace, gateway, reason)
        self.duration.labels(namespace, gateway)

    def reconciled(
        self, namespace: str, gateway: str, *, trigger: str, seconds: float, errors: list[str],
        status: dict[str, Any] | None = None, desired_replicas: int | None = None,
        managed: list[str] | None = None,
    ) -> None:
        """Record one reconcile. `errors`: reasons from ERROR_REASONS (empty: success); `status`: the
        status it computed; `managed`: kinds of the children in place (None: not known this time)."""
        assert trigger in TRIGGERS and set(errors) <= set(ERROR_REASONS), (trigger, errors)
        self._create_series(namespace, gateway)
        self.reconciles.labels(namespace, gateway, trigger, "error" if errors else "success").inc()
        for reason in dict.fromkeys(errors):
            self.errors.labels(namespace, gateway, reason).inc()
        self.duration.labels(namespace, gateway).observe(seconds)
        obs = self.gateways.setdefault((namespace, gateway), GatewayObservation())
        if managed is not None:
            obs.managed = list(managed)
        if status is not None:
            obs.replicas = {
                "current": int(status.get("replicas") or 0),
                "ready": int(status.get("readyReplicas") or 0),
                "updated": int(status.get("updatedReplicas") or 0),
            }
            if desired_replicas is not None:
                obs.replicas["desired"] = desired_replicas
            obs.connections = int(status.get("connections") or 0)
            obs.conditions = {c["type"]: c.get("status") == "True" for c in status.get("conditions") or []
                              if c.get("type") in CONDITION_TYPES}

    def forget(self, namespace: str, gateway: str) -> None:
        """The gateway is gone: drop its series, so deleted gateways do not accumulate."""
        self.gateways.pop((namespace, gateway), None)
        if (namespace, gateway) not in self._known:
            return
        self._known.discard((namespace, gateway))
        for trigger in TRIGGERS:
            for outcome in OUTCOMES:
                with contextlib.suppress(KeyError):
                    self.reconciles.remove(namespace, gateway, trigger, outcome)
        for reason in ERROR_REASONS:
            with contextlib.suppress(KeyError):
                self.errors.remove(namespace, gateway, reason)
        with contextlib.suppress(KeyError):
            self.duration.remove(namespace, gateway)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: OperatorMetrics, host: str, port: int) -> web.AppRunner:
    """GET /metrics on host:port in the running loop (kopf's); stop with `await runner.cleanup()`."""
    from aiohttp import web

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
