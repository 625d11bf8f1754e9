"""The OpenAPI document of the HTTP API, made to tell the truth.

FastAPI derives most of it from the routes; this module adds what it cannot know and removes what is
not so: the bearer and `access_token` security schemes, the error body every 4xx/503 answer carries,
the bodies the read APIs return (they are written as bytes for speed, so FastAPI cannot infer them),
and no 422: the gateway validates its parameters itself and answers 400 (docs/protocol.md, HTTP APIs).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from gateway.events import SCOPE_BODY
from gateway.protocol import INBOX, MAX_SEQ, PresenceAgent, PresenceMember


class ErrorDetail(BaseModel):
    code: str = Field(description="bad_request | unauthorized | forbidden | unavailable | over_limit")
    message: str = Field(description="What was wrong, for people; never contains a token")


class ErrorBody(BaseModel):
    """The body of every error answer of the HTTP API."""

    error: ErrorDetail


class StoredEvent(BaseModel):
    seq: int = Field(description="The event's stream sequence: a cursor for `after`, `since` and Last-Event-ID")
    event: dict[str, Any] = Field(description="The envelope as published (docs/events.md)")


class HistoryBody(BaseModel):
    events: list[StoredEvent] = Field(description="Oldest first; at most `limit`")
    next_after: int = Field(description="`after` of the next page (the last sequence read)")
    earliest: int = Field(description="First sequence the stream still holds (0: empty)")
    latest: int = Field(description="Last sequence written to the stream")


class InboxBody(BaseModel):
    tenant: str
    principal: str
    requests: list[StoredEvent] = Field(description="The `process.input_required` events open for the caller, "
                                                    "oldest first; at most `limit`")
    seq: int = Field(description="The stream position the list is exact at: subscribe to `inbox` with this "
                                 "`since` to follow it without a gap")
    next_after: int = Field(description="`after` of the next page (the last request's sequence)")
    earliest: int = Field(description="First sequence the stream still holds (0: empty); older requests are gone")


class VisibleScope(BaseModel):
    scope: str
    via: str = Field(description="Which rule lets the caller see it, for people: 'org admin', 'owner (...)', "
                               "'member (...)', 'admin of project ...', 'viewer of project ...'")


class ScopesBody(BaseModel):
    tenant: str
    principal: str
    org_admin: bool
    scopes: list[VisibleScope]
    next_after: str = Field(description="`after` of the next page")


class ReadyBody(BaseModel):
    """The body of `GET /readyz` (200 when every check holds, else 503)."""

    ready: bool = Field(description="Every check below holds")
    nats_connected: bool
    consumer_live: bool = Field(description="The NATS consumer delivers events to the hub")
    acl_loaded: bool = Field(description="The ACL bucket has been read")
    jwks_loaded: bool = Field(description="The identity provider's keys are loaded")


class PresenceBody(BaseModel):
    tenant: str
    scope: str
    count: int = Field(description="Distinct watchers (principals) of the scope, listed or beyond the cap")
    members: list[PresenceMember] = Field(description="Watchers by id, at most WSGATEWAY_PRESENCE_MAX_MEMBERS")
    agents: list[PresenceAgent] = Field(description="Runs started and not finished, oldest first (capped alike)")


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


Responses = dict[int | str, dict[str, Any]]
BAD_REQUEST: Responses = {400: _error("A parameter is invalid: the message names it")}
UNAUTHORIZED: Responses = {401: _error("No token, or one the gateway does not accept (`WWW-Authenticate: Bearer`)")}
FORBIDDEN: Responses = {403: _error("The caller may not see this scope")}
UNAVAILABLE: Responses = {503: _error("NATS is unavailable right now, or this instance is starting (ACLs and stream "
                                      "position not loaded yet); retry")}
OVER_LIMIT: Responses = {503: _error("This instance is at WSGATEWAY_MAX_CONNECTIONS (retry on another), or is starting "
                                     "(retry shortly)")}

# Parameter schemas as the gateway checks them (gateway/protocol.py). The routes declare their parameters as
# plain strings, so FastAPI never refuses one with a 422: the gateway's own 400 does, with its message.
SCOPE: dict[str, Any] = {"type": "string", "pattern": f"^{SCOPE_BODY}$"}
SCOPE_OR_EMPTY: dict[str, Any] = {"type": "string", "pattern": f"^(?:{SCOPE_BODY})?$"}
FLAG: dict[str, Any] = {"type": "string", "enum": ["true", "false"]}  # protocol.parse_flag
SCOPE_LIST: dict[str, Any] = {"type": "array", "items": {
    "type": "string", "pattern": rf"^(?:\*|{INBOX}|{SCOPE_BODY})(?:,(?:\*|{INBOX}|{SCOPE_BODY}))*$"}}


def integer(lo: int, hi: int, default: int | None = None) -> dict[str, Any]:
    """A decimal integer in [lo, hi] (ASCII digits only, at most 19 of them)."""
    schema: dict[str, Any] = {"type": "integer", "minimum": lo, "maximum": hi}
    if default is not None:
        schema["default"] = default
    return schema


def sequence(default: int | None = None) -> dict[str, Any]:
    """A stream sequence: a cursor."""
    return integer(0, MAX_SEQ, default)


SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"accessToken": []}]
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
               "description": "An access token of the configured OpenID provider"},
    "accessToken": {"type": "apiKey", "in": "query", "name": "access_token",
                    "description": "The same token in the query (for EventSource); WSGATEWAY_ALLOW_QUERY_TOKEN"},
}


def parameters(
    history_max_limit: int, scopes_max_limit: int, inbox_max_limit: int = 1000,
) -> dict[tuple[str, str], tuple[dict[str, Any], bool]]:
    """(path, parameter) -> (schema, required): the parameters as the gateway checks them."""
    return {
        ("/v1/history", "scope"): (SCOPE, True),
        ("/v1/history", "after"): (sequence(0), False),
        ("/v1/history", "limit"): (integer(1, history_max_limit, 100), False),
        ("/v1/presence", "scope"): (SCOPE, True),
        ("/v1/scopes", "after"): (SCOPE_OR_EMPTY, False),
        ("/v1/scopes", "limit"): (integer(1, scopes_max_limit, 100), False),
        ("/v1/inbox", "after"): (sequence(0), False),
        ("/v1/inbox", "limit"): (integer(1, inbox_max_limit, 100), False),
        ("/v1/sse", "scope"): (SCOPE_LIST, False),
        ("/v1/sse", "since"): (sequence(), False),
        ("/v1/sse", "Last-Event-ID"): (sequence(), False),
        ("/v1/agui", "scope"): (SCOPE, True),
        ("/v1/agui", "since"): (sequence(), False),
        ("/v1/agui", "Last-Event-ID"): (sequence(), False),
        ("/v1/sse", "presence"): (FLAG, False),
        ("/v1/sse", "listed"): (FLAG, False),
    }


def truthful_openapi(
    app: FastAPI, history_max_limit: int, scopes_max_limit: int, inbox_max_limit: int = 1000,
) -> dict[str, Any]:
    """`app.openapi` for the gateway: FastAPI's document with the parameters as checked, plus security
    schemes, minus 422 answers."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    exact = parameters(history_max_limit, scopes_max_limit, inbox_max_limit)
    for path, ops in doc.get("paths", {}).items():
        for operation in ops.values():
            operation.get("responses", {}).pop("422", None)
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                # FastAPI's placeholder `application/json: {}` next to the media type a route declared
                # (text/event-stream, text/plain): those answers are never JSON
                if len(content) > 1 and content.get("application/json") == {"schema": {}}:
                    content.pop("application/json")
            for param in operation.get("parameters", []):
                known = exact.get((path, param["name"]))
                if known is not None:
                    schema, required = known
                    param["schema"] = {**schema, "description": param["schema"].get("description", "")}
                    param["required"] = required
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    app.openapi_schema = doc
    return doc


__all__ = [
    "BAD_REQUEST",
    "FORBIDDEN",
    "OVER_LIMIT",
    "SCOPE",
    "SCOPE_LIST",
    "SCOPE_OR_EMPTY",
    "SECURITY",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "ErrorBody",
    "HistoryBody",
    "InboxBody",
    "PresenceBody",
    "ReadyBody",
    "Responses",
    "ScopesBody",
    "integer",
    "sequence",
    "truthful_openapi",
]
