"""wsgateway operator: WebSocketGateway custom resources reconciled into running, autoscaled gateways.

The package is `wsgateway_operator`, shipped from the repository's `operator/` directory. It is never
importable as `operator`: that name belongs to the standard library, and `operator/` deliberately has
no `__init__.py`.

Layout (pure modules first, I/O last):
  spec.py      pydantic models of the resource: the one source of truth for the CRD and the operator
  crd.py       the CustomResourceDefinition generated from spec.py (`python -m wsgateway_operator.crd`)
  generated.py writing or staleness-checking committed generated files (CRD, alert rules, dashboards)
  alerts.py    the alert rules (one source for the PrometheusRule and dashboards/prometheus/)
  builders.py  pure functions: (name, namespace, uid, spec) -> Kubernetes manifests, JetStream plan
  apply.py     pure drift detection and merge patches for idempotent get/create/patch apply
  status.py    pure status/conditions from observations
  kube.py      a small async Kubernetes REST client (httpx)
  natsops.py   JetStream stream, ACL bucket and consumer operations (nats-py)
  scrape.py    reads `wsgateway_connections` from the gateway pods' /metrics
  metrics.py   the operator's own Prometheus metrics and their /metrics endpoint (aiohttp)
  controller.py  reconcile / refresh / finalize steps (one gateway at a time)
  handlers.py  thin kopf handlers wiring it all together
  cli.py       `wsgateway operator ...`
"""

from __future__ import annotations

GROUP = "wsgateway.dev"
VERSION = "v1alpha1"
KIND = "WebSocketGateway"
PLURAL = "websocketgateways"
SINGULAR = "websocketgateway"
SHORT_NAMES = ("wsgw",)
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "wsgateway-operator"

__all__ = ["API_VERSION", "FIELD_MANAGER", "GROUP", "KIND", "PLURAL", "SHORT_NAMES", "SINGULAR", "VERSION"]
