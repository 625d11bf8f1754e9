"""A real test identity provider: RSA/EC/Ed25519 keys, a JWKS and OIDC discovery over real HTTP.

Why: the verifier must be tested through the protocol it speaks in production (discovery document
-> jwks_uri -> JWKS over HTTP) with real signatures, not with mocks. The server runs in its own
thread (``http.server``), so it is independent of the test's event loop, and it counts requests so
tests can assert how often the gateway hits the IdP (rotation, rate limiting).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support.wait import HANG_S

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

#: Key family used to sign each algorithm the test IdP can mint.
_FAMILY = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "ES256": "EC",
    "EdDSA": "OKP",
}
_FAMILY_DEFAULT_ALG = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


def generate_key(alg: str) -> PrivateKey:
    """A fresh private key for ``alg`` (RSA-2048, EC P-256 or Ed25519)."""
    family = _FAMILY[alg]
    if family == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if family == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public JWK of ``key`` (no kid/alg/use)."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(public, as_dict=True)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(public, as_dict=True)
    return OKPAlgorithm.to_jwk(public, as_dict=True)


def public_pem(key: PrivateKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of ``key`` (what a key-confusion attacker would use as HMAC secret)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@functools.cache
def _initial_keys() -> dict[str, PrivateKey]:
    """The first key of each family, generated once per process.

    Why shared: RSA key generation dominates the fixture's cost and nearly every gateway test starts
    a TestIdP. Each instance still publishes them under fresh random kids, and :meth:`TestIdP.rotate`
    always generates new keys, so tests that need an unrelated key get one.
    """
    return {alg: generate_key(alg) for alg in ("RS256", "ES256", "EdDSA")}


@dataclass
class _Published:
    kid: str
    family: str
    private: PrivateKey
    jwk: dict[str, Any]  # as served


class TestIdP:
    """An OIDC-shaped issuer on a free loopback port; use as a context manager (or start/stop)."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, *, audience: str = "wsgateway-test", port: int = 0) -> None:
        self.audience = audience
        self._lock = threading.Lock()
        self._keys: dict[str, _Published] = {}
        self._default: dict[str, str] = {}  # family -> kid
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        #: Status code served for the JWKS (tests set 500/404 to simulate an outage).
        self.jwks_status = 200
        #: Seconds the JWKS response is delayed (to make concurrent refetches overlap).
        self.jwks_delay_s = 0.0
        #: While set to an unset Event, JWKS requests wait for it (at most HANG_S): a JWKS fetch held open.
        self.jwks_gate: threading.Event | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_url = f"{self.issuer}/jwks.json"
        self.discovery_url = f"{self.issuer}/.well-known/openid-configuration"
        self._thread: threading.Thread | None = None
        for alg, key in _initial_keys().items():
            self.rotate(alg, key=key)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> TestIdP:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> TestIdP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- keys ------------------------------------------------------------------------------------

    def rotate(
        self,
        alg: str = "RS256",
        *,
        jwk_extra: Mapping[str, Any] | None = None,
        drop_jwk: Iterable[str] = (),
        key: PrivateKey | None = None,
    ) -> str:
        """Publish a new key (fresh unless ``key`` is given) for ``alg``'s family and make it that
        family's default; returns its kid.

        ``jwk_extra`` overrides served JWK members (e.g. ``{"alg": "RS512"}`` or ``{"use": "enc"}``),
        ``drop_jwk`` removes members (e.g. ``("alg", "use")``).
        """
        family = _FAMILY[alg]
        private = key if key is not None else generate_key(alg)
        kid = f"{family.lower()}-{uuid.uuid4().hex[:12]}"
        jwk = {**public_jwk(private), "kid": kid, "alg": _FAMILY_DEFAULT_ALG[family], "use": "sig"}
        jwk.update(jwk_extra or {})
        for member in drop_jwk:
            jwk.pop(member, None)
        with self._lock:
            self._keys[kid] = _Published(kid, family, private, jwk)
            self._default[family] = kid
        return kid

    def remove_key(self, kid: str) -> None:
        """Withdraw ``kid`` from the served JWKS (its private key stays usable for minting)."""
        with self._lock:
            published = self._keys[kid]
            published.jwk = {}  # tombstone: kept for minting, not served

    def kid(self, alg: str = "RS256") -> str:
        """The current default kid for ``alg``'s family."""
        return self._default[_FAMILY[alg]]

    def private_key(self, kid: str) -> PrivateKey:
        return self._keys[kid].private

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [dict(p.jwk) for p in self._keys.values() if p.jwk]}

    # -- tokens ----------------------------------------------------------------------------------

    def claims(
        self,
        sub: str = "alice",
        tenant: str = "acme",
        groups: Iterable[str] | str = (),
        *,
        exp_in: float = 300,
        nbf_in: float | None = None,
        iss: str | None = None,
        aud: str | list[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
    ) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": iss if iss is not None else self.issuer,
            "aud": aud if aud is not None else self.audience,
            "sub": sub,
            "iat": now,
            "exp": now + int(exp_in),
            "tenant": tenant,
            "groups": groups if isinstance(groups, str) else list(groups),
            "jti": secrets.token_hex(8),
        }
        if nbf_in is not None:
            claims["nbf"] = now + int(nbf_in)
        claims.update(extra or {})
        for name in drop:
            claims.pop(name, None)
        return claims

    def mint(
        self,
        sub: str = "alice",
        tenant: str = "acme",
        groups: Iterable[str] | str = (),
        *,
        alg: str = "RS256",
        kid: str | None = None,
        key: PrivateKey | None = None,
        exp_in: float = 300,
        nbf_in: float | None = None,
        iss: str | None = None,
        aud: str | list[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token signed with ``alg``.

        The signing key is ``key`` if given, else the key named by ``kid`` when it is of ``alg``'s
        family, else the family's default key. ``kid`` always goes into the header as given (so a
        token can name an unknown kid, or a kid of another key type). ``drop`` removes claims;
        ``drop=("kid",)`` omits the kid header.
        """
        family = _FAMILY[alg]
        published = self._keys.get(kid) if kid is not None else None
        if key is None:
            if published is not None and published.family == family:
                key = published.private
            else:
                key = self._keys[self._default[family]].private
        header_kid = kid if kid is not None else self._default[family]
        drop = tuple(drop)
        header: dict[str, Any] = {"typ": "JWT"} if "kid" in drop else {"kid": header_kid, "typ": "JWT"}
        header.update(headers or {})
        claims = self.claims(
            sub,
            tenant,
            groups,
            exp_in=exp_in,
            nbf_in=nbf_in,
            iss=iss,
            aud=aud,
            extra=extra,
            drop=[d for d in drop if d != "kid"],
        )
        return jwt.encode(claims, key, algorithm=alg, headers=header)

    def mint_hs256(self, secret: bytes | str, *, kid: str | None = None, **claim_kwargs: Any) -> str:
        """An HS256 token, e.g. with an RSA public key's PEM as secret (the classic key-confusion attack).

        Built by hand: PyJWT (rightly) refuses PEM-looking HMAC secrets.
        """
        secret_bytes = secret.encode() if isinstance(secret, str) else secret
        header = {"alg": "HS256", "typ": "JWT", "kid": kid if kid is not None else self.kid("RS256")}
        signing_input = _b64_json(header) + b"." + _b64_json(self.claims(**claim_kwargs))
        signature = hmac.new(secret_bytes, signing_input, hashlib.sha256).digest()
        return (signing_input + b"." + _b64(signature)).decode()

    def mint_unsigned(self, *, kid: str | None = None, **claim_kwargs: Any) -> str:
        """An ``alg: none`` token with an empty signature."""
        header = {"alg": "none", "typ": "JWT", "kid": kid if kid is not None else self.kid("RS256")}
        return (_b64_json(header) + b"." + _b64_json(self.claims(**claim_kwargs)) + b".").decode()

    # -- HTTP ------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/.well-known/openid-configuration":
                    with idp._lock:
                        idp.discovery_fetches += 1
                    self._send(
                        200,
                        {
                            "issuer": idp.issuer,
                            "jwks_uri": idp.jwks_url,
                            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                            "response_types_supported": ["token"],
                            "subject_types_supported": ["public"],
                        },
                    )
                elif path == "/jwks.json":
                    with idp._lock:
                        idp.jwks_fetches += 1
                    if idp.jwks_delay_s:
                        time.sleep(idp.jwks_delay_s)
                    gate = idp.jwks_gate
                    if gate is not None:
                        gate.wait(HANG_S)
                    if idp.jwks_status != 200:
                        self._send(idp.jwks_status, {"error": "unavailable"})
                    else:
                        self._send(200, idp.jwks())
                else:
                    self._send(404, {"error": "not found"})

            def _send(self, status: int, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        return Handler


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64_json(document: Mapping[str, Any]) -> bytes:
    return _b64(json.dumps(document, separators=(",", ":")).encode())


@pytest.fixture
def idp() -> Iterator[TestIdP]:
    """A started :class:`TestIdP`, stopped after the test."""
    with TestIdP() as server:
        yield server
