"""Thin kopf handlers: wiring between kopf's events and the Controller (controller.py).

`register(registry, config)` installs everything into a kopf registry, so `wsgateway operator` and the
tests (kopf.testing.KopfRunner) run the very same handlers with their own settings:

  startup        kopf settings: progress and diff-base in annotations (the status stays ours), finalizer;
                 the operator's /metrics endpoint (metrics.py) when config.metrics_port is set
  login          service account in a pod, else kubeconfig; the operator's own client uses it too
  index          gateways by (NATS urls, stream): the finalizer must not clean a stream another uses
  create/update/resume
                 apply the children, ensure the stream and the ACL bucket, write the status; NATS
                 problems become NatsReady=False plus a kopf.TemporaryError with exponential backoff
  timer          every resync period: the same reconcile (drift is corrected, status refreshed)
  delete         the finalizer: autoscaler and Deployment first, wait for the pods, then JetStream
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from wsgateway_operator import GROUP, PLURAL, VERSION
from wsgateway_operator.controller import Controller, OperatorConfig, ReconcileResult
from wsgateway_operator.kube import KubeClient
from wsgateway_operator.metrics import serve as serve_metrics
from wsgateway_operator.status import status_changed, with_condition

FINALIZER = f"{GROUP}/finalizer"
RESOURCE = (GROUP, VERSION, PLURAL)


def _login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere (a developer, the tests): $KUBECONFIG or ~/.kube/config."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(settings=settings)
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)


def _stream_key(spec: dict[str, Any]) -> tuple[str, str]:
    nats = spec.get("nats") or {}
    urls = ",".join(sorted(nats.get("urls") or []))
    return urls, str((nats.get("stream") or {}).get("name") or "EVENTS")


def register(registry: kopf.OperatorRegistry, config: OperatorConfig | None = None) -> Controller:
    """Install the operator's handlers into `registry`; returns the controller they share."""
    config = config or OperatorConfig()
    ctrl = Controller(config)

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # Only warnings and errors become Events by themselves (kopf's routine "Timer succeeded" lines
        # would post an Event every resync); changes the operator made are posted explicitly below.
        settings.posting.level = logging.WARNING
        # On deletion kopf waits for a running refresh to return before the finalizer may finish; look
        # again every second rather than kopf's default minute.
        settings.background.cancellation_polling = 1.0
        # Named namespaces only: take them as they are instead of listing all namespaces (a 403 under
        # the chart's namespaced RBAC, retried by kopf for about a minute before it falls back).
        settings.scanning.disabled = not config.cluster_scanning

    metrics_server: list[Any] = []  # the aiohttp runner while it serves

    @kopf.on.startup(registry=registry, id="metrics")
    async def metrics(logger: kopf.Logger, **_: Any) -> None:
        if not config.metrics_port or metrics_server:
            return
        where = f"{config.metrics_host}:{config.metrics_port}"
        try:
            metrics_server.append(await serve_metrics(ctrl.metrics, config.metrics_host, config.metrics_port))
        except OSError as exc:  # e.g. the port is taken: say so and stop, rather than run unobserved
            raise kopf.PermanentError(f"cannot serve the operator's metrics on {where}: {exc} "
                                      "(--metrics-port / WSGATEWAY_OPERATOR_METRICS_PORT; 0 turns it off)") from exc
        logger.info("serving the operator's metrics on http://%s/metrics", where)

    @kopf.on.login(registry=registry, id="login")
    async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
        info = _login(settings)
        if info is not None:
            if ctrl.kube is not None:
                await ctrl.kube.aclose()

            async def relogin() -> kopf.ConnectionInfo | None:
                return _login(settings)

            ctrl.kube = KubeClient(info, relogin=relogin)
        return info

    @kopf.on.cleanup(registry=registry, id="close")
    async def close(**_: Any) -> None:
        await ctrl.close()
        while metrics_server:
            await metrics_server.pop().cleanup()

    @kopf.index(*RESOURCE, registry=registry, id="gateways_by_stream")
    def gateways_by_stream(
        name: str, namespace: str | None, spec: kopf.Spec, **_: Any
    ) -> dict[tuple[str, str], str]:
        return {_stream_key(dict(spec)): f"{namespace}/{name}"}

    async def reconcile(body: kopf.Body, patch: kopf.Patch, trigger: str) -> ReconcileResult | None:
        if ctrl.closing:  # the operator is stopping (a late timer tick after cleanup)
            return None
        meta = body.metadata
        result = await ctrl.reconcile(
            name=meta.name, namespace=meta.namespace or "", uid=meta.uid or "",
            generation=meta.get("generation"), spec=dict(body.spec), status=dict(body.status),
            deleting=lambda: bool(body.metadata.deletion_timestamp),  # the body is live in timers
            trigger=trigger,
        )
        if result is not None and status_changed(dict(body.status), result.status):
            for key, value in result.status.items():
                patch.status[key] = value
        return result

    @kopf.on.resume(*RESOURCE, registry=registry, id="apply")
    @kopf.on.create(*RESOURCE, registry=registry, id="apply")
    @kopf.on.update(*RESOURCE, registry=registry, id="apply")
    async def apply(body: kopf.Body, patch: kopf.Patch, retry: int, logger: kopf.Logger, **_: Any) -> None:
        result = await reconcile(body, patch, "change")
        if result is None:
            return
        if result.applied.changed:
            summary = ", ".join(
                [f"created {c}" for c in result.applied.created] + [f"updated {c}" for c in result.applied.updated]
                + [f"deleted {c}" for c in result.applied.deleted])
            logger.info("applied: %s", summary)
            kopf.event(body, type="Normal", reason="Applied", message=summary)
        # Failures become Warning Events with the condition's reason (kopf 1.45 posts nothing from its
        # log by default, and would post handler failures as type "Error", which Kubernetes does not
        # know); then the retry with backoff.
        if result.spec_error:
            kopf.warn(body, reason="InvalidSpec", message=result.spec_error)
            raise kopf.PermanentError(result.spec_error)
        if result.applied.errors:
            kopf.warn(body, reason="ChildrenNotApplied", message="; ".join(result.applied.errors))
        if result.nats_problem is not None:
            kopf.warn(body, reason=result.nats_problem.reason, message=result.nats_problem.message)
            raise kopf.TemporaryError(
                f"NatsReady=False ({result.nats_problem.reason}): {result.nats_problem.message}",
                delay=config.backoff(retry),
            )
        if result.applied.errors:
            raise kopf.TemporaryError("; ".join(result.applied.errors), delay=config.backoff(retry))

    @kopf.timer(
        *RESOURCE, registry=registry, id="refresh", interval=config.resync_seconds,
        initial_delay=config.resync_seconds,
    )
    async def refresh(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
        result = await reconcile(body, patch, "refresh")
        if result is not None and result.applied.changed:
            summary = ", ".join(
                [f"re-created {c}" for c in result.applied.created] + [f"restored {c}" for c in result.applied.updated]
                + [f"deleted {c}" for c in result.applied.deleted])
            logger.warning("corrected drift: %s", summary)
            kopf.warn(body, reason="DriftCorrected", message=summary)

    @kopf.on.delete(*RESOURCE, registry=registry, id="finalize")
    async def finalize(
        body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **kwargs: Any
    ) -> None:
        # kopf passes every index as a keyword named by its id; kopf's handler protocols cannot name it.
        gateways_by_stream: kopf.Index[tuple[str, str], str] = kwargs["gateways_by_stream"]
        meta = body.metadata
        me = f"{meta.namespace}/{meta.name}"
        others = [g for g in gateways_by_stream.get(_stream_key(dict(body.spec)), []) if g != me]
        step = await ctrl.finalize(
            name=meta.name, namespace=meta.namespace or "", uid=meta.uid or "", spec=dict(body.spec),
            annotations=dict(meta.annotations), stream_shared_with=others,
        )
        for line in step.done:
            logger.info("deletion: %s", line)
            kopf.event(body, type="Normal", reason="Deleting", message=line)
        if step.pending:
            previous = list(dict(body.status).get("conditions") or [])
            patch.status["conditions"] = with_condition(
                previous, {"type": "Ready", "status": "False", "reason": "Terminating", "message": step.pending},
                generation=meta.get("generation"),
            )
            raise kopf.TemporaryError(step.pending, delay=config.drain_poll_seconds)
        ctrl.forget(meta.uid or "", namespace=meta.namespace or "", name=meta.name or "")

    return ctrl
