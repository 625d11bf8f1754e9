"""Authentication: verify OIDC/JWT access tokens against the identity provider's JWKS.

Why it is built this way:

* The gateway never talks to the IdP per connection. It loads the JWKS once (via OIDC discovery or
  an explicit URL), caches the parsed keys by ``kid`` and verifies signatures locally; verifying is
  CPU-bound and cheap, so it runs synchronously on the hot path.
* Key rotation works without restarts: a token whose ``kid`` is unknown triggers a JWKS refetch, but
  at most one per ``refresh_min_interval_s`` (concurrent callers share one in-flight fetch), so
  clients presenting garbage key ids cannot turn the gateway into a DoS amplifier against the IdP.
  A periodic refresh also drops keys the IdP has withdrawn.
* Only asymmetric algorithms are accepted (RS256, ES256, EdDSA/Ed25519), and the JWK's key type must
  match the token's ``alg``: this closes the classic "alg: none" and "HS256 signed with the RSA
  public key" confusion attacks.
* Every failure is an :class:`AuthError` whose ``reason`` comes from a small fixed set (a bounded
  Prometheus label) and whose ``message`` is safe to show to the client (it never echoes the token).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import httpx
import jwt
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt import exceptions as jwt_errors

from gateway.events import NAME_PATTERN, NAME_RE
from gateway.principal import AUTH_FAILURE_REASONS, Principal, profile_name, profile_picture

if TYPE_CHECKING:

    from gateway.config import Settings

log = logging.getLogger(__name__)


#: WebSocket subprotocol of the gateway; browsers offer it next to ``bearer.<jwt>``.
SUBPROTOCOL = "wsgateway.v1"
_BEARER_SUBPROTOCOL_PREFIX = "bearer."

#: Algorithms the gateway accepts, and the JWK key type (kty, crv) each one requires.
_ALG_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "EdDSA": ("OKP", "Ed25519"),
}
_KEY_TYPE_ALGS: dict[tuple[str, str | None], str] = {v: k for k, v in _ALG_KEY_TYPES.items()}

# Compact JWS: three base64url segments (the signature is empty for alg "none", rejected later).
_COMPACT_JWS_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_TOKEN_CHARS = 16 * 1024  # larger is no access token; do not spend CPU on it
_MAX_SUBJECT_CHARS = 255  # OIDC Core: sub is at most 255 ASCII characters
_MAX_DOCUMENT_BYTES = 1024 * 1024  # discovery document / JWKS
_MIN_RSA_BITS = 2048
_UNLOADED_RETRY_S = 1.0  # least time between verify-triggered fetches while no JWKS was ever loaded
_BACKOFF_INITIAL_S = 0.1
_BACKOFF_MAX_S = 5.0
_DEFAULT_HTTP_TIMEOUT = httpx.Timeout(5.0, connect=2.0)


class AuthError(Exception):
    """A token was refused. ``reason`` is one of :data:`AUTH_FAILURE_REASONS`; ``message`` is client-safe."""

    reason: str
    message: str

    def __init__(self, reason: str, message: str) -> None:
        if reason not in AUTH_FAILURE_REASONS:
            raise ValueError(f"unknown auth failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"AuthError({self.reason!r}, {self.message!r})"


class TokenSource(NamedTuple):
    """Where :func:`extract_token` found the token of a handshake."""

    token: str | None
    via: str | None  # "header" | "subprotocol" | "query" | None
    subprotocol: str | None  # SUBPROTOCOL when the client offered it (to echo back), else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works on plain dicts as well as Starlette ``Headers``."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


class Lookup(Protocol):
    """What extract_token reads of a query (a Mapping, Starlette's QueryParams, the session's Query)."""

    def get(self, key: str, /) -> str | None: ...


def extract_token(
    headers: Mapping[str, str],
    subprotocols: Sequence[str],
    query: Lookup,
    *,
    allow_query: bool,
) -> TokenSource:
    """Find the bearer token of a WebSocket/HTTP handshake.

    Order: the ``Authorization: Bearer <jwt>`` header; else a ``bearer.<jwt>`` subprotocol entry
    (browsers cannot set headers on WebSockets, so they send ``["wsgateway.v1", "bearer.<jwt>"]``);
    else the ``access_token`` query parameter when ``allow_query`` (query strings end up in access
    logs, so operators can turn it off).

    A present but malformed ``Authorization`` header (another scheme, or ``Bearer`` without a token)
    yields ``TokenSource(token="", via="header")``, which :meth:`TokenVerifier.verify` refuses as
    ``malformed``. It deliberately does not fall through to the other sources: a client that sends
    an Authorization header meant it, and silently using a different credential would hide its bug.
    """
    subprotocol = None
    sub_token: str | None = None
    for entry in subprotocols:
        entry = entry.strip()
        if entry == SUBPROTOCOL:
            subprotocol = SUBPROTOCOL
        elif sub_token is None and entry.startswith(_BEARER_SUBPROTOCOL_PREFIX):
            sub_token = entry[len(_BEARER_SUBPROTOCOL_PREFIX) :]

    authorization = _header(headers, "authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials or " " in credentials:
            return TokenSource("", "header", subprotocol)
        return TokenSource(credentials, "header", subprotocol)
    if sub_token is not None:
        return TokenSource(sub_token, "subprotocol", subprotocol)
    if allow_query:
        query_token = query.get("access_token")
        if query_token is not None:
            return TokenSource(query_token, "query", subprotocol)
    return TokenSource(None, None, subprotocol)


@dataclass(frozen=True, slots=True)
class _Key:
    """One parsed JWK: ``alg`` is what its key type can verify (None: a type the gateway does not accept)."""

    kid: str | None
    alg: str | None
    declared_alg: str | None
    key: Any  # cryptography public key object, or None when alg is None


class _FetchError(Exception):
    """Discovery or JWKS fetch failed (network, HTTP status, or an unusable document)."""


def _parse_jwk(jwk: Mapping[str, Any]) -> _Key | None:
    """Parse one JWK; None for keys that can never verify a signature (encryption keys, junk)."""
    kid = jwk.get("kid")
    kid = kid if isinstance(kid, str) else None
    use = jwk.get("use")
    if use is not None and use != "sig":
        log.debug("JWKS: skipping key %r with use=%r", kid, use)
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        log.debug("JWKS: skipping key %r without the verify key_op", kid)
        return None
    if "d" in jwk or "k" in jwk:
        # Private or symmetric material has no business in a public JWKS; never use it.
        log.warning("JWKS: skipping key %r that carries private or symmetric material", kid)
        return None
    kty = jwk.get("kty")
    crv = jwk.get("crv") if kty in ("EC", "OKP") else None
    declared = jwk.get("alg")
    declared = declared if isinstance(declared, str) else None
    alg = _KEY_TYPE_ALGS.get((kty, crv)) if isinstance(kty, str) else None
    if alg is None:
        # Keep it (as unusable) so that a token naming it fails as bad_algorithm, not unknown_key.
        return _Key(kid, None, declared, None)
    try:
        parsed = jwt.PyJWK(dict(jwk), algorithm=alg).key
    except (jwt_errors.PyJWTError, ValueError, TypeError, KeyError) as exc:
        log.warning("JWKS: skipping unparsable %s key %r: %s", kty, kid, exc)
        return None
    if kty == "RSA" and parsed.key_size < _MIN_RSA_BITS:
        log.warning("JWKS: skipping RSA key %r of %d bits (< %d)", kid, parsed.key_size, _MIN_RSA_BITS)
        return None
    return _Key(kid, alg, declared, parsed)


def _parse_jwks(document: Any) -> dict[str | None, list[_Key]]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("JWKS document has no 'keys' list")
    keys: dict[str | None, list[_Key]] = {}
    for jwk in document["keys"]:
        if isinstance(jwk, dict) and (parsed := _parse_jwk(jwk)) is not None:
            keys.setdefault(parsed.kid, []).append(parsed)
    return keys


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by exact name, else by dotted path (``realm_access.roles``); exact wins (URL-named claims)."""
    if name in claims:
        return claims[name]
    if "." not in name:
        return None
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


_MESSAGES: dict[str, str] = {
    "expired": "token has expired",
    "not_yet_valid": "token is not valid yet",
    "bad_signature": "token signature is invalid",
    "wrong_issuer": "token was issued by another issuer",
    "wrong_audience": "token is meant for another audience",
    "bad_algorithm": "token algorithm is not accepted",
    "missing_claim": "token lacks a required claim",
    "malformed": "token is malformed",
}


def _b64url(segment: str) -> bytes:
    """A canonical unpadded base64url segment (its alphabet is checked by _COMPACT_JWS_RE); ValueError else.

    Canonical: the unused low bits of the last character are zero, as PyJWT requires (one token, one
    encoding)."""
    rest = len(segment) % 4
    if rest == 1:
        raise ValueError("impossible base64 length")
    if rest and _B64URL_VALUE[segment[-1]] & _UNUSED_BITS[rest]:
        raise ValueError("non-canonical base64")
    return binascii.a2b_base64(segment.encode("ascii").translate(_B64URL_TO_STANDARD) + _PADDING[rest])


_B64URL_VALUE = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_UNUSED_BITS = {2: 0b1111, 3: 0b11}  # 2 characters left: 12 bits for 8; 3 characters: 18 bits for 16
_PADDING = {0: b"", 2: b"==", 3: b"="}
_B64URL_TO_STANDARD = bytes.maketrans(b"-_", b"+/")  # a byte table (str.translate looks up each character)


def _json(data: bytes) -> Any:
    """`json.loads` (what PyJWT uses, and what decides what a token may hold), through orjson when orjson
    accepts it: orjson is stricter (no NaN, no integers beyond 64 bits), never laxer, and the values of
    what both read are the same."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _int_claim(value: Any) -> int | None:
    """A NumericDate claim as PyJWT reads it (`int(value)`); None when it is not one."""
    try:
        return int(value)
    except (ValueError, TypeError, OverflowError):
        return None


def _check_crit(header: Mapping[str, Any]) -> None:
    """RFC 7515 4.1.11, as PyJWT: `crit` lists extensions the verifier must understand; only `b64` (RFC
    7797) is known, and its unencoded (detached) form is never what an access token is."""
    if header.get("b64", True) is False:
        raise AuthError("malformed", "token is malformed")
    if "crit" not in header:
        return
    crit = header["crit"]
    if not isinstance(crit, list) or not crit or any(ext != "b64" or ext not in header for ext in crit):
        raise AuthError("malformed", "token is malformed")


MAX_EXPIRES_AT = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the latest expiry a Principal carries
_SHA256 = hashes.SHA256()  # stateless descriptions of the algorithms, made once
_PKCS1V15 = padding.PKCS1v15()
_ECDSA_SHA256 = ec.ECDSA(_SHA256)


def _signature_ok(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """The JWS signature over `signing_input`, checked with the prepared public key (cryptography)."""
    try:
        if alg == "RS256":
            key.verify(signature, signing_input, _PKCS1V15, _SHA256)
        elif alg == "ES256":
            if len(signature) != 64:  # JWS: r || s, 32 bytes each (RFC 7518 3.4)
                return False
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, _ECDSA_SHA256)
        elif alg == "EdDSA":
            key.verify(signature, signing_input)
        else:
            return False
    except InvalidSignature:
        return False
    return True


class TokenVerifier:
    """Verifies access tokens of one identity provider; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        issuer: str | None,
        jwks_url: str | None,
        audience: str | None,
        tenant_claim: str = "tenant",
        groups_claim: str = "groups",
        leeway_s: float = 30,
        refresh_min_interval_s: float = 30,
        http: httpx.AsyncClient | None = None,
        max_age_s: float = 300,
    ) -> None:
        """``issuer``: required ``iss`` and, without ``jwks_url``, where discovery starts.

        ``audience``: required ``aud`` (None: not checked). ``max_age_s``: period of the background
        JWKS refresh that drops withdrawn keys (0 disables it).
        """
        if not issuer and not jwks_url:
            raise ValueError("TokenVerifier needs an issuer (for discovery) or a jwks_url")
        self.issuer = issuer or None
        self.audience = audience or None
        self.tenant_claim = tenant_claim
        self.groups_claim = groups_claim
        self.leeway_s = float(leeway_s)
        self.refresh_min_interval_s = float(refresh_min_interval_s)
        self.max_age_s = float(max_age_s)
        self._configured_jwks_url = jwks_url or None
        self._jwks_url: str | None = self._configured_jwks_url
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=_DEFAULT_HTTP_TIMEOUT,
            follow_redirects=True,
            headers={"Accept": "application/json", "User-Agent": "wsgateway"},
        )
        self._keys: dict[str | None, list[_Key]] = {}
        self._loaded = False
        self._last_attempt = float("-inf")  # monotonic time of the last fetch start (any cause)
        self._last_kid_refresh = float("-inf")  # ... of the last fetch started for an unknown kid
        self._inflight: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._closed = False
        self._initial_failures = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, issuer: str | None = None) -> TokenVerifier:
        """Build from :class:`gateway.config.Settings`.

        ``issuer`` overrides the configured IdP entirely (``wsgateway dev`` points the gateway at its
        own development IdP); the configured ``jwks_url`` then belongs to another IdP and is ignored.
        """
        return cls(
            issuer=issuer or settings.oidc_issuer,
            jwks_url=None if issuer else settings.jwks_url,
            audience=settings.audience,
            tenant_claim=settings.tenant_claim,
            groups_claim=settings.groups_claim,
            leeway_s=settings.jwt_leeway_s,
            refresh_min_interval_s=settings.jwks_refresh_min_interval_s,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start loading the JWKS in the background and return at once.

        The first load retries with capped exponential backoff (with jitter) until it succeeds: the
        issuer may be this very gateway (development IdP), which is not listening yet. Afterwards the
        JWKS is refreshed every ``max_age_s``.
        """
        if self._background is None and not self._closed:
            self._background = asyncio.create_task(self._run(), name="jwks-loader")

    @property
    def ready(self) -> bool:
        """True once the JWKS has been loaded at least once."""
        return self._loaded

    async def aclose(self) -> None:
        """Stop background work and close the HTTP client if this verifier created it."""
        self._closed = True
        for task in (self._background, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._background = self._inflight = None
        if self._owns_http:
            await self._http.aclose()

    async def _run(self) -> None:
        delay = _BACKOFF_INITIAL_S
        while not self._loaded:
            await self._fetch_shared()
            if self._loaded:
                break
            await asyncio.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX_S)
        while self.max_age_s > 0:
            await asyncio.sleep(self.max_age_s)
            await self._fetch_shared()

    # -- fetching ------------------------------------------------------------------------------

    async def _fetch_shared(self) -> None:
        """Run one fetch, or join the one in flight (failures are logged by :meth:`_fetch`)."""
        if self._closed:
            return
        if self._inflight is None or self._inflight.done():
            self._last_attempt = time.monotonic()
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
        # Shielded: a cancelled caller (client went away) must not cancel the fetch others await.
        await asyncio.shield(self._inflight)

    async def _refresh_on_demand(self, *, unknown_kid: bool) -> None:
        """A fetch for a request that cannot be served from the cached keys, if the rate limit allows.

        Joining a fetch already in flight is free. Otherwise unknown key ids may start at most one
        fetch per ``refresh_min_interval_s`` (counted between kid-triggered fetches only, so a rotation
        right after start-up or a periodic refresh is still picked up), and while no JWKS was ever
        loaded requests may start at most one fetch per second on top of the start-up retries.
        """
        if self._inflight is not None and not self._inflight.done():
            await self._fetch_shared()
            return
        now = time.monotonic()
        if unknown_kid:
            if now - self._last_kid_refresh < self.refresh_min_interval_s:
                return
            self._last_kid_refresh = now
        elif now - self._last_attempt < min(_UNLOADED_RETRY_S, self.refresh_min_interval_s):
            return
        await self._fetch_shared()

    async def _fetch(self) -> None:
        """One discovery (when needed) + JWKS fetch. Never raises: a failure keeps the old keys."""
        try:
            if self._jwks_url is None:
                self._jwks_url = await self._discover()
            keys = _parse_jwks(await self._get_json(self._jwks_url))
        except Exception as exc:
            if self._configured_jwks_url is None:
                self._jwks_url = None  # rediscover next time: the jwks_uri may have moved
            if not isinstance(exc, _FetchError):
                log.exception("JWKS fetch failed unexpectedly")
            elif self._loaded:
                log.warning("JWKS refresh failed, keeping the previous keys: %s", exc)
            else:
                # Expected for a moment when the issuer is this gateway (dev IdP) and not up yet;
                # escalated when it persists, since the gateway cannot authenticate anyone meanwhile.
                self._initial_failures += 1
                level = logging.WARNING if self._initial_failures % 10 == 5 else logging.INFO
                log.log(level, "JWKS not loaded yet (attempt %d failed): %s", self._initial_failures, exc)
            return
        self._keys = keys
        self._loaded = True
        log.info("JWKS loaded from %s: %d key id(s)", self._jwks_url, len(keys))

    async def _discover(self) -> str:
        assert self.issuer is not None
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url)
        if not isinstance(document, dict):
            raise _FetchError(f"discovery document at {url} is not a JSON object")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise _FetchError(f"discovery document at {url} has no usable jwks_uri")
        if document.get("issuer") != self.issuer:
            log.warning(
                "discovery document issuer %r differs from the configured issuer %r; tokens must carry "
                "the configured one",
                document.get("issuer"),
                self.issuer,
            )
        return jwks_uri

    async def _get_json(self, url: str) -> Any:
        try:
            async with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _FetchError(f"GET {url}: HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_DOCUMENT_BYTES:
                        raise _FetchError(f"GET {url}: document larger than {_MAX_DOCUMENT_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise _FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _FetchError(f"GET {url}: not JSON") from exc

    # -- verification --------------------------------------------------------------------------

    def _lookup(self, kid: str | None, alg: str) -> _Key | None:
        if kid is not None:
            candidates = self._keys.get(kid, [])
        else:
            # No kid in the token: usable only when exactly one key could have signed it.
            candidates = [k for ks in self._keys.values() for k in ks if k.alg == alg]
            if len(candidates) != 1:
                return None
        if not candidates:
            return None
        return next((k for k in candidates if k.alg == alg), candidates[0])

    async def _key_for(self, kid: str | None, alg: str) -> _Key:
        if not self._loaded:
            await self._refresh_on_demand(unknown_kid=False)
            if not self._loaded:
                raise AuthError("jwks_unavailable", "the identity provider's keys are not available")
        key = self._lookup(kid, alg)
        if key is None:
            # Maybe the IdP rotated its keys: refetch, but rate-limited and shared between callers.
            await self._refresh_on_demand(unknown_kid=True)
            key = self._lookup(kid, alg)
        if key is None:
            raise AuthError("unknown_key", "token was signed with an unknown key")
        return key

    async def verify(self, token: str | None) -> Principal:
        """Verify ``token`` and return its principal; raise :class:`AuthError` otherwise.

        ``None`` is ``missing``; an empty string (what :func:`extract_token` returns for a broken
        Authorization header) is ``malformed``.
        """
        if token is None:
            raise AuthError("missing", "no access token")
        if len(token) > _MAX_TOKEN_CHARS or not _COMPACT_JWS_RE.fullmatch(token):
            raise AuthError("malformed", "token is not a JWT")
        h_seg, p_seg, s_seg = token.split(".")  # exactly three: the pattern above
        try:
            header = _json(_b64url(h_seg))
        except ValueError:
            raise AuthError("malformed", "token header is not decodable") from None
        if not isinstance(header, dict):
            raise AuthError("malformed", "token header is not decodable")
        alg = header.get("alg")
        if alg not in _ALG_KEY_TYPES:
            raise AuthError("bad_algorithm", "token algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed", "token key id is not a string")

        key = await self._key_for(kid, alg)
        if key.alg != alg or (key.declared_alg is not None and key.declared_alg != alg):
            raise AuthError("bad_algorithm", "token algorithm does not match its key")

        _check_crit(header)
        try:
            payload, signature = _b64url(p_seg), _b64url(s_seg)
        except ValueError:
            raise AuthError("malformed", "token is malformed") from None
        if not _signature_ok(alg, key.key, f"{h_seg}.{p_seg}".encode(), signature):
            raise AuthError("bad_signature", _MESSAGES["bad_signature"])
        try:
            claims = _json(payload)
        except ValueError:
            raise AuthError("malformed", "token is malformed") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed", "token is malformed")
        self._check_claims(claims)
        return self._principal(claims)

    def _check_claims(self, claims: dict[str, Any]) -> None:
        """The registered claims, with PyJWT's rules (`jwt.decode` with require=[exp, sub]) and reasons."""
        for name in ("exp", "sub"):
            if claims.get(name) is None:
                raise AuthError("missing_claim", f"token lacks the required {name!r} claim")
        now, leeway = time.time(), self.leeway_s
        if "iat" in claims:
            iat = _int_claim(claims["iat"])
            if iat is None:
                raise AuthError("malformed", _MESSAGES["malformed"])
            if iat > now + leeway:
                raise AuthError("not_yet_valid", _MESSAGES["not_yet_valid"])
        if "nbf" in claims:
            nbf = _int_claim(claims["nbf"])
            if nbf is None:
                raise AuthError("malformed", _MESSAGES["malformed"])
            if nbf > now + leeway:
                raise AuthError("not_yet_valid", _MESSAGES["not_yet_valid"])
        exp = _int_claim(claims["exp"])
        if exp is None:
            raise AuthError("malformed", _MESSAGES["malformed"])
        if exp <= now - leeway:
            raise AuthError("expired", _MESSAGES["expired"])
        if self.issuer is not None:
            if "iss" not in claims:
                raise AuthError("wrong_issuer", "token lacks the required 'iss' claim")
            if not isinstance(claims["iss"], str) or claims["iss"] != self.issuer:
                raise AuthError("wrong_issuer", _MESSAGES["wrong_issuer"])
        if self.audience is not None:
            aud = claims.get("aud")
            if not aud:
                raise AuthError("wrong_audience", "token lacks the required 'aud' claim")
            auds = [aud] if isinstance(aud, str) else aud
            if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds) or self.audience not in auds:
                raise AuthError("wrong_audience", _MESSAGES["wrong_audience"])
        if not isinstance(claims["sub"], str):
            raise AuthError("missing_claim", _MESSAGES["missing_claim"])
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise AuthError("malformed", _MESSAGES["malformed"])

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 0 < len(sub) <= _MAX_SUBJECT_CHARS:
            raise AuthError("missing_claim", "token 'sub' claim must be a non-empty string")
        tenant = _claim(claims, self.tenant_claim)
        if not isinstance(tenant, str) or not NAME_RE.match(tenant):
            raise AuthError("missing_claim", f"token {self.tenant_claim!r} claim must match {NAME_PATTERN}")
        raw_groups = _claim(claims, self.groups_claim)
        if raw_groups is None:
            groups: tuple[str, ...] = ()
        elif isinstance(raw_groups, str):
            groups = (raw_groups,) if raw_groups else ()
        elif isinstance(raw_groups, list) and all(isinstance(g, str) for g in raw_groups):
            groups = tuple(dict.fromkeys(g for g in raw_groups if g))
        else:
            raise AuthError("missing_claim", f"token {self.groups_claim!r} claim must be a string list")
        try:  # a NumericDate (_check_claims), read as PyJWT reads it; one beyond the year 9999 is that year
            expires_at = min(float(claims["exp"]), MAX_EXPIRES_AT)  # (frames carry it as a 64-bit integer)
        except OverflowError:
            expires_at = MAX_EXPIRES_AT
        return Principal(subject=sub, tenant=tenant, groups=groups, expires_at=expires_at,
                         display_name=profile_name(claims.get("name")), picture=profile_picture(claims.get("picture")))
