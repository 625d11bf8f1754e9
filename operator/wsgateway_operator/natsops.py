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
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from pydantic import BaseModel

from wsgateway_operator.builders import JetStreamPlan, is_gateway_consumer

log = logging.getLogger(__name__)


STREAM_NAME_IN_USE = 10058  # JetStream API error code: a stream with that name exists


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
    return StreamConfig(
        name=s.name,
        description=s.description,
        subjects=list(s.subjects),
        storage=storage or StorageType(s.storage),
        max_age=s.max_age_seconds,
        max_bytes=s.max_bytes,
        num_replicas=s.replicas,
        duplicate_window=s.duplicate_window_seconds,
    )


def _stream_differs(live: StreamConfig, plan: JetStreamPlan) -> list[str]:
    s = plan.stream
    diffs = []
    if sorted(live.subjects or []) != sorted(s.subjects):
        diffs.append(f"subjects {live.subjects} -> {list(s.subjects)}")
    if abs(float(live.max_age or 0) - s.max_age_seconds) > 0.001:
        diffs.append(f"max_age {live.max_age}s -> {s.max_age_seconds}s")
    if int(live.max_bytes if live.max_bytes is not None else -1) != s.max_bytes:
        diffs.append(f"max_bytes {live.max_bytes} -> {s.max_bytes}")
    if int(live.num_replicas or 1) != s.replicas:
        diffs.append(f"replicas {live.num_replicas} -> {s.replicas}")
    if abs(float(live.duplicate_window or 0) - s.duplicate_window_seconds) > 0.001:
        diffs.append(f"duplicate_window {live.duplicate_window}s -> {s.duplicate_window_seconds}s")
    if (live.description or "") != s.description:
        diffs.append("description")
    return diffs


async def ensure_jetstream(js: JetStreamContext, plan: JetStreamPlan) -> JetStreamReport:
    """Create the stream and the ACL bucket when missing; bring the stream's config to the plan.

    Idempotent: a second call only reads. The storage type cannot change in place (the CRD forbids the
    change too); a mismatch is reported as a warning and everything else is still updated.
    """
    name = plan.stream.name
    warnings: list[str] = []
    try:
        stream_state: Literal["created", "updated", "unchanged"] = "created"
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await js.add_stream(_stream_config(plan))
                log.info("created JetStream stream %s on %s", name, list(plan.stream.subjects))
                info = None
            except APIError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
                info = await js.stream_info(name)  # created meanwhile (another gateway on the stream)
        if info is not None:
            live = info.config
            live_storage = StorageType(live.storage) if live.storage else StorageType.FILE
            if live_storage.value != plan.stream.storage:
                warnings.append(
                    f"stream {name} uses {live_storage.value} storage but spec.nats.stream.storage is "
                    f"{plan.stream.storage}; JetStream cannot change it in place (keep the old value, or move "
                    "the data to a new stream)"
                )
            diffs = _stream_differs(live, plan)
            if diffs:
                await js.update_stream(_stream_config(plan, storage=live_storage))
                log.info("updated JetStream stream %s: %s", name, "; ".join(diffs))
                stream_state = "updated"
            else:
                stream_state = "unchanged"
    except APIError as exc:
        raise NatsProblem(
            "StreamRejected",
            f"JetStream rejected stream {name!r}: {exc.description or exc}. Check spec.nats.stream "
            "(subjects overlapping another stream, more replicas than NATS servers, account limits).",
        ) from exc
    bucket_state: Literal["created", "unchanged"] = "unchanged"
    try:
        await js.key_value(plan.bucket.name)
    except BucketNotFoundError:
        try:
            await js.create_key_value(KeyValueConfig(
                bucket=plan.bucket.name, history=plan.bucket.history, replicas=plan.bucket.replicas,
                storage=StorageType.FILE, description="wsgateway ACL documents",
            ))
        except APIError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:  # else: created meanwhile by a gateway sharing it
                raise NatsProblem(
                    "BucketRejected", f"JetStream rejected ACL bucket {plan.bucket.name!r}: {exc.description or exc}"
                ) from exc
        else:
            log.info("created ACL bucket %s", plan.bucket.name)
            bucket_state = "created"
    return JetStreamReport(stream=stream_state, bucket=bucket_state, warnings=warnings)


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
    """deletionPolicy Delete: remove the ACL bucket and the stream (events and ACLs are gone)."""
    gone = []
    with contextlib.suppress(NotFoundError, BucketNotFoundError):
        await js.delete_key_value(plan.bucket.name)
        gone.append(f"bucket {plan.bucket.name}")
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(plan.stream.name)
        gone.append(f"stream {plan.stream.name}")
    return gone
