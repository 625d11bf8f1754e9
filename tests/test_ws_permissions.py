"""The permission model over the real protocol: default deny, hierarchy, live revocation and grant."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wsclient import connect, events, nothing_before, recv, recv_type, subscribe, welcome

ACLS: dict[str, dict[str, Any]] = {
    "acme.org": {"admins": ["user:olga"]},
    "acme.project.p1": {"admins": ["user:paul"], "viewers": ["user:vera", "group:auditors"]},
    "acme.conversation.c1": {"project": "p1", "members": ["user:mia", "group:support"]},
    "acme.process.pr1": {"project": "p1", "members": [], "owner": "user:owen"},
    "acme.agent.ag1": {"members": ["nick"]},  # bare name = user
    "beta.org": {"admins": ["user:zed"]},
}
# A scope every principal of the matrix may read, for the marker event that proves a denied one never came.
MARKER = "agent:marker"
SUBS = ["olga", "paul", "vera", "mia", "owen", "sam", "ann", "nick", "zed", "nobody"]
MARKERS: dict[str, dict[str, Any]] = {
    f"{tenant}.agent.marker": {"members": [f"user:{s}" for s in SUBS]} for tenant in ("acme", "beta")
}


@pytest.mark.parametrize(
    ("sub", "tenant", "groups", "scope", "allowed"),
    [
        ("olga", "acme", (), "conversation:c1", True),  # org admin
        ("olga", "acme", (), "agent:unlisted", True),  # org admin sees scopes without an entry
        ("paul", "acme", (), "conversation:c1", True),  # project admin
        ("vera", "acme", (), "process:pr1", True),  # project viewer
        ("mia", "acme", (), "conversation:c1", True),  # member
        ("mia", "acme", (), "process:pr1", False),  # member of another scope only
        ("owen", "acme", (), "process:pr1", True),  # owner
        ("sam", "acme", ("support",), "conversation:c1", True),  # group member
        ("ann", "acme", ("auditors",), "process:pr1", True),  # group project viewer
        ("nick", "acme", (), "agent:ag1", True),  # bare-name member
        ("zed", "beta", (), "conversation:c1", False),  # other tenant's admin
        ("mia", "beta", (), "conversation:c1", False),  # same name, other tenant
        ("nobody", "acme", (), "conversation:c1", False),  # no entry for the principal
        ("paul", "acme", (), "conversation:c2", False),  # no entry for the scope
    ],
)
async def test_permission_matrix(
    gw: RunningGateway, idp: TestIdP, platform: Platform,
    sub: str, tenant: str, groups: tuple[str, ...], scope: str, allowed: bool,
) -> None:
    for key, doc in {**ACLS, **MARKERS}.items():
        await platform.grant(key, doc)
    await platform.applied(idp, gw)
    assert sub in SUBS
    ws = await connect(gw.ws, idp.mint(sub, tenant=tenant, groups=groups))
    await welcome(ws)
    ack = await subscribe(ws, scope, rid="q")
    seq = await platform.publish("acme", scope)
    if allowed:
        assert ack["type"] == "subscribed"
        assert (await events(ws, 1))[0]["seq"] == seq
    else:
        if tenant == "acme":
            assert ack["type"] == "error" and ack["code"] == "forbidden" and ack["id"] == "q"
        # scopes are per tenant: another tenant's principal subscribes to its own tenant's scope
        # of that name, and never sees acme's event
        assert (await subscribe(ws, MARKER, rid="m"))["type"] == "subscribed"
        await nothing_before(ws, await platform.publish(tenant, MARKER))
    await ws.close()


async def test_revocation_while_connected(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    await platform.grant("acme.agent.marker", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("mia"))
    await welcome(ws)
    assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
    assert (await subscribe(ws, MARKER, rid="m"))["type"] == "subscribed"
    await platform.publish("acme", "conversation:c1")
    await events(ws, 1)
    await platform.grant("acme.conversation.c1", {"members": ["user:someone-else"]})
    assert await recv(ws) == {"type": "revoked", "scope": "conversation:c1"}
    await platform.publish("acme", "conversation:c1")
    await nothing_before(ws, await platform.publish("acme", MARKER))
    await ws.close()


async def test_revocation_by_deleting_the_entry_and_wildcard(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.process.pr1", {"owner": "user:owen"})
    await platform.grant("acme.agent.marker", {"members": ["user:owen"]})
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("owen"))
    await welcome(ws)
    await subscribe(ws, "*")
    await platform.publish("acme", "process:pr1")
    await events(ws, 1)
    await platform.revoke("acme.process.pr1")
    assert await recv(ws) == {"type": "revoked", "scope": "process:pr1"}
    await platform.publish("acme", "process:pr1")
    await nothing_before(ws, await platform.publish("acme", MARKER))  # the wildcard still sees the marker
    await ws.close()


async def test_grant_while_connected_starts_pending_subscription(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.agent.marker", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("mia"))
    await welcome(ws)
    assert (await subscribe(ws, "conversation:c1"))["code"] == "forbidden"
    assert (await subscribe(ws, MARKER, rid="m"))["type"] == "subscribed"
    await platform.publish("acme", "conversation:c1")
    await nothing_before(ws, await platform.publish("acme", MARKER))
    await platform.grant("acme.project.p1", {"viewers": ["user:mia"]})
    await platform.grant("acme.conversation.c1", {"project": "p1"})
    started = await recv_type(ws, "subscribed")
    assert started["scope"] == "conversation:c1"
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(ws, 1))[0]["seq"] == seq
    await ws.close()


async def test_unreadable_acl_document_denies(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("mia"))
    await welcome(ws)
    await subscribe(ws, "conversation:c1")
    kv = await platform.kv()
    await kv.put("acme.conversation.c1", b"{broken")
    assert await recv(ws) == {"type": "revoked", "scope": "conversation:c1"}
    await ws.send(json.dumps({"op": "ping"}))
    assert await recv(ws) == {"type": "pong"}
    await ws.close()


async def test_document_with_a_string_where_a_list_belongs_denies(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """`{"members": "bob"}` must not become the members b and o: the document is refused (deny)."""
    await platform.grant("acme.conversation.c1", {"members": "bob"})
    await platform.applied(idp, gw)
    for sub in ("bob", "b", "o"):
        ws = await connect(gw.ws, idp.mint(sub))
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["code"] == "forbidden"
        await ws.close()
