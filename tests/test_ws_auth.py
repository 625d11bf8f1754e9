"""Authentication on the WebSocket: token sources, every failure reason, expiry, refresh, rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP, public_pem
from tests.support.platform import Platform
from tests.support.wait import eventually
from tests.support.wsclient import closed, connect, events, recv, recv_type, subscribe, welcome


@pytest.mark.parametrize("via", ["header", "subprotocol", "query"])
async def test_token_sources(gw: RunningGateway, idp: TestIdP, via: str) -> None:
    ws = await connect(gw.ws, idp.mint("alice", groups=("eng",)), via=via)
    hello = await welcome(ws)
    assert hello["principal"] == {"id": "user:alice", "subject": "alice", "tenant": "acme", "groups": ["eng"]}
    if via == "subprotocol":
        assert ws.subprotocol == "wsgateway.v1"
    await ws.close()


async def test_query_token_never_logged(gw: RunningGateway, idp: TestIdP, caplog: pytest.LogCaptureFixture) -> None:
    token = idp.mint("alice")
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.INFO, logger="uvicorn.error"):
        ws = await connect(gw.ws, token, via="query")
        await welcome(ws)
        await ws.close()
        bad = await connect(gw.ws, token + "x", via="query")
        await closed(bad)
    server = [r for r in caplog.records if r.name.startswith(("uvicorn", "gateway"))]
    assert any("access_token=REDACTED" in r.getMessage() for r in server), "server should log the redacted path"
    assert not any(token[20:60] in r.getMessage() for r in server)


def _failures(idp: TestIdP) -> list[tuple[str, str | None]]:
    rsa_pem = public_pem(idp.private_key(idp.kid("RS256")))
    return [
        ("missing", None),
        ("malformed", "not-a-jwt"),
        ("expired", idp.mint("alice", exp_in=-3600)),
        ("not_yet_valid", idp.mint("alice", nbf_in=3600)),
        ("bad_signature", idp.mint("alice")[:-6] + "AAAAAA"),
        ("wrong_issuer", idp.mint("alice", iss="https://evil.example")),
        ("wrong_audience", idp.mint("alice", aud="someone-else")),
        ("unknown_key", idp.mint("alice", kid="never-published")),
        ("bad_algorithm", idp.mint_unsigned(sub="alice")),
        ("bad_algorithm", idp.mint_hs256(rsa_pem, sub="alice")),
        ("missing_claim", idp.mint("alice", drop=("tenant",))),
    ]


async def test_every_failure_closes_4401_with_reason_and_counts(gw: RunningGateway, idp: TestIdP) -> None:
    cases = _failures(idp)
    for reason, token in cases:
        ws = await connect(gw.ws, token)
        code, text = await closed(ws)
        assert code == 4401, (reason, code, text)
        assert text.startswith(reason), (reason, text)
    for reason in {r for r, _ in cases}:
        expected = sum(1 for r, _ in cases if r == reason)
        assert await gw.metric("wsgateway_auth_failures_total", {"reason": reason}) == expected, reason
    assert await gw.metric("wsgateway_connection_attempts_total", {"outcome": "unauthorized"}) == len(cases)


async def test_expiry_while_connected_closes_4408(gw: RunningGateway, idp: TestIdP) -> None:
    ws = await connect(gw.ws, idp.mint("alice", exp_in=2))
    await welcome(ws)
    code, reason = await closed(ws)
    assert code == 4408 and "expired" in reason


async def test_refresh_extends_the_session(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.applied(idp, gw)
    short = idp.mint("alice", exp_in=4)  # two connections, a subscription and a refresh before it expires
    ws = await connect(gw.ws, short)
    await welcome(ws)
    control = await connect(gw.ws, short)  # the same token, never refreshed
    await welcome(control)
    await subscribe(ws, "conversation:c1")
    await ws.send(json.dumps({"op": "refresh", "id": "r", "token": idp.mint("alice", exp_in=600)}))
    ok = await recv_type(ws, "refreshed")
    assert ok["id"] == "r" and ok["expires_at"] > 0
    # the first token has expired once the control connection is closed for it; the refreshed one lives on
    code, _ = await closed(control)
    assert code == 4408
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(ws, 1))[0]["seq"] == seq
    await ws.close()


async def test_refresh_for_another_subject_is_refused(gw: RunningGateway, idp: TestIdP) -> None:
    ws = await connect(gw.ws, idp.mint("alice", exp_in=4))  # two refreshes answered before it expires
    await welcome(ws)
    await ws.send(json.dumps({"op": "refresh", "id": 1, "token": idp.mint("mallory", exp_in=600)}))
    err = await recv_type(ws, "error")
    assert err["code"] == "unauthorized" and err["id"] == 1
    await ws.send(json.dumps({"op": "refresh", "id": 2, "token": "garbage"}))
    assert (await recv_type(ws, "error"))["message"].startswith("malformed")
    code, _ = await closed(ws)
    assert code == 4408


async def test_refresh_can_change_groups_and_access(gw: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.conversation.c1", {"members": ["group:support"]})
    await platform.applied(idp, gw)
    ws = await connect(gw.ws, idp.mint("sam", groups=("support",)))
    await welcome(ws)
    assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
    await ws.send(json.dumps({"op": "refresh", "token": idp.mint("sam", groups=())}))
    assert await recv(ws) == {"type": "revoked", "scope": "conversation:c1"}
    assert (await recv(ws))["type"] == "refreshed"
    await ws.close()


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_all_asymmetric_algorithms(gw: RunningGateway, idp: TestIdP, alg: str) -> None:
    ws = await connect(gw.ws, idp.mint("alice", alg=alg))
    await welcome(ws)
    await ws.close()


async def test_key_rotation_without_restart(gw: RunningGateway, idp: TestIdP) -> None:
    ws = await connect(gw.ws, idp.mint("alice"))
    await welcome(ws)
    await ws.close()
    kid = idp.rotate("RS256")
    ws2 = await connect(gw.ws, idp.mint("alice", kid=kid))
    assert (await recv(ws2))["type"] == "welcome"
    await ws2.close()


async def test_a_handshake_waiting_for_the_jwks_holds_up_no_other(gw: RunningGateway, idp: TestIdP) -> None:
    """A token of a new key waits for the JWKS fetch (its handshake goes on in a task of its own); meanwhile
    tokens of known keys are answered, and once the JWKS arrives the waiting handshakes complete, in full."""
    kid = idp.rotate("RS256")
    idp.jwks_gate = gate = threading.Event()
    waiting: list[asyncio.Task[object]] = []
    try:
        fetches = idp.jwks_fetches

        async def handshake(token: str) -> object:
            ws = await connect(gw.ws, token)
            try:
                return (await recv(ws))["type"]
            finally:
                await ws.close()

        waiting = [asyncio.create_task(handshake(idp.mint(f"new{i}", kid=kid))) for i in range(3)]
        await eventually(lambda: idp.jwks_fetches > fetches, what="the gateway fetching the JWKS for the new kid")
        assert await handshake(idp.mint("known", kid=idp.kid("ES256"), alg="ES256")) == "welcome"
        assert not any(t.done() for t in waiting), "a handshake waiting for the JWKS finished before it came"
    finally:
        gate.set()
        idp.jwks_gate = None
    assert await asyncio.gather(*waiting) == ["welcome"] * 3


async def test_tokens_from_a_real_openid_provider(nats_server: object) -> None:
    from tests.support.gateway import run_gateway
    from tests.support.oidc_provider import OidcProviderProcess

    with OidcProviderProcess() as op:
        async with run_gateway(nats_server.url, op.issuer, audience=op.audience) as g:  # type: ignore[attr-defined]
            token = await asyncio.to_thread(op.token)
            ws = await connect(g.ws, token, via="subprotocol")
            hello = await welcome(ws)
            assert hello["principal"]["tenant"]
            await ws.close()


@pytest.mark.parametrize("exp", [2**70, 10**400, 1e300, 253_402_300_800], ids=["2^70", "10^400", "1e300", "y10000"])
async def test_an_expiry_beyond_the_year_9999_is_that_year(gw: RunningGateway, idp: TestIdP, exp: float) -> None:
    """PyJWT accepts any NumericDate; the gateway carries it as a 64-bit integer, so a later one is 9999-12-31
    (before, 2^63 and beyond failed the handshake with an exception, and 10^400 did too)."""
    ws = await connect(gw.ws, idp.mint("alice", extra={"exp": exp}))
    assert (await welcome(ws))["expires_at"] == 253_402_300_799
    await ws.close()
