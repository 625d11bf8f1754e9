"""The platform side in tests: publishes events through the package's Publisher, writes ACL documents."""

from __future__ import annotations

from typing import Any

import httpx
import nats
import orjson
from nats.aio.client import Client

from gateway.sdk.publisher import Publisher
from tests.support.wait import eventually


class Platform:
    def __init__(self, nc: Client, bucket: str = "wsgateway-acl", prefix: str = "events") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.bucket = bucket
        self.publisher = Publisher(self.js, subject_prefix=prefix)
        self._kv: Any = None

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> Platform:
        return cls(await nats.connect(url), **kw)

    async def close(self) -> None:
        await self.nc.close()

    async def kv(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(self.bucket)
            except Exception:
                self._kv = await self.js.create_key_value(bucket=self.bucket, history=1)
        return self._kv

    async def grant(self, key: str, doc: dict[str, Any]) -> None:
        await (await self.kv()).put(key, orjson.dumps(doc))

    async def revoke(self, key: str) -> None:
        await (await self.kv()).delete(key)

    async def publish(self, tenant: str, scope: str, type: str = "test.tick", **kw: Any) -> int:
        """Publish through the package's Publisher; the default type is an uncatalogued one (passes through)."""
        data = kw.pop("data", None)
        if data is None and type == "test.tick":
            data = {"fraction": 0.5}
        ack = await self.publisher.publish(tenant=tenant, scope=scope, type=type, data=data, **kw)
        return int(ack.seq)

    async def publish_raw(self, subject: str, body: bytes, msg_id: str | None = None) -> int:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        ack = await self.js.publish(subject, body, headers=headers)
        return int(ack.seq)


async def until_scopes(http: str, token: str, scopes: list[str]) -> None:
    """Wait until the gateway at `http` lists exactly `scopes` for the token's user (GET /v1/scopes).

    A grant is a KV write the gateway applies asynchronously; a client that subscribes before that gets
    `forbidden` and a pending subscription. Tests that need `subscribed` first wait here."""

    async def listed() -> bool:
        async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"}) as c:
            r = await c.get(f"{http}/v1/scopes")
            return r.status_code == 200 and sorted(s["scope"] for s in r.json()["scopes"]) == sorted(scopes)

    await eventually(listed, what=f"{http} to list {scopes}", interval=0.05, ignore=(httpx.HTTPError,))
