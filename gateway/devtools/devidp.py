"""The development identity provider: hands out signed tokens to anyone who asks.

Why it exists: ``wsgateway dev`` should give a working gateway with one command, without setting up
Keycloak/Auth0 first. It is a *real* OIDC-shaped issuer (discovery document, JWKS, signed ES256
tokens with a ``kid``), so the gateway verifies its tokens through exactly the same code path as in
production (:class:`gateway.auth.TokenVerifier` with discovery) — dev mode exercises the real thing.

It is INSECURE by design (no client authentication: ``GET /token?sub=root`` returns a token for
anyone) and must never be mounted outside ``wsgateway dev``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from gateway.events import NAME_PATTERN

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
SUBJECT_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"
GROUP_PATTERN = r"^[A-Za-z0-9_.@:-]{1,128}$"
MAX_TTL_S = 86400
_MAX_GROUPS = 64
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

_WARNING = """
************************************************************************************
*  INSECURE DEVELOPMENT IDENTITY PROVIDER ENABLED                                  *
*  Issuer: {issuer:<72}*
*  Anyone who can reach {token_path:<58}*
*  gets a signed token for ANY user, tenant and groups. Development only:          *
*  never expose this gateway; configure WSGATEWAY_OIDC_ISSUER in production.       *
************************************************************************************"""


class TokenRequest(BaseModel):
    """Parameters of ``/token`` (query string, form body or JSON body)."""

    sub: str = Field(pattern=SUBJECT_PATTERN)
    tenant: str = Field("demo", pattern=NAME_PATTERN)
    groups: tuple[str, ...] = ()
    ttl_s: float = Field(3600, ge=1, le=MAX_TTL_S)

    @field_validator("groups", mode="before")
    @classmethod
    def _split_groups(cls, value: Any) -> Any:
        """Accept "a,b" (query/form) as well as a JSON list; blanks are dropped."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            value = tuple(g.strip() if isinstance(g, str) else g for g in value)
            value = tuple(g for g in value if g != "")
        return value

    @field_validator("groups")
    @classmethod
    def _check_groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > _MAX_GROUPS:
            raise ValueError(f"at most {_MAX_GROUPS} groups")
        for group in value:
            if not re.fullmatch(GROUP_PATTERN, group):
                raise ValueError(f"group names must match {GROUP_PATTERN}")
        return tuple(dict.fromkeys(value))


class DevIdentityProvider:
    """An in-process, insecure OIDC-style token issuer for ``wsgateway dev``."""

    def __init__(
        self,
        issuer: str,
        *,
        audience: str = "wsgateway",
        tenant_claim: str = "tenant",
        groups_claim: str = "groups",
    ) -> None:
        """Generate a fresh signing key (tokens die with the process) and warn loudly."""
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.groups_claim = groups_claim
        self._private_key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "dev-" + secrets.token_urlsafe(12)
        public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._private_key.public_key()))
        self._public_jwk: dict[str, Any] = {**public_jwk, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}
        log.warning(
            _WARNING.format(issuer=self.issuer, token_path=f"{self.issuer}/token "),
        )

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document."""
        return {"keys": [dict(self._public_jwk)]}

    def discovery(self) -> dict[str, Any]:
        """The OpenID Connect discovery document."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": self.token_endpoint,
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "token_endpoint_auth_methods_supported": ["none"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": [
                *("iss", "aud", "sub", "iat", "nbf", "exp", "jti"),
                self.tenant_claim,
                self.groups_claim,
            ],
        }

    def mint(self, sub: str, *, tenant: str = "demo", groups: Sequence[str] = (), ttl_s: float = 3600) -> str:
        """A signed token for ``sub``; raises ``ValueError`` on parameters the gateway would refuse."""
        try:
            request = TokenRequest(sub=sub, tenant=tenant, groups=tuple(groups), ttl_s=ttl_s)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None
        return self._sign(request)

    def _sign(self, request: TokenRequest) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": request.sub,
            "iat": now,
            "nbf": now,
            "exp": now + int(request.ttl_s),
            "jti": secrets.token_urlsafe(12),
            self.tenant_claim: request.tenant,
            self.groups_claim: list(request.groups),
        }
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def router(self) -> APIRouter:
        """Routes relative to the mount point (the gateway mounts them at ``/dev/idp``)."""
        router = APIRouter(tags=["development identity provider (insecure)"])

        @router.get("/.well-known/openid-configuration")
        async def openid_configuration() -> JSONResponse:
            return JSONResponse(self.discovery())

        @router.get("/jwks.json")
        async def jwks() -> JSONResponse:
            return JSONResponse(self.jwks())

        @router.api_route("/token", methods=["GET", "POST"])
        async def token(request: Request) -> JSONResponse:
            params: dict[str, Any] = dict(request.query_params)
            if request.method == "POST":
                try:
                    params.update(await _body_params(request))
                except ValueError as exc:
                    return _error(str(exc))
            try:
                token_request = TokenRequest.model_validate(params)
            except ValidationError as exc:
                return _error(_describe(exc))
            return JSONResponse(
                {
                    "access_token": self._sign(token_request),
                    "token_type": "Bearer",
                    "expires_in": int(token_request.ttl_s),
                },
                headers=_NO_STORE,
            )

        return router


async def _body_params(request: Request) -> Mapping[str, Any]:
    """Form or JSON body parameters (parsed by hand: python-multipart is not a dependency)."""
    body = await request.body()
    if not body:
        return {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            document = json.loads(body)
        except ValueError:
            raise ValueError("body is not valid JSON") from None
        if not isinstance(document, dict):
            raise ValueError("JSON body must be an object")
        return document
    if content_type in ("application/x-www-form-urlencoded", ""):
        try:
            return dict(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=True))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("body is not a valid form") from None
    raise ValueError(f"unsupported content type {content_type!r}")


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors())


def _error(description: str) -> JSONResponse:
    return JSONResponse(
        {"error": "invalid_request", "error_description": description}, status_code=400, headers=_NO_STORE
    )
