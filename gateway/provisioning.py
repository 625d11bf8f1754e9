"""The JetStream resources a gateway needs, built in one place: the events stream, the ACL bucket and the
presence bucket.

Two programs create them: the gateway at start-up (`WSGATEWAY_CREATE_STREAM`, gateway/core/bus.py) and
the operator on every reconcile (operator/wsgateway_operator/natsops.py). Both build their configs with
`stream_config` / `bucket_config` and create through `ensure_stream` / `ensure_bucket`, so a stream or
bucket has the same shape whoever made it (duplicate window, storage, the bucket's history and
replicas), and a gateway and the operator (or two gateways) creating the same thing at the same
moment both succeed.

Kept light on purpose (nats-py only): the operator imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig, StreamInfo
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

# The Publisher sends every event with a Nats-Msg-Id; a retry inside this window is stored once
# (docs/events.md, "2-minute duplicate window").
DUPLICATE_WINDOW_S: Final = 120.0
ACL_BUCKET_HISTORY: Final = 1  # the hot path reads only the current document
ACL_BUCKET_DESCRIPTION: Final = "wsgateway ACL documents"
STREAM_NAME_IN_USE: Final = 10058  # JetStream API error code: a stream with that name exists (KV: its bucket)


def stream_config(
    name: str,
    subjects: Sequence[str],
    *,
    max_age_s: float,
    max_bytes: int,
    replicas: int,
    storage: StorageType = StorageType.FILE,
    description: str | None = None,
) -> StreamConfig:
    """The events stream: `subjects` (the gateway reads `<prefix>.>`), retention and replicas as given."""
    return StreamConfig(
        name=name,
        description=description,
        subjects=list(subjects),
        storage=storage,
        max_age=max_age_s,
        max_bytes=max_bytes,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def bucket_config(name: str, *, replicas: int) -> KeyValueConfig:
    """The ACL bucket: file storage, the current document of each key only, `replicas` like the stream."""
    return KeyValueConfig(
        bucket=name, history=ACL_BUCKET_HISTORY, replicas=replicas, storage=StorageType.FILE,
        description=ACL_BUCKET_DESCRIPTION,
    )


PRESENCE_BUCKET: Final = "wsgateway-presence"  # WSGATEWAY_PRESENCE_BUCKET's default (the operator creates this one)
PRESENCE_BUCKET_DESCRIPTION: Final = "wsgateway presence: watchers per instance and scope, instance heartbeats"


def presence_bucket_config(name: str, *, replicas: int) -> KeyValueConfig:
    """The presence bucket: memory storage (volatile by nature: every instance writes its part again after a
    reconnect), the current value of each key only, `replicas` like the stream. No TTL: the instances
    themselves remove a dead instance's keys (gateway/core/presence_kv.py)."""
    return KeyValueConfig(
        bucket=name, history=1, replicas=replicas, storage=StorageType.MEMORY, description=PRESENCE_BUCKET_DESCRIPTION,
    )


def stream_differences(live: StreamConfig, want: StreamConfig) -> list[str]:
    """What an existing stream's config changes to become `want` (empty: nothing), for logs and updates.

    Compares what `stream_config` sets, except the storage type, which JetStream cannot change in place."""
    diffs = []
    if sorted(live.subjects or []) != sorted(want.subjects or []):
        diffs.append(f"subjects {live.subjects} -> {want.subjects}")
    if abs(float(live.max_age or 0) - float(want.max_age or 0)) > 0.001:
        diffs.append(f"max_age {live.max_age}s -> {want.max_age}s")
    if (live.max_bytes if live.max_bytes is not None else -1) != (want.max_bytes if want.max_bytes is not None else -1):
        diffs.append(f"max_bytes {live.max_bytes} -> {want.max_bytes}")
    if (live.num_replicas or 1) != (want.num_replicas or 1):
        diffs.append(f"replicas {live.num_replicas} -> {want.num_replicas}")
    if abs(float(live.duplicate_window or 0) - float(want.duplicate_window or 0)) > 0.001:
        diffs.append(f"duplicate_window {live.duplicate_window}s -> {want.duplicate_window}s")
    if (live.description or "") != (want.description or ""):
        diffs.append("description")
    return diffs


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, create: bool = True) -> tuple[StreamInfo, bool]:
    """The stream named by `config`, created from it when missing: ``(info, created)``.

    An existing stream is returned as it is (compare with `stream_differences`). Raises nats-py's
    NotFoundError when it is missing and `create` is false, APIError when JetStream refuses it."""
    if config.name is None:
        raise ValueError("a stream config needs a name")
    try:
        return await js.stream_info(config.name), False
    except NotFoundError:
        if not create:
            raise
    try:
        return await js.add_stream(config), True
    except APIError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    return await js.stream_info(config.name), False  # created meanwhile by another gateway or the operator


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig, *, create: bool = True) -> tuple[KeyValue, bool]:
    """The key-value bucket named by `config`, created from it when missing: ``(bucket, created)``.

    Raises BucketNotFoundError when it is missing and `create` is false, APIError when JetStream refuses it."""
    try:
        return await js.key_value(config.bucket), False
    except BucketNotFoundError:
        if not create:
            raise
    try:
        return await js.create_key_value(config), True
    except APIError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    return await js.key_value(config.bucket), False  # created meanwhile


async def open_bucket(js: JetStreamContext, config: KeyValueConfig, *, create: bool, what: str) -> KeyValue:
    """The gateway's side of `ensure_bucket`: the bucket, created (and logged) when missing and allowed; a
    clear RuntimeError naming `what` (e.g. "ACL bucket") when it is missing and creation is disabled."""
    try:
        kv, created = await ensure_bucket(js, config, create=create)
    except BucketNotFoundError:
        raise RuntimeError(f"{what} {config.bucket!r} does not exist and stream creation is disabled") from None
    if created:
        log.info("created %s %s", what, config.bucket)
    return kv
