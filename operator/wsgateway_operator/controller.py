"""The reconcile, refresh and finalize steps behind the kopf handlers (handlers.py stays thin).

One WebSocketGateway is reconciled by one coroutine at a time (a lock per uid): the change handlers and
the periodic refresh both call `reconcile`, and a refresh must not re-apply a spec an update handler is
replacing at that moment.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from wsgateway_operator.apply import drift_patch, owned_by
from wsgateway_operator.builders import (
    Owner,
    build_children,
    jetstream_plan,
    label_selector,
    selector_labels,
    unwanted_kinds,
)
from wsgateway_operator.kube import CHILD_REFS, PODS, SECRETS, ApiError, KubeClient
from wsgateway_operator.metrics import DEFAULT_PORT, OperatorMetrics
from wsgateway_operator.natsops import (
    JetStreamReport,
    NatsProblem,
    cleanup_consumers,
    delete_jetstream,
    ensure_jetstream,
    jetstream,
)
from wsgateway_operator.scrape import ScrapeResult, scrape_connections
from wsgateway_operator.spec import WebSocketGatewaySpec, check_name
from wsgateway_operator.status import Observation, build_status

log = logging.getLogger(__name__)

SKIP_NATS_CLEANUP = "wsgateway.dev/skip-nats-cleanup"

# APIs that may be absent from a cluster: (group/version path, plural).
MONITORING_API = ("/apis/monitoring.coreos.com/v1", "servicemonitors")
KEDA_API = ("/apis/keda.sh/v1alpha1", "scaledobjects")
OPTIONAL_KINDS = {
    "ScaledObject": KEDA_API,
    "ServiceMonitor": MONITORING_API,
    "PrometheusRule": ("/apis/monitoring.coreos.com/v1", "prometheusrules"),
}


# OperatorConfig field -> the environment variable that sets it (operator/README.md lists them).
OPERATOR_ENV = {
    "resync_seconds": "WSGATEWAY_OPERATOR_RESYNC_S",
    "scrape_timeout": "WSGATEWAY_OPERATOR_SCRAPE_TIMEOUT_S",
    "nats_timeout": "WSGATEWAY_OPERATOR_NATS_TIMEOUT_S",
    "retry_base_seconds": "WSGATEWAY_OPERATOR_RETRY_BASE_S",
    "retry_max_seconds": "WSGATEWAY_OPERATOR_RETRY_MAX_S",
    "metrics_port": "WSGATEWAY_OPERATOR_METRICS_PORT",
    "metrics_host": "WSGATEWAY_OPERATOR_METRICS_HOST",
}


class OperatorConfig(BaseModel):
    """Operator tunables; `from_env` reads WSGATEWAY_OPERATOR_* (tests use short intervals)."""

    resync_seconds: float = 30.0  # drift correction and status refresh period
    scrape_timeout: float = 2.0  # per pod /metrics request
    nats_timeout: float = 3.0  # connect and per JetStream request
    retry_base_seconds: float = 2.0  # first retry after a failure; doubles up to retry_max_seconds
    retry_max_seconds: float = 60.0
    drain_poll_seconds: float = 5.0  # finalizer: how often to look whether the pods are gone
    api_cache_seconds: float = 60.0  # how long API discovery (Prometheus Operator, KEDA) is trusted
    metrics_port: int = Field(DEFAULT_PORT, ge=0, le=65535)  # the operator's /metrics; 0: not served
    metrics_host: str = "0.0.0.0"
    # kopf's cluster scanning (listing and watching namespaces and CRDs). `wsgateway operator` turns it
    # off when it serves named namespaces only: the chart's namespaced Roles grant no cluster-wide
    # namespace listing, and kopf retried that 403 for about a minute before serving anything.
    cluster_scanning: bool = True

    @classmethod
    def from_env(cls) -> OperatorConfig:
        values = {f: os.environ[v] for f, v in OPERATOR_ENV.items() if os.environ.get(v)}
        return cls.model_validate(values)

    def backoff(self, retry: int) -> float:
        return float(min(self.retry_max_seconds, self.retry_base_seconds * (2 ** max(0, retry))))


class ApplyReport(BaseModel):
    created: list[str] = []
    updated: list[str] = []
    deleted: list[str] = []
    errors: list[str] = []
    managed: list[str] = []  # kinds of the children in place and owned (created, patched or as they were)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


class ReconcileResult(BaseModel):
    status: dict[str, Any]
    spec_error: str | None = None
    nats_problem: NatsProblemInfo | None = None
    applied: ApplyReport = ApplyReport()
    jetstream: JetStreamReport | None = None
    desired_replicas: int | None = None  # the Deployment's spec.replicas (the autoscaler's choice)

    @property
    def error_reasons(self) -> list[str]:
        """Why this reconcile counts as an error (wsgateway_operator_reconcile_errors_total's reasons)."""
        reasons = []
        if self.spec_error:
            reasons.append("invalid_spec")
        if self.nats_problem is not None:
            reasons.append("nats")
        if self.applied.errors:
            reasons.append("children")
        return reasons


class NatsProblemInfo(BaseModel):
    reason: str
    message: str


ReconcileResult.model_rebuild()


class Controller:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.kube: KubeClient | None = None
        self.closing = False  # set by close(): no reconcile or finalizer pass starts any more
        self._locks: dict[str, asyncio.Lock] = {}
        self._api_cache: dict[str, tuple[float, bool]] = {}
        self.metrics = OperatorMetrics()

    # --- helpers ---------------------------------------------------------------------------------

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str, *, namespace: str | None = None, name: str | None = None) -> None:
        """The gateway is gone: drop its lock and (given its namespace and name) its metric series."""
        self._locks.pop(uid, None)
        if namespace is not None and name is not None:
            self.metrics.forget(namespace, name)

    async def close(self) -> None:
        """Stop (kopf's cleanup): no reconcile or finalizer pass starts any more, the ones running end,
        then the client is closed. kopf runs its cleanup while a timer's reconcile may still be running
        (and may start one after it): closing the client under it failed that reconcile."""
        self.closing = True
        for lock in list(self._locks.values()):
            async with lock:  # every pass holds its gateway's lock; later ones see `closing`
                pass
        if self.kube is not None:
            await self.kube.aclose()
            self.kube = None

    @property
    def api(self) -> KubeClient:
        if self.kube is None:
            raise RuntimeError("not logged in to the Kubernetes API yet")
        return self.kube

    async def api_served(self, api: tuple[str, str]) -> bool:
        path, plural = api
        key = f"{path}/{plural}"
        cached = self._api_cache.get(key)
        if cached and time.monotonic() - cached[0] < self.config.api_cache_seconds:
            return cached[1]
        try:
            served = plural in await self.api.served_resources(path)
        except ApiError:
            served = False
        self._api_cache[key] = (time.monotonic(), served)
        return served

    async def nats_credentials(self, owner: Owner, spec: WebSocketGatewaySpec) -> str | None:
        """The .creds text from spec.nats.credentialsSecret (the operator uses the pods' identity)."""
        ref = spec.nats.credentials_secret
        if ref is None:
            return None
        secret = await self.api.get(SECRETS, owner.namespace, ref.name)
        if secret is None:
            raise NatsProblem("CredentialsSecretMissing",
                              f"Secret {owner.namespace}/{ref.name} (spec.nats.credentialsSecret) does not exist")
        raw = (secret.get("data") or {}).get(ref.key)
        if raw is None:
            raise NatsProblem("CredentialsSecretMissing",
                              f"Secret {owner.namespace}/{ref.name} has no key {ref.key!r} "
                              "(spec.nats.credentialsSecret.key)")
        return base64.b64decode(raw).decode()

    # --- children --------------------------------------------------------------------------------

    async def apply_children(self, owner: Owner, spec: WebSocketGatewaySpec) -> ApplyReport:
        """Create missing children, patch drifted ones, delete ones the spec no longer wants.

        Objects with the right name but without this gateway's controller reference are never touched:
        they are reported (Degraded) for the admin to resolve.
        """
        report = ApplyReport()
        monitoring = await self.api_served(MONITORING_API)
        children = build_children(owner, spec, monitoring_api=monitoring)
        bounds = (spec.replicas.min, spec.replicas.max)
        for child in children:
            kind, name = child["kind"], child["metadata"]["name"]
            ref = CHILD_REFS[kind]
            if kind in OPTIONAL_KINDS and not await self.api_served(OPTIONAL_KINDS[kind]):
                fix = ("install KEDA (https://keda.sh) or set spec.autoscaling.mode to hpa" if kind == "ScaledObject"
                       else "install the Prometheus Operator or turn it off in spec.observability")
                report.errors.append(f"{kind}: {ref.api_version} is not served by this cluster; {fix}")
                continue
            try:
                live = await self.api.get(ref, owner.namespace, name)
                if live is None:
                    await self.api.create(ref, owner.namespace, child)
                    report.created.append(f"{kind}/{name}")
                    report.managed.append(kind)
                elif not owned_by(live, owner.uid):
                    report.errors.append(
                        f"{kind} {owner.namespace}/{name} exists but does not belong to this WebSocketGateway: "
                        "delete or rename it (the operator never takes over foreign objects)"
                    )
                else:
                    patch = drift_patch(kind, child, live, replica_bounds=bounds)
                    if patch is not None:
                        await self.api.patch(ref, owner.namespace, name, patch)
                        report.updated.append(f"{kind}/{name}")
                    report.managed.append(kind)
            except ApiError as exc:
                report.errors.append(f"{kind} {owner.namespace}/{name}: {exc.reason}: {exc.message}")
        for kind in unwanted_kinds(children):
            if kind in OPTIONAL_KINDS and not await self.api_served(OPTIONAL_KINDS[kind]):
                continue
            ref = CHILD_REFS[kind]
            try:
                live = await self.api.get(ref, owner.namespace, owner.name)
                if live is not None and owned_by(live, owner.uid):
                    await self.api.delete(ref, owner.namespace, owner.name)
                    report.deleted.append(f"{kind}/{owner.name}")
            except ApiError as exc:
                report.errors.append(f"{kind} {owner.namespace}/{owner.name}: {exc.reason}: {exc.message}")
        return report

    async def gateway_pods(self, owner: Owner) -> list[dict[str, Any]]:
        pods = await self.api.list(PODS, owner.namespace, label_selector(owner))
        want = selector_labels(owner)
        return [p for p in pods if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v
                                       for k, v in want.items())]

    # --- the reconcile ---------------------------------------------------------------------------

    async def reconcile(
        self, *, name: str, namespace: str, uid: str, generation: int | None, spec: dict[str, Any],
        status: dict[str, Any] | None, deleting: Callable[[], bool] = lambda: False, trigger: str = "change",
    ) -> ReconcileResult | None:
        """Children, JetStream and status for one gateway; never raises for NATS or child problems
        (they are in the result and the status), only for the unexpected.

        None when the gateway is being deleted: checked under the lock the finalizer also takes, so a
        periodic refresh can never re-create what the finalizer just removed. Every reconcile that ran
        is counted in the operator's metrics (`trigger`: change or refresh).
        """
        async with self._lock(uid):
            if deleting() or self.closing:
                return None
            started = time.perf_counter()
            try:
                result = await self._reconcile(name, namespace, uid, generation, spec, status)
            except Exception:
                self.metrics.reconciled(namespace, name, trigger=trigger, seconds=time.perf_counter() - started,
                                        errors=["exception"])
                raise
            self.metrics.reconciled(
                namespace, name, trigger=trigger, seconds=time.perf_counter() - started,
                errors=result.error_reasons, status=result.status, desired_replicas=result.desired_replicas,
                managed=None if result.spec_error else result.applied.managed,
            )
            return result

    async def _reconcile(
        self, name: str, namespace: str, uid: str, generation: int | None, raw_spec: dict[str, Any],
        status: dict[str, Any] | None,
    ) -> ReconcileResult:
        owner = Owner(name=name, namespace=namespace, uid=uid)
        obs = Observation(
            name=name, namespace=namespace, generation=generation, scrape_timeout=self.config.scrape_timeout
        )
        try:
            check_name(name)
            spec = WebSocketGatewaySpec.model_validate(raw_spec)
        except (ValidationError, ValueError) as exc:
            obs.spec_error = _spec_error_text(exc)
            deployment = await self.api.get(CHILD_REFS["Deployment"], namespace, name)
            obs.deployment = deployment if deployment and owned_by(deployment, uid) else None
            return ReconcileResult(status=build_status(obs, status), spec_error=obs.spec_error)

        obs.min_replicas = spec.replicas.min
        plan = jetstream_plan(owner, spec)
        obs.stream, obs.acl_bucket = plan.stream.name, plan.bucket.name

        applied = await self.apply_children(owner, spec)
        obs.apply_errors = applied.errors
        for change, items in (("created", applied.created), ("updated", applied.updated),
                              ("deleted", applied.deleted)):
            if items:
                log.info("%s/%s: %s %s", namespace, name, change, ", ".join(items))

        report: JetStreamReport | None = None
        problem: NatsProblemInfo | None = None
        try:
            creds = await self.nats_credentials(owner, spec)
            async with jetstream(spec.nats.urls, creds, timeout=self.config.nats_timeout) as js:
                report = await ensure_jetstream(js, plan)
            obs.nats_warnings = report.warnings
        except NatsProblem as exc:
            problem = NatsProblemInfo(reason=exc.reason, message=exc.message)
            obs.nats_reason, obs.nats_message = exc.reason, exc.message
        except ApiError as exc:
            problem = NatsProblemInfo(reason="CredentialsUnreadable", message=f"cannot read the credentials: {exc}")
            obs.nats_reason, obs.nats_message = problem.reason, problem.message

        deployment = await self.api.get(CHILD_REFS["Deployment"], namespace, name)
        obs.deployment = deployment if deployment and owned_by(deployment, uid) else None
        if spec.autoscaling.mode == "hpa":
            hpa = await self.api.get(CHILD_REFS["HorizontalPodAutoscaler"], namespace, name)
            obs.autoscaler = hpa if hpa and owned_by(hpa, uid) else None
        try:
            pods = await self.gateway_pods(owner)
        except ApiError as exc:
            log.warning("%s/%s: cannot list pods: %s", namespace, name, exc)
            obs.scrape = ScrapeResult()
        else:
            pending = [p for p in pods if (p.get("status") or {}).get("phase") == "Pending"
                       and not (p.get("metadata") or {}).get("deletionTimestamp")]
            obs.pods_pending = len(pending)
            obs.pods_unscheduled = sum(1 for p in pending if not (p.get("spec") or {}).get("nodeName"))
            obs.scrape = await scrape_connections(pods, timeout=self.config.scrape_timeout)
        desired = ((obs.deployment or {}).get("spec") or {}).get("replicas")
        return ReconcileResult(
            status=build_status(obs, status), nats_problem=problem, applied=applied, jetstream=report,
            desired_replicas=int(desired) if desired is not None else None,
        )

    # --- deletion --------------------------------------------------------------------------------

    async def finalize(
        self, *, name: str, namespace: str, uid: str, spec: dict[str, Any], annotations: dict[str, str],
        stream_shared_with: list[str],
    ) -> FinalizeStep:
        """One pass of the finalizer. Order matters: stop the autoscaler and the Deployment first (the
        pods would re-create their consumers), wait until the pods are gone (they drain their clients),
        then clean JetStream. Returns what is still pending, if anything (the handler retries)."""
        async with self._lock(uid):
            if self.closing:
                return FinalizeStep(pending="the operator is stopping; its next start finishes the deletion")
            return await self._finalize(name, namespace, uid, spec, annotations, stream_shared_with)

    async def _finalize(
        self, name: str, namespace: str, uid: str, spec: dict[str, Any], annotations: dict[str, str],
        stream_shared_with: list[str],
    ) -> FinalizeStep:
        owner = Owner(name=name, namespace=namespace, uid=uid)
        try:
            parsed = WebSocketGatewaySpec.model_validate(spec)
        except ValidationError:
            return FinalizeStep(done=["spec invalid: nothing to clean in NATS"])
        step = FinalizeStep()
        for kind in ("ScaledObject", "HorizontalPodAutoscaler", "Deployment"):
            if kind in OPTIONAL_KINDS and not await self.api_served(OPTIONAL_KINDS[kind]):
                continue
            ref = CHILD_REFS[kind]
            live = await self.api.get(ref, namespace, name)
            if live is not None and owned_by(live, uid) and not (live.get("metadata") or {}).get("deletionTimestamp"):
                await self.api.delete(ref, namespace, name, propagation="Background")
                step.done.append(f"deleted {kind}/{name}")
        pods = await self.gateway_pods(owner)
        if pods:
            step.pending = f"waiting for {len(pods)} gateway pod(s) to drain their connections and stop"
            return step
        if annotations.get(SKIP_NATS_CLEANUP) == "true":
            step.done.append(f"NATS cleanup skipped ({SKIP_NATS_CLEANUP}=true)")
            return step
        plan = jetstream_plan(owner, parsed)
        if stream_shared_with:
            step.done.append(
                f"stream {plan.stream.name} is also used by {', '.join(sorted(stream_shared_with))}: "
                "its consumers, the stream and the ACL bucket are left in place"
            )
            return step
        try:
            try:
                creds = await self.nats_credentials(owner, parsed)
            except NatsProblem:
                creds = None  # e.g. the namespace is being deleted and the Secret went first: try without
            async with jetstream(parsed.nats.urls, creds, timeout=self.config.nats_timeout) as js:
                deleted = await cleanup_consumers(js, plan)
                step.done.append(f"deleted {len(deleted)} gateway consumer(s) on stream {plan.stream.name}")
                if plan.deletion_policy == "Delete":
                    gone = await delete_jetstream(js, plan)
                    step.done.append("deleted " + (", ".join(gone) or "nothing (already gone)"))
                else:
                    step.done.append(f"kept stream {plan.stream.name} and ACL bucket {plan.bucket.name} "
                                     "(deletionPolicy Retain)")
        except NatsProblem as exc:
            step.pending = (f"{exc.reason}: {exc.message} To delete without cleaning NATS, annotate the "
                            f"WebSocketGateway with {SKIP_NATS_CLEANUP}=true")
        return step


class FinalizeStep(BaseModel):
    done: list[str] = []
    pending: str | None = None


def _spec_error_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "spec"
            parts.append(f"spec.{where}: {err.get('msg')}" if where != "spec" else str(err.get("msg")))
        return "invalid spec: " + "; ".join(parts)
    return f"invalid resource: {exc}"
