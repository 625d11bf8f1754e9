"""GET /v1/scopes over real HTTP: the scopes of the caller's tenant the caller may see now, and why."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wait import eventually

DOCS: dict[str, dict[str, Any]] = {
    "acme.org": {"admins": ["user:olga"]},
    "acme.project.p1": {"admins": ["user:paul"], "viewers": ["group:auditors"]},
    "acme.conversation.c1": {"project": "p1", "members": ["user:mia", "group:support"]},
    "acme.conversation.c2": {"members": ["user:mia"]},
    "acme.process.pr1": {"project": "p1", "owner": "user:owen"},
    "acme.agent.ag1": {"members": ["nick"]},
    "beta.conversation.c1": {"members": ["user:mia"]},
}


async def _scopes(gw: RunningGateway, token: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=gw.http, headers=headers) as c:
        return await c.get("/v1/scopes", params=params)


def _names(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [s["scope"] for s in r.json()["scopes"]]


async def _grant_all(platform: Platform) -> None:
    for key, doc in DOCS.items():
        await platform.grant(key, doc)


@pytest.mark.parametrize(
    ("sub", "groups", "expected"),
    [
        ("mia", (), ["conversation:c1", "conversation:c2"]),
        ("sam", ("support",), ["conversation:c1"]),
        ("ann", ("auditors",), ["conversation:c1", "process:pr1"]),
        ("owen", (), ["process:pr1"]),
        ("nick", (), ["agent:ag1"]),
        ("olga", (), ["agent:ag1", "conversation:c1", "conversation:c2", "process:pr1"]),
        ("zoe", (), []),
    ],
)
async def test_each_user_lists_exactly_the_scopes_they_may_see(
    gw: RunningGateway, idp: TestIdP, platform: Platform, sub: str, groups: tuple[str, ...], expected: list[str]
) -> None:
    await _grant_all(platform)
    token = idp.mint(sub, groups=groups)
    await platform.applied(idp, gw)  # every document, beta's (the last) too
    r = await _scopes(gw, token)
    assert _names(r) == expected
    body = r.json()
    assert body["tenant"] == "acme" and body["principal"] == f"user:{sub}"
    assert body["org_admin"] is (sub == "olga")


async def test_each_scope_says_why_it_is_visible(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await _grant_all(platform)
    await platform.applied(idp, gw)  # every document, beta's (the last) too
    via = {s["scope"]: s["via"] for s in (await _scopes(gw, idp.mint("ann", groups=("auditors",)))).json()["scopes"]}
    assert via == {"conversation:c1": "viewer of project p1 (group:auditors)",
                   "process:pr1": "viewer of project p1 (group:auditors)"}
    via = {s["scope"]: s["via"] for s in (await _scopes(gw, idp.mint("mia"))).json()["scopes"]}
    assert via == {"conversation:c1": "member (user:mia)", "conversation:c2": "member (user:mia)"}
    r = await _scopes(gw, idp.mint("paul"))
    assert [(s["scope"], s["via"]) for s in r.json()["scopes"]] == [
        ("conversation:c1", "admin of project p1 (user:paul)"), ("process:pr1", "admin of project p1 (user:paul)")]


async def test_the_list_follows_acl_changes_live(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await _grant_all(platform)
    await platform.applied(idp, gw)  # every document, beta's (the last) too
    token = idp.mint("mia")
    assert _names(await _scopes(gw, token)) == ["conversation:c1", "conversation:c2"]
    await platform.grant("acme.conversation.c2", {"members": []})
    await platform.revoke("acme.conversation.c1")
    await platform.grant("acme.agent.ag9", {"owner": "mia"})

    async def changed() -> bool:
        return _names(await _scopes(gw, token)) == ["agent:ag9"]

    await eventually(changed, what="the scope list to follow the ACL changes", interval=0.05)


async def test_tenants_never_mix(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await _grant_all(platform)
    await platform.applied(idp, gw)  # every document, beta's (the last) too
    assert _names(await _scopes(gw, idp.mint("mia", tenant="beta"))) == ["conversation:c1"]
    assert _names(await _scopes(gw, idp.mint("olga", tenant="beta"))) == []  # admin of acme only


async def test_pages_with_after_and_limit(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await _grant_all(platform)
    await platform.applied(idp, gw)  # every document, beta's (the last) too
    token = idp.mint("olga")
    pages, after = [], ""
    while True:
        body = (await _scopes(gw, token, after=after, limit=3)).json()
        if not body["scopes"]:
            assert body["next_after"] == after
            break
        pages.append([s["scope"] for s in body["scopes"]])
        after = body["next_after"]
    assert pages == [["agent:ag1", "conversation:c1", "conversation:c2"], ["process:pr1"]]


async def test_documents_loaded_at_start_up_are_listed(nats_server: NatsProcess, idp: TestIdP) -> None:
    """The watcher swaps its fully loaded staging copy in at once: the scope index must come along."""
    platform = await Platform.connect(nats_server.url)
    try:
        await _grant_all(platform)
        async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience) as gw:
            assert _names(await _scopes(gw, idp.mint("mia"))) == ["conversation:c1", "conversation:c2"]
    finally:
        await platform.close()


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"limit": "0"}, 400, "bad_request"),
        ({"limit": "1001"}, 400, "bad_request"),
        ({"limit": "all"}, 400, "bad_request"),
        ({"after": "tenant:x"}, 400, "bad_request"),
    ],
)
async def test_errors_are_clear_json(
    gw: RunningGateway, idp: TestIdP, params: dict[str, str], status: int, code: str
) -> None:
    r = await _scopes(gw, None if status == 401 else idp.mint("mia"), **params)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert (await _scopes(gw, "not-a-jwt")).status_code == 401
