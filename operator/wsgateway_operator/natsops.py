"""The operator's JetStream work (nats-py): the events stream, the ACL bucket, and the pods' leftovers.

Each reconcile opens a short-lived connection (no reconnect loop), does its idempotent checks and
closes it, so an unreachable NATS costs one fast failure that becomes NatsReady=False and a kopf retry
with backoff, never a hung handler. Consumers: the gateway pods create their own (see
`builders.is_gateway_consumer`); the operator only removes what pods left behind when the gateway is
deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import nats
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from pydantic import BaseModel

from gateway import provisioning
from wsgateway_operator.builders import JetStreamPlan, is_gateway_consumer

log = logging.getLogger(__name__)


class NatsProblem(Exception):
    """Something about NATS the admin must act on; `reason` becomes the NatsReady condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class JetStreamReport(BaseModel):
    stream: Literal["created", "updated", "unchanged"]
    bucket: Literal["created", "unchanged"]
    warnings: list[str] = []


@contextlib.asynccontextmanager
async def jetstream(
    urls: list[str], credentials: str | None, *, timeout: float = 3.0
) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on a fresh connection that is closed afterwards; NatsProblem when unreachable."""
    last_error: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        last_error.append(exc)

    opts: dict[str, Any] = {}
    if credentials:
        opts["user_credentials"] = RawCredentials(credentials)
    try:
        nc: NATS = await asyncio.wait_for(
            nats.connect(
                servers=urls, name="wsgateway-operator", connect_timeout=timeout, allow_reconnect=False,
                max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=on_error, **opts,
            ),
            timeout=timeout * 2,
        )
    except (OSError, TimeoutError, NatsError) as exc:
        cause = last_error[-1] if last_error else exc
        text = f"{type(cause).__name__}: {cause}".rstrip(": ")
        reason = "NatsAuthFailed" if "authorization" in text.lower() else "NatsUnreachable"
        raise NatsProblem(
            reason,
            f"cannot connect to {', '.join(urls)} ({text}). Check spec.nats.urls, that the operator's "
            "namespace may reach NATS (network policies), and spec.nats.credentialsSecret.",
        ) from exc
    try:
        yield nc.jetstream(timeout=timeout)
    except NatsProblem:
        raise
    except APIError as exc:
        raise NatsProblem("JetStreamError", f"JetStream refused a request: {exc.description or exc}") from exc
    except (NatsError, TimeoutError, OSError) as exc:  # connected, but JetStream does not answer
        raise NatsProblem(
            "JetStreamUnavailable",
            f"NATS at {', '.join(urls)} does not answer JetStream requests ({type(exc).__name__}: {exc}). "
            "Enable JetStream on the servers (nats-server -js) and check the account's JetStream limits.",
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _stream_config(plan: JetStreamPlan, storage: StorageType | None = None) -> StreamConfig:
    s = plan.stream
    return provisioning.stream_config(
        s.name, s.subjects, max_age_s=s.max_age_seconds, max_bytes=s.max_bytes, replicas=s.replicas,
        storage=storage or StorageType(s.storage), description=s.description,
    )


async def ensure_jetstream(js: JetStreamContext, plan: JetStreamPlan) -> JetStreamReport:
    """Create the stream and the ACL bucket when missing; bring the stream's config to the plan.

    Idempotent: a second call only reads. The storage type cannot change in place (the CRD forbids the
    change too); a mismatch is reported as a warning and everything else is still updated. The configs
    are the gateway's own (gateway.provisioning), so a stream or bucket a gateway created is the same.
    """
    name = plan.stream.name
    warnings: list[str] = []
    stream_state: Literal["created", "updated", "unchanged"] = "unchanged"
    try:
        info, created = await provisioning.ensure_stream(js, _stream_config(plan))
        if created:
            log.info("created JetStream stream %s on %s", name, list(plan.stream.subjects))
            stream_state = "created"
        else:
            live = info.config
            live_storage = StorageType(live.storage) if live.storage else StorageType.FILE
            if live_storage.value != plan.stream.storage:
                warnings.append(
                    f"stream {name} uses {live_storage.value} storage but spec.nats.stream.storage is "
                    f"{plan.stream.storage}; JetStream cannot change it in place (keep the old value, or move "
                    "the data to a new stream)"
                )
            want = _stream_config(plan, storage=live_storage)
            diffs = provisioning.stream_differences(live, want)
            if diffs:
                await js.update_stream(want)
                log.info("updated JetStream stream %s: %s", name, "; ".join(diffs))
                stream_state = "updated"
    except APIError as exc:
        raise NatsProblem(
            "StreamRejected",
            f"JetStream rejected stream {name!r}: {exc.description or exc}. Check spec.nats.stream "
            "(subjects overlapping another stream, more replicas than NATS servers, account limits).",
        ) from exc
    try:
        _, bucket_created = await provisioning.ensure_bucket(
            js, provisioning.bucket_config(plan.bucket.name, replicas=plan.bucket.replicas)
        )
    except APIError as exc:
        raise NatsProblem(
            "BucketRejected", f"JetStream rejected ACL bucket {plan.bucket.name!r}: {exc.description or exc}"
        ) from exc
    if bucket_created:
        log.info("created ACL bucket %s", plan.bucket.name)
    try:  # the pods' presence bucket (WSGATEWAY_PRESENCE_BUCKET's default): they do not create it either
        _, presence_created = await provisioning.ensure_bucket(
            js, provisioning.presence_bucket_config(provisioning.PRESENCE_BUCKET, replicas=plan.bucket.replicas)
        )
    except APIError as exc:
        raise NatsProblem(
            "BucketRejected", f"JetStream rejected presence bucket {provisioning.PRESENCE_BUCKET!r}: "
            f"{exc.description or exc}"
        ) from exc
    if presence_created:
        log.info("created presence bucket %s", provisioning.PRESENCE_BUCKET)
    return JetStreamReport(stream=stream_state, bucket="created" if bucket_created else "unchanged", warnings=warnings)


def consumer_config(info: Any) -> dict[str, Any]:
    """A consumer's config as plain values (enums by value) for the pure `is_gateway_consumer`."""
    cfg = info.config
    ack = cfg.ack_policy
    return {
        "name": info.name,
        "durable_name": cfg.durable_name,
        "deliver_subject": cfg.deliver_subject,
        "ack_policy": getattr(ack, "value", ack),
        "filter_subject": cfg.filter_subject,
        "filter_subjects": list(cfg.filter_subjects or []),
        "flow_control": cfg.flow_control,
        "mem_storage": cfg.mem_storage,
    }


async def gateway_consumers(js: JetStreamContext, plan: JetStreamPlan) -> list[str]:
    """Names of the consumers on the stream that gateway pods created."""
    names: list[str] = []
    offset = 0
    while True:
        try:
            page = await js.consumers_info(plan.stream.name, offset=offset)
        except NotFoundError:
            return names
        names += [c.name for c in page if is_gateway_consumer(plan, consumer_config(c))]
        if len(page) < 256:
            return names
        offset += len(page)


async def cleanup_consumers(js: JetStreamContext, plan: JetStreamPlan) -> list[str]:
    """Delete what the gateway's pods left on the stream (their consumers otherwise linger up to their
    inactivity threshold, or forever if an old gateway version made them without one)."""
    deleted = []
    for name in await gateway_consumers(js, plan):
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(plan.stream.name, name)
            deleted.append(name)
    if deleted:
        log.info("deleted %d gateway consumer(s) on stream %s", len(deleted), plan.stream.name)
    return deleted


async def delete_jetstream(js: JetStreamContext, plan: JetStreamPlan) -> list[str]:
    """deletionPolicy Delete: remove the ACL bucket, the presence bucket and the stream (events and ACLs are gone)."""
    gone = []
    for bucket in (plan.bucket.name, provisioning.PRESENCE_BUCKET):
        with contextlib.suppress(NotFoundError, BucketNotFoundError):
            await js.delete_key_value(bucket)
            gone.append(f"bucket {bucket}")
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(plan.stream.name)
        gone.append(f"stream {plan.stream.name}")
    return gone
