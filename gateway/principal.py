"""The authenticated user of a connection: a leaf module, so the fan-out core needs no JWT or HTTP client.

`gateway.auth` makes Principals from verified tokens; the hub, the permission layer and the edge only
read them.
"""

from __future__ import annotations

import re

import pydantic

# Why a token was refused: the `reason` of AuthError and the label of wsgateway_auth_failures_total.
AUTH_FAILURE_REASONS: tuple[str, ...] = (
    "missing",
    "malformed",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "wrong_issuer",
    "wrong_audience",
    "unknown_key",
    "bad_algorithm",
    "missing_claim",
    "jwks_unavailable",
)


class Principal(pydantic.BaseModel, frozen=True):
    """The authenticated user of a connection, as the permission layer sees it."""

    subject: str
    tenant: str
    groups: tuple[str, ...] = ()
    expires_at: float
    # Optional profile claims, shown to other watchers of a scope (presence); None when absent or invalid
    display_name: str | None = None  # the token's `name`
    picture: str | None = None  # the token's `picture`: an https URL

    @property
    def name(self) -> str:
        """The principal's own ACL identity."""
        return f"user:{self.subject}"

    @property
    def ids(self) -> frozenset[str]:
        """Every ACL identity this principal holds: itself and its groups."""
        return frozenset((self.name, *(f"group:{g}" for g in self.groups)))


MAX_NAME_CHARS = 128
MAX_PICTURE_CHARS = 512
_NAME_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]+")  # no control characters (C0, DEL, C1)
_PICTURE_RE = re.compile(r"https://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[\x21-\x7e]*)?")  # printable ASCII, no spaces


def profile_name(value: object) -> str | None:
    """The `name` claim if it is a usable display name (1..128 characters, no control characters), else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not 0 < len(value) <= MAX_NAME_CHARS or _NAME_RE.fullmatch(value) is None:
        return None
    return value


def profile_picture(value: object) -> str | None:
    """The `picture` claim if it is an https URL (at most 512 printable ASCII characters), else None."""
    if not isinstance(value, str) or len(value) > MAX_PICTURE_CHARS:
        return None
    if _PICTURE_RE.fullmatch(value) is None or any(c in value for c in '"<>\\`'):
        return None
    return value


__all__ = ["AUTH_FAILURE_REASONS", "MAX_NAME_CHARS", "MAX_PICTURE_CHARS", "Principal", "profile_name",
           "profile_picture"]
