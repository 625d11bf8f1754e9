"""The authenticated user of a connection: a leaf module, so the fan-out core needs no JWT or HTTP client.

`gateway.auth` makes Principals from verified tokens; the hub, the permission layer and the edge only
read them.
"""

from __future__ import annotations

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

    @property
    def name(self) -> str:
        """The principal's own ACL identity."""
        return f"user:{self.subject}"

    @property
    def ids(self) -> frozenset[str]:
        """Every ACL identity this principal holds: itself and its groups."""
        return frozenset((self.name, *(f"group:{g}" for g in self.groups)))


__all__ = ["AUTH_FAILURE_REASONS", "Principal"]
