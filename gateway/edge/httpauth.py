"""What every HTTP read API shares: the caller's authentication and the JSON error body.

The token rules are the socket's (Authorization header, or `access_token` in the query when allowed);
errors are `{"error": {"code", "message"}}` with a documented status (docs/protocol.md, HTTP APIs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from gateway.auth import AuthError, extract_token
from gateway.principal import Principal

if TYPE_CHECKING:
    from gateway.app import Gateway


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


STARTING = "the gateway is starting (ACLs and stream position not loaded yet): retry shortly"


async def authenticate(gw: Gateway, request: Request) -> Principal | JSONResponse:
    """The caller's principal, or the 401 answer (counted by failure reason), or 503 while the instance
    starts: before its ACLs are loaded every permission decision would be a wrong "no"."""
    src = extract_token(request.headers, [], request.query_params, allow_query=gw.settings.allow_query_token)
    try:
        principal = await gw.verifier.verify(src.token)
    except AuthError as exc:
        gw.metrics.auth_failures.labels(exc.reason).inc()
        return error_response(401, "unauthorized", f"{exc.reason}: {exc.message}", **{"WWW-Authenticate": "Bearer"})
    if not gw.bus.started:
        return error_response(503, "unavailable", STARTING)
    return principal


__all__ = ["STARTING", "authenticate", "error_response"]
