"""The platform side in tests: publishes events through the package's Publisher, writes ACL documents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import nats
import orjson
from nats.aio.client import Client

from gateway.sdk.publisher import Publisher
from tests.support.wait import eventually

if TYPE_CHECKING:
    from tests.support.gateway import GatewayEndpoint
    from tests.support.idp import TestIdP

SYNC_TENANT = "wsgateway-sync"
"""A tenant of its own for `Platform.applied`'s marker document (no test's tenant sees it)."""


class Platform:
    def __init__(self, nc: Client, bucket: str = "wsgateway-acl", prefix: str = "events") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.bucket = bucket
        self.publisher = Publisher(self.js, subject_prefix=prefix)
        self._kv: Any = None
        self._marks = 0

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

    async def applied(self, idp: TestIdP, *gateways: GatewayEndpoint | str) -> int:
        """Wait until every gateway in `gateways` (endpoints or base URLs) has applied every ACL write made
        so far (through any client).

        A grant or revocation is a KV write each gateway applies asynchronously through its watch; a test
        that subscribes, connects or asks over HTTP right after one races that watch. The gateway applies
        the bucket's entries in stream order, so this writes a marker document (the org document of
        SYNC_TENANT, naming a new admin each time) and waits until each gateway's GET /v1/scopes says the
        marker's principal is org admin: every write before the marker is applied by then. Returns how many
        requests were answered (a traced gateway records a span for each)."""
        self._marks += 1
        asked = 0
        subject = f"sync-{self._marks}"
        await self.grant(f"{SYNC_TENANT}.org", {"admins": [f"user:{subject}"]})
        token = idp.mint(subject, tenant=SYNC_TENANT)
        async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"}) as c:
            for g in gateways:
                base = g if isinstance(g, str) else g.http

                async def marked(http: str = base) -> bool:
                    nonlocal asked
                    r = await c.get(f"{http}/v1/scopes")
                    asked += 1
                    return r.status_code == 200 and r.json()["org_admin"] is True

                await eventually(marked, what=f"{base} to apply the ACL writes so far (marker {subject})",
                                 interval=0.05, ignore=(httpx.HTTPError,))
        return asked

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
