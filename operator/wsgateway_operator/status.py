"""Pure status: observations in, the WebSocketGateway's status (with conditions) out.

Conditions follow Kubernetes conventions: a CamelCase reason, a message that says what is wrong and
what to do, and lastTransitionTime kept while the condition's status does not change (so a periodic
refresh that finds nothing new writes nothing).

  Ready        True when the gateway serves: NATS ready and at least replicas.min pods (or all wanted,
               if fewer) pass /readyz
  Progressing  True while a rollout runs (the Deployment controller has not caught up with the
               template, pods on an old template remain, or the new pods are not available yet, e.g.
               Pending because no node has room for them)
  NatsReady    True when the stream and the ACL bucket are in place and NATS answered
  Degraded     True when something is not as specified even if the gateway serves (pods not ready,
               children not applied, a stuck rollout, inactive autoscaling, unreachable /metrics)
"""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import BaseModel

from wsgateway_operator.scrape import ScrapeResult


class Observation(BaseModel):
    """What one reconcile saw."""

    name: str
    namespace: str
    generation: int | None = None
    spec_error: str | None = None
    min_replicas: int = 1
    deployment: dict[str, Any] | None = None
    autoscaler: dict[str, Any] | None = None  # the live HPA (mode hpa), for its ScalingActive condition
    apply_errors: list[str] = []
    nats_reason: str | None = None  # None: NATS is ready
    nats_message: str = ""
    nats_warnings: list[str] = []
    scrape: ScrapeResult | None = None
    pods_pending: int = 0  # gateway pods in phase Pending (not started on a node yet)
    pods_unscheduled: int = 0  # ... of which no node was assigned (no scheduler, or no node has room)
    scrape_timeout: float = 2.0
    stream: str | None = None
    acl_bucket: str | None = None
    terminating: str | None = None  # set while the finalizer waits (message)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(type_: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def _deployment_numbers(d: dict[str, Any] | None, fallback: int) -> dict[str, Any]:
    if d is None:
        return {"desired": fallback, "replicas": 0, "ready": 0, "updated": 0, "available": 0, "rolled": False,
                "template_rolled": False, "stuck": None}
    st = d.get("status") or {}
    desired = int((d.get("spec") or {}).get("replicas", fallback) or 0)
    nums: dict[str, Any] = {
        "desired": desired,
        "replicas": int(st.get("replicas") or 0),
        "ready": int(st.get("readyReplicas") or 0),
        "updated": int(st.get("updatedReplicas") or 0),
        "available": int(st.get("availableReplicas") or 0),
    }
    observed = int(st.get("observedGeneration") or 0)
    generation = int((d.get("metadata") or {}).get("generation") or 0)
    progressing: dict[str, Any] = next(
        (c for c in st.get("conditions") or [] if c.get("type") == "Progressing"), {}
    )
    # The rollout is done (as `kubectl rollout status` sees it) when the controller saw the latest
    # spec, no old pods remain and the new ones are available; or when the Deployment controller said
    # so (NewReplicaSetAvailable): pods that became unready after that are Degraded, not Progressing.
    nums["template_rolled"] = (observed >= generation and nums["updated"] >= desired
                               and nums["replicas"] == nums["updated"])
    nums["rolled"] = nums["template_rolled"] and (
        nums["available"] >= nums["updated"] or progressing.get("reason") == "NewReplicaSetAvailable")
    stuck = progressing if progressing.get("reason") == "ProgressDeadlineExceeded" else None
    nums["stuck"] = stuck.get("message", "") if stuck else None
    return nums


def _pending_note(obs: Observation) -> str:
    """Why pods are not running yet, when they are Pending: said, not guessed away."""
    if not obs.pods_pending:
        return ""
    note = f"; {obs.pods_pending} Pending"
    if obs.pods_unscheduled:
        note += (f" ({obs.pods_unscheduled} not scheduled to a node: no node has room for them, "
                 "or no scheduler runs)")
    return note


def desired_conditions(obs: Observation) -> list[dict[str, str]]:
    """The four conditions (without times) for one observation."""
    pods_hint = (f"kubectl -n {obs.namespace} describe pods -l app.kubernetes.io/instance={obs.name} "
                 "(image pulls, crash loops; /readyz needs NATS, the stream, the ACL bucket and the JWKS)")
    n = _deployment_numbers(obs.deployment, obs.min_replicas)
    desired, ready = n["desired"], n["ready"]
    connections = obs.scrape.connections if obs.scrape else 0

    if obs.nats_reason:
        nats = _cond("NatsReady", False, obs.nats_reason, obs.nats_message)
    elif obs.spec_error:
        nats = _cond("NatsReady", False, "InvalidSpec", "not checked: the spec is invalid")
    else:
        nats = _cond("NatsReady", True, "StreamReady",
                     f"stream {obs.stream} and ACL bucket {obs.acl_bucket} are in place")

    if obs.deployment is None:
        progressing = _cond("Progressing", not obs.spec_error, "Creating" if not obs.spec_error else "InvalidSpec",
                            "creating the gateway's objects" if not obs.spec_error else "nothing to roll out")
    elif n["stuck"] is not None:
        progressing = _cond("Progressing", False, "ProgressDeadlineExceeded", n["stuck"])
    elif not n["template_rolled"]:
        progressing = _cond("Progressing", True, "RollingOut",
                            f"{n['updated']}/{desired} pods run the current template, {n['available']} available"
                            + _pending_note(obs))
    elif not n["rolled"]:
        progressing = _cond("Progressing", True, "WaitingForPods",
                            f"all {desired} pods run the current template, {n['available']} available"
                            + _pending_note(obs))
    else:
        progressing = _cond("Progressing", False, "RolloutComplete", f"all {desired} pods run the current template")

    if obs.terminating:
        ready_c = _cond("Ready", False, "Terminating", obs.terminating)
    elif obs.spec_error:
        ready_c = _cond("Ready", False, "InvalidSpec", obs.spec_error)
    elif obs.deployment is None:
        ready_c = _cond("Ready", False, "DeploymentMissing",
                        "the gateway Deployment does not exist yet: " + ("; ".join(obs.apply_errors) or "creating"))
    elif obs.nats_reason:
        ready_c = _cond("Ready", False, "NatsNotReady", f"pods cannot serve until NATS is ready: {obs.nats_message}")
    elif ready == 0:
        ready_c = _cond("Ready", False, "NoReadyPods",
                        f"0 of {desired} pods are ready{_pending_note(obs)}: check {pods_hint}")
    elif ready < min(desired, obs.min_replicas):
        ready_c = _cond("Ready", False, "MinimumPodsUnavailable",
                        f"{ready} of {desired} pods are ready (replicas.min is {obs.min_replicas}): check {pods_hint}")
    else:
        ready_c = _cond("Ready", True, "Serving", f"{ready}/{desired} pods ready, {connections} connections")

    problems: list[tuple[str, str]] = []
    if obs.spec_error:
        problems.append(("InvalidSpec", obs.spec_error))
    if obs.apply_errors:
        problems.append(("ChildrenNotApplied", "; ".join(obs.apply_errors)))
    if obs.nats_reason:
        problems.append(("NatsNotReady", obs.nats_message))
    if obs.nats_warnings:
        problems.append(("StreamConfigMismatch", "; ".join(obs.nats_warnings)))
    if n["stuck"] is not None:
        problems.append(("RolloutStuck", f"the rollout exceeded its progress deadline: check {pods_hint}"))
    elif obs.deployment is not None and n["rolled"] and ready < desired:
        problems.append(("PodsNotReady", f"{desired - ready} of {desired} pods are not ready: check {pods_hint}"))
    inactive = _autoscaling_inactive(obs.autoscaler)
    if inactive:
        problems.append(("AutoscalingInactive", inactive))
    if obs.scrape and obs.scrape.failed:
        problems.append(("MetricsUnavailable",
                         f"/metrics of {', '.join(obs.scrape.failed)} did not answer within {obs.scrape_timeout:g}s; "
                         "status.connections counts the other pods"))
    if problems:
        degraded = _cond("Degraded", True, problems[0][0], " | ".join(m for _, m in problems))
    else:
        degraded = _cond("Degraded", False, "AsExpected", "")
    return [ready_c, progressing, nats, degraded]


def _autoscaling_inactive(hpa: dict[str, Any] | None) -> str | None:
    for c in ((hpa or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "ScalingActive" and c.get("status") == "False":
            return (f"the HorizontalPodAutoscaler cannot scale ({c.get('reason')}: {c.get('message', '')}); "
                    "is prometheus-adapter serving wsgateway_connections? "
                    "(operator/samples/prometheus-adapter-rule.yaml)")
    return None


def merge_conditions(
    previous: list[dict[str, Any]], new: list[dict[str, str]], *, now: str, generation: int | None
) -> list[dict[str, Any]]:
    """New conditions, keeping each one's lastTransitionTime while its status stays the same."""
    old = {c.get("type"): c for c in previous or []}
    out = []
    for c in new:
        before = old.get(c["type"])
        since = before.get("lastTransitionTime") if before and before.get("status") == c["status"] else None
        item: dict[str, Any] = {**c, "lastTransitionTime": since or now}
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out


def with_condition(
    previous: list[dict[str, Any]], condition: dict[str, str], *, generation: int | None, now: str | None = None
) -> list[dict[str, Any]]:
    """`previous` with one condition replaced (the others keep their values and times)."""
    others: list[dict[str, str]] = [{k: c[k] for k in ("type", "status", "reason", "message") if k in c}
              for c in previous if c.get("type") != condition["type"]]
    merged = merge_conditions(previous, [condition, *others], now=now or now_iso(), generation=generation)
    order = {t: i for i, t in enumerate(("Ready", "Progressing", "NatsReady", "Degraded"))}
    return sorted(merged, key=lambda c: order.get(c["type"], 9))


def build_status(obs: Observation, previous: dict[str, Any] | None, *, now: str | None = None) -> dict[str, Any]:
    """The whole status block (camelCase), ready for a merge patch of the status subresource."""
    previous = previous or {}
    n = _deployment_numbers(obs.deployment, obs.min_replicas)
    status: dict[str, Any] = {
        "observedGeneration": obs.generation if not obs.spec_error else previous.get("observedGeneration"),
        "replicas": n["replicas"],
        "readyReplicas": n["ready"],
        "updatedReplicas": n["updated"],
        "connections": obs.scrape.connections if obs.scrape else 0,
        "scrapedPods": obs.scrape.scraped if obs.scrape else 0,
        "stream": obs.stream,
        "aclBucket": obs.acl_bucket,
        "conditions": merge_conditions(
            previous.get("conditions") or [], desired_conditions(obs), now=now or now_iso(), generation=obs.generation
        ),
    }
    return {k: v for k, v in status.items() if v is not None}


def status_changed(previous: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing `new` would change anything the operator owns in the status."""
    previous = previous or {}
    return any(previous.get(k) != v for k, v in new.items())
