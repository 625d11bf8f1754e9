"""The stream and the ACL bucket have one shape whoever creates them: a gateway or the operator
(gateway/provisioning.py), against a real nats-server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.errors import APIError

from gateway import provisioning
from gateway.config import Settings
from gateway.core.bus import ensure_bucket, ensure_stream
from gateway.devtools.natsproc import NatsProcess
from wsgateway_operator.builders import Owner, jetstream_plan
from wsgateway_operator.natsops import ensure_jetstream
from wsgateway_operator.spec import WebSocketGatewaySpec


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def settings(url: str, **kw: object) -> Settings:
    return Settings(dev_mode=True, nats_url=url, **kw)


async def test_gateway_creates_what_the_operator_would(nats_server: NatsProcess) -> None:
    s = settings(nats_server.url, stream_max_age_s=3600, stream_max_bytes=1 << 20)
    async with jetstream(nats_server.url) as js:
        assert await ensure_stream(js, s) == 0
        kv = await ensure_bucket(js, s)
        stream = (await js.stream_info("EVENTS")).config
        bucket = await kv.status()
        spec = WebSocketGatewaySpec.model_validate({
            "image": "img", "auth": {"issuer": "https://idp"},
            "nats": {"urls": [nats_server.url], "stream": {"maxAge": "1h", "maxBytes": 1 << 20}},
        })
        report = await ensure_jetstream(js, jetstream_plan(Owner(name="gw", namespace="ns", uid="u"), spec))
    assert stream.subjects == ["events.>"] and stream.storage == StorageType.FILE
    assert stream.max_age == 3600 and stream.max_bytes == 1 << 20
    assert stream.duplicate_window == provisioning.DUPLICATE_WINDOW_S
    assert bucket.history == provisioning.ACL_BUCKET_HISTORY
    assert bucket.stream_info.config.description == provisioning.ACL_BUCKET_DESCRIPTION
    # The operator adopts both as they are; it only writes its "managed by" description on the stream.
    assert report.bucket == "unchanged" and report.stream == "updated" and report.warnings == []


async def test_gateway_creates_its_bucket_with_the_configured_replicas(nats_server: NatsProcess) -> None:
    # A single server cannot hold 3 replicas: JetStream refusing the bucket shows the replicas reach it
    # (the gateway used to create the bucket with one replica whatever WSGATEWAY_STREAM_REPLICAS said).
    async with jetstream(nats_server.url) as js:
        with pytest.raises(APIError, match="replicas"):
            await ensure_bucket(js, settings(nats_server.url, stream_replicas=3))
        assert provisioning.bucket_config("acl", replicas=3).replicas == 3


async def test_creation_disabled_leaves_nats_alone(nats_server: NatsProcess) -> None:
    s = settings(nats_server.url, create_stream=False)
    async with jetstream(nats_server.url) as js:
        with pytest.raises(RuntimeError, match="does not exist"):
            await ensure_stream(js, s)
        with pytest.raises(RuntimeError, match="does not exist"):
            await ensure_bucket(js, s)
        assert await js.streams_info() == []


async def test_an_existing_stream_or_bucket_is_taken_as_it_is(nats_server: NatsProcess) -> None:
    config = provisioning.stream_config("EVENTS", ["events.>"], max_age_s=60, max_bytes=-1, replicas=1)
    async with jetstream(nats_server.url) as js:
        await js.add_stream(provisioning.stream_config("EVENTS", ["events.>"], max_age_s=120, max_bytes=-1,
                                                       replicas=1))
        info, created = await provisioning.ensure_stream(js, config)
        _, bucket_created = await provisioning.ensure_bucket(js, provisioning.bucket_config("acl", replicas=1))
        _, again = await provisioning.ensure_bucket(js, provisioning.bucket_config("acl", replicas=1))
    assert not created and info.config.max_age == 120
    assert provisioning.stream_differences(info.config, config) == ["max_age 120.0s -> 60s"]
    assert bucket_created and not again
