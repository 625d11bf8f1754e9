"""JetStream operations against a real nats-server (a NatsProcess on a free port, never the shared one)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from gateway.config import Settings
from gateway.devtools.natsproc import NatsProcess
from wsgateway_operator.builders import Owner, jetstream_plan
from wsgateway_operator.natsops import (
    NatsProblem,
    cleanup_consumers,
    delete_jetstream,
    ensure_jetstream,
    gateway_consumers,
    jetstream,
)
from wsgateway_operator.spec import WebSocketGatewaySpec

OWNER = Owner(name="gw", namespace="realtime", uid="u-1")


def plan_for(url: str, **nats_spec: Any) -> Any:
    spec = WebSocketGatewaySpec.model_validate({
        "image": "img", "auth": {"issuer": "https://idp"}, "nats": {"urls": [url], **nats_spec},
    })
    return jetstream_plan(OWNER, spec)


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


async def leave_gateway_consumers(url: str, prefix: str = "events", stream: str = "EVENTS") -> None:
    """What a gateway pod that was killed leaves behind: its live ordered consumer (as gateway/core/bus.py
    makes it) and a history reader (as gateway/core/history.py makes it), and no connection."""
    async with client(url) as nc:
        js = nc.jetstream()
        await js.subscribe(
            f"{prefix}.>", stream=stream, cb=_ignore, ordered_consumer=True, idle_heartbeat=2.0,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=30.0),
        )
        await js.pull_subscribe(f"{prefix}.t1.conversation.c1", stream=stream, config=ConsumerConfig(
            ack_policy=AckPolicy.ALL, inactive_threshold=30.0, mem_storage=True, num_replicas=1,
            filter_subject=f"{prefix}.t1.conversation.c1"))


async def _ignore(msg: Any) -> None:
    return None


async def test_stream_and_bucket_are_created_then_left_alone(nats_server: NatsProcess) -> None:
    plan = plan_for(nats_server.url, stream={"maxAge": "1h", "maxBytes": 1 << 20})
    async with jetstream([nats_server.url], None) as js:
        first = await ensure_jetstream(js, plan)
        second = await ensure_jetstream(js, plan)
        info = await js.stream_info("EVENTS")
        await js.key_value("wsgateway-acl")
        presence = await js.stream_info("KV_wsgateway-presence")  # the pods' presence bucket, memory storage
    assert presence.config.storage == StorageType.MEMORY
    assert Settings.model_fields["presence_bucket"].default == "wsgateway-presence"
    assert (first.stream, first.bucket) == ("created", "created")
    assert (second.stream, second.bucket) == ("unchanged", "unchanged") and second.warnings == []
    assert info.config.subjects == ["events.>"] and info.config.max_age == 3600
    assert info.config.max_bytes == 1 << 20 and info.config.duplicate_window == 120


async def test_stream_config_follows_the_spec(nats_server: NatsProcess) -> None:
    async with jetstream([nats_server.url], None) as js:
        await ensure_jetstream(js, plan_for(nats_server.url))
        changed = plan_for(nats_server.url, stream={"maxAge": "2h", "subjects": ["events.>", "audit.>"]})
        assert (await ensure_jetstream(js, changed)).stream == "updated"
        info = await js.stream_info("EVENTS")
        assert info.config.max_age == 7200 and sorted(info.config.subjects) == ["audit.>", "events.>"]
        memory = plan_for(nats_server.url, stream={"maxAge": "2h", "subjects": ["events.>", "audit.>"],
                                                   "storage": "memory"})
        report = await ensure_jetstream(js, memory)
        assert report.stream == "unchanged" and "cannot change it in place" in report.warnings[0]
        assert (await js.stream_info("EVENTS")).config.storage == StorageType.FILE


async def test_overlapping_subjects_are_reported(nats_server: NatsProcess) -> None:
    async with jetstream([nats_server.url], None) as js:
        await js.add_stream(name="OTHER", subjects=["events.>"])
        with pytest.raises(NatsProblem) as err:
            await ensure_jetstream(js, plan_for(nats_server.url))
    assert err.value.reason == "StreamRejected" and "overlap" in err.value.message


async def test_cleanup_removes_only_what_gateway_pods_left(nats_server: NatsProcess) -> None:
    plan = plan_for(nats_server.url)
    async with jetstream([nats_server.url], None) as js:
        await ensure_jetstream(js, plan)
        await js.add_consumer("EVENTS", ConsumerConfig(durable_name="audit", filter_subject="events.>",
                                                       ack_policy=AckPolicy.EXPLICIT))
        await js.add_consumer("EVENTS", ConsumerConfig(durable_name="billing", filter_subject="events.t1.>",
                                                       ack_policy=AckPolicy.EXPLICIT))
    await leave_gateway_consumers(nats_server.url)
    async with jetstream([nats_server.url], None) as js:
        assert len(await gateway_consumers(js, plan)) == 2
        deleted = await cleanup_consumers(js, plan)
        left = sorted(c.name for c in await js.consumers_info("EVENTS"))
        assert await cleanup_consumers(js, plan) == []  # idempotent
    assert len(deleted) == 2
    assert left == ["audit", "billing"]


async def test_delete_policy_removes_stream_and_bucket(nats_server: NatsProcess) -> None:
    plan = plan_for(nats_server.url, deletionPolicy="Delete")
    async with jetstream([nats_server.url], None) as js:
        await ensure_jetstream(js, plan)
        gone = await delete_jetstream(js, plan)
        assert gone == ["bucket wsgateway-acl", "bucket wsgateway-presence", "stream EVENTS"]
        assert await delete_jetstream(js, plan) == []
        names = [s.config.name for s in await js.streams_info()]
    assert names == []


@pytest.mark.timeout(30)  # a hang guard: the connection attempt gives up (no reconnect loop), it does not hang
async def test_unreachable_nats_fails_fast_with_a_reason() -> None:
    down = NatsProcess()  # a free port nobody listens on
    with pytest.raises(NatsProblem) as err:
        async with jetstream([down.url], None, timeout=1.0):
            pass
    assert err.value.reason == "NatsUnreachable"
    assert down.url in err.value.message and "spec.nats.urls" in err.value.message
    down.cleanup()


class PasswordNats(NatsProcess):
    def command(self) -> list[str]:
        return [*super().command(), "--user", "gateway", "--pass", "s3cret"]


async def test_refused_credentials_are_reported() -> None:
    """A server that wants credentials the operator does not have: NatsAuthFailed, quickly."""
    with PasswordNats() as server:
        with pytest.raises(NatsProblem) as err:
            async with jetstream([server.url], None, timeout=1.0):
                pass
    assert err.value.reason == "NatsAuthFailed", err.value.message
    assert "credentialsSecret" in err.value.message
