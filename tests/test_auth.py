"""Token verification against real keys served over real HTTP (test IdP, dev IdP, npm oidc-provider)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from fastapi import FastAPI

from gateway.auth import (
    AUTH_FAILURE_REASONS,
    SUBPROTOCOL,
    AuthError,
    Principal,
    TokenVerifier,
    extract_token,
)
from gateway.config import Settings
from gateway.devtools.devidp import DevIdentityProvider
from tests.support.idp import TestIdP, generate_key, public_pem
from tests.support.oidc_provider import OidcProviderProcess
from tests.support.ports import free_port
from tests.support.wait import HANG_S, eventually, eventually_sync

# -- helpers -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def verifier_for(idp: TestIdP, **kwargs: Any) -> AsyncIterator[TokenVerifier]:
    """A TokenVerifier on ``idp`` (explicit jwks_url unless overridden), closed afterwards."""
    options: dict[str, Any] = {"issuer": idp.issuer, "jwks_url": idp.jwks_url, "audience": idp.audience}
    options.update(kwargs)
    verifier = TokenVerifier(**options)
    try:
        yield verifier
    finally:
        await verifier.aclose()


@pytest.fixture
async def verifier(idp: TestIdP) -> AsyncIterator[TokenVerifier]:
    async with verifier_for(idp) as v:
        yield v


async def refused(verifier: TokenVerifier, token: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    err = info.value
    assert err.reason in AUTH_FAILURE_REASONS
    if token:
        assert token not in err.message and token not in str(err) and token not in repr(err)
    return err


class UnansweringIssuer:
    """A TCP server that reads HTTP requests and answers none of them until `release()`, then answers
    every request with 503: an issuer whose first request stays in flight as long as the test wants."""

    def __init__(self) -> None:
        self.requests = 0  # requests received
        self.in_flight = 0  # ... not answered yet, with the client still waiting for the answer
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self, port: int) -> UnansweringIssuer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return self

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        self.requests += 1
        self.in_flight += 1
        gave_up = asyncio.ensure_future(reader.read())  # b"" once the client closes the connection
        released = asyncio.ensure_future(self._released.wait())
        try:
            await asyncio.wait({gave_up, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.in_flight -= 1
            gave_up.cancel()
            released.cancel()
        with contextlib.suppress(ConnectionError):
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()


@contextlib.contextmanager
def serve_app(app: FastAPI, port: int) -> Iterator[str]:
    """``app`` on a real uvicorn server in its own thread (independent of the test's event loop)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn's thread ended before it listened"
        return server.started

    eventually_sync(started, what=f"uvicorn to listen on port {port}", interval=0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# -- valid tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_valid_token_accepted(idp: TestIdP, verifier: TokenVerifier, alg: str) -> None:
    token = idp.mint("alice", "acme", ["ops", "dev"], alg=alg, exp_in=600)
    principal = await verifier.verify(token)
    assert principal.subject == "alice"
    assert principal.tenant == "acme"
    assert principal.groups == ("ops", "dev")
    assert principal.name == "user:alice"
    assert principal.ids == frozenset({"user:alice", "group:ops", "group:dev"})
    assert abs(principal.expires_at - (time.time() + 600)) < 5
    assert verifier.ready


async def test_groups_claim_may_be_one_string_or_absent(idp: TestIdP, verifier: TokenVerifier) -> None:
    assert (await verifier.verify(idp.mint(groups="admins"))).groups == ("admins",)
    no_groups = await verifier.verify(idp.mint(drop=("groups",)))
    assert no_groups.groups == ()
    assert no_groups.ids == frozenset({"user:alice"})


async def test_custom_and_nested_claim_names(idp: TestIdP) -> None:
    async with verifier_for(idp, tenant_claim="https://example.com/tenant", groups_claim="realm.roles") as v:
        token = idp.mint(
            drop=("tenant", "groups"),
            extra={"https://example.com/tenant": "t-1", "realm": {"roles": ["r1", "r2"]}},
        )
        principal = await v.verify(token)
    assert (principal.tenant, principal.groups) == ("t-1", ("r1", "r2"))


async def test_principal_is_frozen() -> None:
    p = Principal(subject="a", tenant="t", groups=("g",), expires_at=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.subject = "b"  # type: ignore[misc]
    assert (p.name, p.ids) == ("user:a", frozenset({"user:a", "group:g"}))
    assert p == Principal(subject="a", tenant="t", groups=("g",), expires_at=1.0) and hash(p)


# -- each failure reason -------------------------------------------------------------------------


async def test_missing(verifier: TokenVerifier) -> None:
    assert (await refused(verifier, None)).reason == "missing"


@pytest.mark.parametrize(
    "token",
    ["", "not-a-jwt", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.!!!.sig", "a.b", "x" * 20000, "Basic dXNlcjpwYXNz"],
)
async def test_malformed(verifier: TokenVerifier, token: str) -> None:
    assert (await refused(verifier, token)).reason == "malformed"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(idp: TestIdP, alg: str, header: dict[str, Any] | None = None, payload: Any = None,
           raw_payload: bytes | None = None) -> str:
    """A token signed by the IdP's own `alg` key over exactly this header and payload (built by hand, so it
    may carry what a library would refuse to encode)."""
    kid = idp.kid(alg)
    h = _b64u(json.dumps({"alg": alg, "kid": kid, **(header or {})}).encode())
    p = _b64u(raw_payload if raw_payload is not None else json.dumps(
        payload if payload is not None else idp.claims()).encode())
    algo = jwt.get_algorithm_by_name(alg)
    signature = algo.sign(f"{h}.{p}".encode(), idp.private_key(kid))  # type: ignore[arg-type]
    return f"{h}.{p}.{_b64u(signature)}"


def _claims(idp: TestIdP, **changes: Any) -> dict[str, Any]:
    claims = idp.claims()
    for name, value in changes.items():
        if value is _DROP:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


_DROP = object()
_HOSTILE: list[tuple[str, Any, str]] = [
    # (what, {"header": ..., "payload" | "raw_payload": ...} built against the IdP, the reason)
    ("payload a JSON array", {"raw_payload": b"[1, 2]"}, "malformed"),
    ("payload not JSON", {"raw_payload": b"{not json"}, "malformed"),
    ("unknown critical header", {"header": {"crit": ["exp"], "exp": 1}}, "malformed"),
    ("crit not a list", {"header": {"crit": "b64"}}, "malformed"),
    ("unencoded payload (b64 false)", {"header": {"b64": False, "crit": ["b64"]}}, "malformed"),
    ("iat not a number", {"payload": ("iat", "soon")}, "malformed"),
    ("iat in the future", {"payload": ("iat", int(time.time()) + 3600)}, "not_yet_valid"),
    ("nbf not a number", {"payload": ("nbf", [1])}, "malformed"),
    ("exp not a number", {"payload": ("exp", "never")}, "malformed"),
    ("exp null", {"payload": ("exp", None)}, "missing_claim"),
    ("iss not a string", {"payload": ("iss", ["x"])}, "wrong_issuer"),
    ("no iss", {"payload": ("iss", _DROP)}, "wrong_issuer"),
    ("aud empty", {"payload": ("aud", "")}, "wrong_audience"),
    ("aud list with a number", {"payload": ("aud", ["wsgateway-test", 7])}, "wrong_audience"),
    ("aud an object", {"payload": ("aud", {"wsgateway-test": True})}, "wrong_audience"),
    ("no aud", {"payload": ("aud", _DROP)}, "wrong_audience"),
    ("jti not a string", {"payload": ("jti", 12)}, "malformed"),
]


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
@pytest.mark.parametrize(("what", "spec", "reason"), _HOSTILE, ids=[h[0] for h in _HOSTILE])
async def test_hostile_but_validly_signed_tokens_are_refused_for_their_reason(
    idp: TestIdP, verifier: TokenVerifier, alg: str, what: str, spec: dict[str, Any], reason: str
) -> None:
    kwargs = dict(spec)
    if "payload" in kwargs:
        name, value = kwargs.pop("payload")
        kwargs["payload"] = _claims(idp, **{name: value})
    assert (await refused(verifier, signed(idp, alg, **kwargs))).reason == reason, what


async def test_a_validly_signed_hand_built_token_is_accepted(idp: TestIdP, verifier: TokenVerifier) -> None:
    """The control for the hostile cases: the same construction without the defect verifies, also with a
    declared and present `b64: true` critical header, and an `aud` list that holds the audience."""
    for alg in ("RS256", "ES256"):
        await verifier.verify(signed(idp, alg))
        await verifier.verify(signed(idp, alg, header={"b64": True, "crit": ["b64"]}))
        await verifier.verify(signed(idp, alg, payload=_claims(idp, aud=["other", "wsgateway-test"])))


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_signatures_in_a_non_canonical_or_wrong_shape_are_refused(
    idp: TestIdP, verifier: TokenVerifier, alg: str
) -> None:
    h, p, sig = idp.mint(alg=alg).split(".")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    # the same signature bytes, spelled with non-zero unused bits in its last character
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(sig) % 4:
        bumped = sig[:-1] + alphabet[alphabet.index(sig[-1]) + 1]
        assert base64.urlsafe_b64decode(bumped + "=" * (-len(bumped) % 4)) == raw
        assert (await refused(verifier, f"{h}.{p}.{bumped}")).reason == "malformed"
    assert (await refused(verifier, f"{h}.{p}.{_b64u(raw[:-1])}")).reason == "bad_signature"  # one byte short
    assert (await refused(verifier, f"{h}.{p}.{_b64u(raw + b'x')}")).reason == "bad_signature"
    assert (await refused(verifier, f"{h}.{p}.")).reason == "bad_signature"  # no signature at all
    assert (await refused(verifier, f"{h}.{p}.A")).reason == "malformed"  # an impossible base64 length
    assert (await refused(verifier, f"{_b64u(b'[1]')}.{p}.{sig}")).reason == "malformed"  # header an array


async def test_expired_and_not_yet_valid_with_leeway(idp: TestIdP, verifier: TokenVerifier) -> None:
    # Default leeway is 30 s: 10 s of skew either way is tolerated, 120 s is not.
    assert (await refused(verifier, idp.mint(exp_in=-120))).reason == "expired"
    assert (await refused(verifier, idp.mint(nbf_in=120))).reason == "not_yet_valid"
    await verifier.verify(idp.mint(exp_in=-10))
    await verifier.verify(idp.mint(nbf_in=10))


async def test_zero_leeway_is_strict(idp: TestIdP) -> None:
    async with verifier_for(idp, leeway_s=0) as strict:
        assert (await refused(strict, idp.mint(exp_in=-10))).reason == "expired"
        assert (await refused(strict, idp.mint(nbf_in=10))).reason == "not_yet_valid"


async def test_bad_signature(idp: TestIdP, verifier: TokenVerifier) -> None:
    # Signed by a foreign key that claims the IdP's kid.
    forged = idp.mint(key=generate_key("ES256"), alg="ES256")
    assert (await refused(verifier, forged)).reason == "bad_signature"
    # A genuine token whose payload was swapped for another genuine token's payload.
    header, _, signature = idp.mint("alice").split(".")
    payload = idp.mint("mallory").split(".")[1]
    assert (await refused(verifier, f"{header}.{payload}.{signature}")).reason == "bad_signature"


async def test_wrong_issuer(idp: TestIdP, verifier: TokenVerifier) -> None:
    assert (await refused(verifier, idp.mint(iss="https://evil.example"))).reason == "wrong_issuer"
    assert (await refused(verifier, idp.mint(drop=("iss",)))).reason == "wrong_issuer"


async def test_issuer_not_checked_without_one(idp: TestIdP) -> None:
    async with verifier_for(idp, issuer=None) as v:
        await v.verify(idp.mint(iss="https://anyone.example"))


async def test_wrong_audience(idp: TestIdP, verifier: TokenVerifier) -> None:
    assert (await refused(verifier, idp.mint(aud="another-api"))).reason == "wrong_audience"
    assert (await refused(verifier, idp.mint(drop=("aud",)))).reason == "wrong_audience"
    await verifier.verify(idp.mint(aud=["another-api", idp.audience]))


async def test_audience_not_checked_without_one(idp: TestIdP) -> None:
    async with verifier_for(idp, audience=None) as v:
        await v.verify(idp.mint(aud="whatever"))
        await v.verify(idp.mint(drop=("aud",)))


async def test_unknown_key(idp: TestIdP, verifier: TokenVerifier) -> None:
    assert (await refused(verifier, idp.mint(kid="no-such-kid"))).reason == "unknown_key"


async def test_token_without_kid_uses_the_only_key_of_its_type(idp: TestIdP, verifier: TokenVerifier) -> None:
    await verifier.verify(idp.mint(alg="ES256", drop=("kid",)))
    idp.rotate("ES256")  # now two EC keys: a kid-less token is ambiguous
    await verifier.verify(idp.mint(alg="ES256", kid=idp.kid("ES256")))  # refetch
    assert (await refused(verifier, idp.mint(alg="ES256", drop=("kid",)))).reason == "unknown_key"


async def test_alg_none_refused(idp: TestIdP, verifier: TokenVerifier) -> None:
    assert (await refused(verifier, idp.mint_unsigned())).reason == "bad_algorithm"


async def test_refused_algorithm_is_decided_before_any_key_lookup(idp: TestIdP, verifier: TokenVerifier) -> None:
    await verifier.verify(idp.mint())
    fetches = idp.jwks_fetches
    # Unknown kids with refused algorithms must not cost the IdP a JWKS refetch.
    assert (await refused(verifier, idp.mint_unsigned(kid="fresh-1"))).reason == "bad_algorithm"
    assert (await refused(verifier, idp.mint_hs256(b"k" * 32, kid="fresh-2"))).reason == "bad_algorithm"
    assert (await refused(verifier, idp.mint(alg="RS512", kid="fresh-3"))).reason == "bad_algorithm"
    assert idp.jwks_fetches == fetches


async def test_hs256_refused_even_with_the_rsa_public_key_as_secret(idp: TestIdP, verifier: TokenVerifier) -> None:
    rsa_kid = idp.kid("RS256")
    pem = public_pem(idp.private_key(rsa_kid))
    # Classic key confusion: a naive verifier would HMAC-verify with the PEM of the RSA key.
    confused = idp.mint_hs256(pem, kid=rsa_kid)
    assert (await refused(verifier, confused)).reason == "bad_algorithm"
    assert (await refused(verifier, idp.mint_hs256(b"s" * 32))).reason == "bad_algorithm"
    # Sanity: the forged token *is* a valid HS256 signature keyed with the PEM (so the test can fail).
    signing_input, _, signature = confused.rpartition(".")
    expected = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected


@pytest.mark.parametrize("alg", ["RS512", "PS256"])
async def test_other_asymmetric_algorithms_refused(idp: TestIdP, verifier: TokenVerifier, alg: str) -> None:
    assert (await refused(verifier, idp.mint(alg=alg))).reason == "bad_algorithm"


async def test_key_type_must_match_algorithm(idp: TestIdP, verifier: TokenVerifier) -> None:
    # An ES256 token naming the RSA key's kid, and an RS256 token naming the Ed25519 key's kid.
    assert (await refused(verifier, idp.mint(alg="ES256", kid=idp.kid("RS256")))).reason == "bad_algorithm"
    assert (await refused(verifier, idp.mint(alg="RS256", kid=idp.kid("EdDSA")))).reason == "bad_algorithm"


async def test_jwk_alg_and_use_are_enforced(idp: TestIdP) -> None:
    declared_rs512 = idp.rotate("RS256", jwk_extra={"alg": "RS512"})
    encryption_key = idp.rotate("RS256", jwk_extra={"use": "enc"})
    bare = idp.rotate("RS256", drop_jwk=("alg", "use"))
    p384 = idp.rotate("ES256", jwk_extra={"crv": "P-384"})  # a curve the gateway does not accept
    async with verifier_for(idp) as v:
        assert (await refused(v, idp.mint(kid=declared_rs512))).reason == "bad_algorithm"
        assert (await refused(v, idp.mint(kid=encryption_key))).reason == "unknown_key"
        assert (await refused(v, idp.mint(alg="ES256", kid=p384))).reason == "bad_algorithm"
        await v.verify(idp.mint(kid=bare))  # alg/use are optional in a JWK


@pytest.mark.parametrize(
    ("mint_kwargs", "why"),
    [
        ({"drop": ("sub",)}, "no sub"),
        ({"sub": ""}, "empty sub"),
        ({"extra": {"sub": 42}}, "sub not a string"),
        ({"drop": ("tenant",)}, "no tenant"),
        ({"tenant": "bad tenant!"}, "tenant with bad characters"),
        ({"tenant": "t" * 129}, "tenant too long"),
        ({"extra": {"tenant": ["acme"]}}, "tenant not a string"),
        ({"extra": {"groups": [1, 2]}}, "groups not strings"),
        ({"extra": {"groups": {"a": 1}}}, "groups an object"),
        ({"drop": ("exp",)}, "no exp"),
    ],
)
async def test_missing_claim(idp: TestIdP, verifier: TokenVerifier, mint_kwargs: dict[str, Any], why: str) -> None:
    assert (await refused(verifier, idp.mint(**mint_kwargs))).reason == "missing_claim", why


async def test_jwks_unavailable_when_never_loaded() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    verifier = TokenVerifier(issuer=dead, jwks_url=None, audience=None)
    try:
        with TestIdP() as other:  # a well-formed token from an IdP the verifier cannot reach
            token = other.mint()
        assert (await refused(verifier, token)).reason == "jwks_unavailable"
        assert not verifier.ready
    finally:
        await verifier.aclose()


async def test_jwks_unavailable_on_http_error(idp: TestIdP) -> None:
    idp.jwks_status = 503
    async with verifier_for(idp) as v:
        assert (await refused(v, idp.mint())).reason == "jwks_unavailable"
        assert not v.ready


async def test_every_reason_is_distinct_and_error_is_validated() -> None:
    assert len(set(AUTH_FAILURE_REASONS)) == len(AUTH_FAILURE_REASONS) == 11
    with pytest.raises(ValueError):
        AuthError("unbounded-label", "x")
    err = AuthError("expired", "token has expired")
    assert (err.reason, err.message, str(err)) == ("expired", "token has expired", "token has expired")


# -- JWKS lifecycle ------------------------------------------------------------------------------


async def test_discovery_path(idp: TestIdP) -> None:
    async with verifier_for(idp, jwks_url=None) as v:
        await v.start()
        await eventually(lambda: v.ready, what="the JWKS to be loaded")
        await v.verify(idp.mint(alg="EdDSA"))
    assert (idp.discovery_fetches, idp.jwks_fetches) == (1, 1)


async def test_explicit_jwks_url_skips_discovery(idp: TestIdP) -> None:
    async with verifier_for(idp) as v:
        await v.start()
        await eventually(lambda: v.ready, what="the JWKS to be loaded")
        await v.verify(idp.mint())
    assert (idp.discovery_fetches, idp.jwks_fetches) == (0, 1)


async def test_start_returns_at_once_and_retries_until_the_idp_is_up() -> None:
    port = free_port()
    issuer = await UnansweringIssuer().start(port)
    verifier = TokenVerifier(issuer=f"http://127.0.0.1:{port}", jwks_url=None, audience="wsgateway-test")
    try:
        async with asyncio.timeout(HANG_S):  # a hang guard: start() must not wait for the IdP
            await verifier.start()
        # start() returned before its first request even reached the IdP; that request then stays in
        # flight, unanswered, and the verifier is not ready: start() does not wait for the load
        assert issuer.requests == 0
        await eventually(lambda: issuer.in_flight == 1, what="the verifier's first request to be in flight")
        assert issuer.requests == 1 and not verifier.ready
        issuer.release()  # from now on the IdP answers 503: a few failed attempts, retried
        await eventually(lambda: issuer.requests >= 3, what="the verifier to retry after failed attempts")
        assert not verifier.ready
        await issuer.close()
        with TestIdP(port=port) as late:
            await eventually(lambda: verifier.ready, what="the JWKS to be loaded once the IdP is up")
            assert (await verifier.verify(late.mint("bob"))).subject == "bob"
    finally:
        await verifier.aclose()
        await issuer.close()


async def test_key_rotation_without_restart(idp: TestIdP, verifier: TokenVerifier) -> None:
    await verifier.verify(idp.mint())
    assert idp.jwks_fetches == 1
    new_kid = idp.rotate("RS256")
    principal = await verifier.verify(idp.mint("carol", kid=new_kid))
    assert principal.subject == "carol"
    assert idp.jwks_fetches == 2  # exactly one refetch
    await verifier.verify(idp.mint("carol", kid=new_kid))
    assert idp.jwks_fetches == 2  # cached afterwards


async def test_withdrawn_key_is_dropped_on_refresh(idp: TestIdP) -> None:
    async with verifier_for(idp, refresh_min_interval_s=0) as v:
        old_kid = idp.kid("RS256")
        old_token = idp.mint(kid=old_kid)
        await v.verify(old_token)
        new_kid = idp.rotate("RS256")
        idp.remove_key(old_kid)
        await v.verify(idp.mint(kid=new_kid))  # triggers the refetch
        assert (await refused(v, old_token)).reason == "unknown_key"


async def test_periodic_refresh_drops_withdrawn_keys(idp: TestIdP) -> None:
    async with verifier_for(idp, max_age_s=0.2, refresh_min_interval_s=3600) as v:
        await v.start()
        await eventually(lambda: v.ready, what="the JWKS to be loaded")
        token = idp.mint()
        await v.verify(token)
        idp.remove_key(idp.kid("RS256"))

        async def withdrawn_key_dropped() -> bool:  # the cached key verifies (without a fetch) until then
            try:
                await v.verify(token)
            except AuthError:
                return True
            return False

        await eventually(withdrawn_key_dropped, what="the periodic refresh to drop the withdrawn key")
        assert idp.jwks_fetches >= 2
        assert (await refused(v, token)).reason == "unknown_key"


async def test_unknown_kids_refetch_is_rate_limited(idp: TestIdP) -> None:
    # the 25 refusals below must all fall in one interval: 3 s leaves a loaded machine room (0.5 s is tight)
    async with verifier_for(idp, refresh_min_interval_s=3) as v:
        await v.verify(idp.mint())
        assert idp.jwks_fetches == 1
        for i in range(25):
            assert (await refused(v, idp.mint(kid=f"garbage-{i}"))).reason == "unknown_key"
        assert idp.jwks_fetches == 2  # one refetch for 25 garbage kids
        await asyncio.sleep(3.1)  # the clock is the subject: let the 3 s rate-limit interval pass
        assert (await refused(v, idp.mint(kid="garbage-late"))).reason == "unknown_key"
        assert idp.jwks_fetches == 3  # the limit is per interval, not forever


async def test_concurrent_unknown_kids_share_one_fetch(idp: TestIdP) -> None:
    async with verifier_for(idp, refresh_min_interval_s=0) as v:
        await v.verify(idp.mint())
        idp.jwks_delay_s = 0.3
        new_kid = idp.rotate("ES256")
        tokens = [idp.mint(alg="ES256", kid=new_kid) for _ in range(20)]
        results = await asyncio.gather(*(v.verify(t) for t in tokens))
        assert all(p.subject == "alice" for p in results)
        assert idp.jwks_fetches == 2  # twenty callers, one in-flight fetch


async def test_stale_keys_survive_a_failed_refresh(idp: TestIdP) -> None:
    async with verifier_for(idp, refresh_min_interval_s=0) as v:
        token = idp.mint()
        await v.verify(token)
        idp.jwks_status = 500
        assert (await refused(v, idp.mint(kid="rotated-away"))).reason == "unknown_key"
        assert idp.jwks_fetches == 2
        await v.verify(token)  # the previously loaded keys are still used


async def test_from_settings(idp: TestIdP) -> None:
    settings = Settings(oidc_issuer=idp.issuer, audience=idp.audience, jwt_leeway_s=0, tenant_claim="org")
    v = TokenVerifier.from_settings(settings)
    try:
        assert (v.issuer, v.audience, v.leeway_s, v.tenant_claim) == (idp.issuer, idp.audience, 0, "org")
        principal = await v.verify(idp.mint(drop=("tenant",), extra={"org": "o1"}))
        assert principal.tenant == "o1"
        assert idp.discovery_fetches == 1
    finally:
        await v.aclose()
    dev = TokenVerifier.from_settings(Settings(dev_mode=True, jwks_url="http://x/jwks"), issuer="http://gw/dev/idp")
    try:
        assert dev.issuer == "http://gw/dev/idp"
        assert dev._configured_jwks_url is None  # the override replaces the whole IdP
    finally:
        await dev.aclose()


# -- token extraction ----------------------------------------------------------------------------


def test_extract_from_header() -> None:
    src = extract_token({"Authorization": "Bearer abc.def.ghi"}, [], {}, allow_query=True)
    assert src == ("abc.def.ghi", "header", None)
    src = extract_token({"authorization": "bearer  abc.def.ghi "}, [SUBPROTOCOL], {}, allow_query=True)
    assert src == ("abc.def.ghi", "header", SUBPROTOCOL)


def test_extract_header_wins_over_subprotocol_and_query() -> None:
    src = extract_token(
        {"Authorization": "Bearer from.header.x"},
        [SUBPROTOCOL, "bearer.from.sub.x"],
        {"access_token": "from.query.x"},
        allow_query=True,
    )
    assert (src.token, src.via) == ("from.header.x", "header")


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token a.b.c", "Bearer a b"])
async def test_malformed_header_does_not_fall_through(verifier: TokenVerifier, value: str) -> None:
    src = extract_token({"Authorization": value}, ["bearer.x.y.z"], {"access_token": "q.q.q"}, allow_query=True)
    assert (src.token, src.via) == ("", "header")
    assert (await refused(verifier, src.token)).reason == "malformed"


def test_extract_from_subprotocol() -> None:
    src = extract_token({}, ["wsgateway.v1", "bearer.aaa.bbb.ccc"], {"access_token": "q.q.q"}, allow_query=True)
    assert src == ("aaa.bbb.ccc", "subprotocol", "wsgateway.v1")
    src = extract_token({}, ["bearer.aaa.bbb.ccc"], {}, allow_query=True)
    assert src == ("aaa.bbb.ccc", "subprotocol", None)


def test_extract_from_query_only_when_allowed() -> None:
    assert extract_token({}, [], {"access_token": "q.q.q"}, allow_query=True) == ("q.q.q", "query", None)
    assert extract_token({}, [], {"access_token": "q.q.q"}, allow_query=False) == (None, None, None)


def test_extract_none() -> None:
    assert extract_token({}, [SUBPROTOCOL], {}, allow_query=True) == (None, None, SUBPROTOCOL)


async def test_extracted_subprotocol_token_verifies(idp: TestIdP, verifier: TokenVerifier) -> None:
    token = idp.mint("dave", alg="EdDSA")
    src = extract_token({"Host": "x"}, [SUBPROTOCOL, f"bearer.{token}"], {}, allow_query=False)
    assert (await verifier.verify(src.token)).subject == "dave"


# -- development identity provider --------------------------------------------------------------


@pytest.fixture
def dev_idp_server() -> Iterator[DevIdentityProvider]:
    port = free_port()
    dev = DevIdentityProvider(f"http://127.0.0.1:{port}/dev/idp")
    app = FastAPI()
    app.include_router(dev.router(), prefix="/dev/idp")
    with serve_app(app, port):
        yield dev


async def test_dev_idp_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="gateway.devtools.devidp"):
        DevIdentityProvider("http://127.0.0.1:1/dev/idp")
    assert "INSECURE" in caplog.text and "Development only" in caplog.text


async def test_dev_idp_tokens_verify_through_discovery(dev_idp_server: DevIdentityProvider) -> None:
    dev = dev_idp_server
    async with httpx.AsyncClient() as http:
        discovery = (await http.get(f"{dev.issuer}/.well-known/openid-configuration")).json()
        assert discovery["issuer"] == dev.issuer
        assert discovery["jwks_uri"] == f"{dev.issuer}/jwks.json"
        assert discovery["token_endpoint"] == f"{dev.issuer}/token"
        got = await http.get(f"{dev.issuer}/token", params={"sub": "erin@example.com", "groups": "a, b,,a"})
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["token_type"], body["expires_in"]) == ("Bearer", 3600)
        assert got.headers["cache-control"] == "no-store"
        posted = await http.post(f"{dev.issuer}/token", data={"sub": "frank", "tenant": "t2", "ttl_s": "60"})
        as_json = await http.post(f"{dev.issuer}/token", json={"sub": "gina", "groups": ["x"]})

    verifier = TokenVerifier(issuer=dev.issuer, jwks_url=None, audience=dev.audience)
    try:
        await verifier.start()
        await eventually(lambda: verifier.ready, what="the JWKS to be loaded")
        erin = await verifier.verify(body["access_token"])
        assert (erin.subject, erin.tenant, erin.groups) == ("erin@example.com", "demo", ("a", "b"))
        frank = await verifier.verify(posted.json()["access_token"])
        assert (frank.subject, frank.tenant) == ("frank", "t2")
        assert abs(frank.expires_at - (time.time() + 60)) < 5
        assert (await verifier.verify(as_json.json()["access_token"])).ids == {"user:gina", "group:x"}
        minted = await verifier.verify(dev.mint("henry", tenant="t3", groups=["g"], ttl_s=120))
        assert (minted.subject, minted.tenant, minted.groups) == ("henry", "t3", ("g",))
    finally:
        await verifier.aclose()

    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert {"iss", "aud", "sub", "iat", "nbf", "exp", "tenant", "groups"} <= claims.keys()
    assert jwt.get_unverified_header(body["access_token"])["kid"] == dev.kid


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"sub": ""},
        {"sub": "has space"},
        {"sub": "a/b"},
        {"sub": "ok", "tenant": "bad tenant"},
        {"sub": "ok", "ttl_s": "0"},
        {"sub": "ok", "ttl_s": "86401"},
        {"sub": "ok", "ttl_s": "soon"},
        {"sub": "ok", "groups": "good,b@d group"},
    ],
)
async def test_dev_idp_rejects_bad_input(dev_idp_server: DevIdentityProvider, params: dict[str, str]) -> None:
    async with httpx.AsyncClient() as http:
        for response in (
            await http.get(f"{dev_idp_server.issuer}/token", params=params),
            await http.post(f"{dev_idp_server.issuer}/token", data=params),
        ):
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "invalid_request"
            assert response.json()["error_description"]


def test_dev_idp_mint_validates() -> None:
    dev = DevIdentityProvider("http://127.0.0.1:1/dev/idp")
    with pytest.raises(ValueError):
        dev.mint("has space")
    with pytest.raises(ValueError):
        dev.mint("ok", ttl_s=0)


# -- the real npm oidc-provider ------------------------------------------------------------------


async def test_oidc_provider_client_credentials_token_accepted() -> None:
    with OidcProviderProcess(tenant="globex", groups=("ops", "audit")) as op:
        token = op.token()
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        verifier = TokenVerifier(issuer=op.issuer, jwks_url=None, audience=op.audience)
        try:
            await verifier.start()
            await eventually(lambda: verifier.ready, what="the JWKS to be loaded")
            principal = await verifier.verify(token)
            # A token for another resource server is refused by audience.
            other = TokenVerifier(issuer=op.issuer, jwks_url=None, audience="urn:someone-else")
            try:
                assert (await refused(other, token)).reason == "wrong_audience"
            finally:
                await other.aclose()
        finally:
            await verifier.aclose()
    assert principal.subject == op.client_id  # client_credentials: sub is the client
    assert principal.tenant == "globex"
    assert principal.groups == ("ops", "audit")
