"""The published contract, generated from the models: JSON Schema of every frame and event, and AsyncAPI.

`gateway/protocol.py` (client and server frames) and `gateway/events.py` (envelope and catalogue) are
the only definitions. This module turns them into JSON Schema documents (the TypeScript SDK's types
in `clients/js/src/generated/` are made from them) and into `docs/asyncapi.yaml` (AsyncAPI 3.0 for
`/v1/ws`). `scripts/gen_schemas.py` (`make schemas`) writes the files; `tests/test_schemas.py` fails
when a committed file differs from what the models give.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway import package_version
from gateway.edge.openapi import ErrorBody, HistoryBody, ScopesBody
from gateway.events import (
    DELIVERY_CLASSES,
    EVENT_TYPES,
    KINDS,
    NAME_PATTERN,
    SCOPE_PATTERN,
    Envelope,
)
from gateway.protocol import (
    _SCOPE_FIELD_PATTERN,
    CLIENT_FRAMES,
    CLOSE_BAD_REQUEST,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_DATA,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    MAX_SEQ,
    SERVER_FRAMES,
    PrincipalInfo,
)

Schema = dict[str, Any]
# The bodies of the HTTP API's answers (GET /v1/history, GET /v1/scopes, every error), for the SDK's pager.
HTTP_BODIES: Final[tuple[type[BaseModel], ...]] = (HistoryBody, ScopesBody, ErrorBody)

SUBPROTOCOL: Final = "wsgateway.v1"
MAX_TOKEN_CHARS: Final = 16384
# Close codes as docs/protocol.md#close-codes documents them: code -> (name, meaning, client action).
CLOSE_CODES: Final[dict[int, tuple[str, str, str]]] = {
    CLOSE_GOING_AWAY: ("going_away", "server shutting down (graceful shutdown or restart)", "reconnect with since"),
    CLOSE_PROTOCOL_ERROR: ("protocol_error", "a frame that breaks RFC 6455", "fix the client"),
    CLOSE_INVALID_DATA: ("invalid_data", "a text frame or close reason that is not UTF-8", "fix the client"),
    CLOSE_POLICY: ("too_many_bad_frames", "more than WSGATEWAY_MAX_BAD_FRAMES bad frames", "fix the client"),
    CLOSE_TOO_BIG: ("too_big", "a client frame over WSGATEWAY_MAX_FRAME_BYTES", "fix the client"),
    1011: ("internal", "replay failed, or no pong within heartbeat_s", "reconnect with since (backoff)"),
    CLOSE_BAD_REQUEST: ("bad_request", "invalid URL parameter (scope, since)", "final: fix the URL"),
    CLOSE_UNAUTHORIZED: ("unauthorized", "token refused", "final: get a new token"),
    CLOSE_TOKEN_EXPIRED: ("token_expired", "the token's exp passed", "reconnect with a fresh token and since"),
    CLOSE_TOO_SLOW: ("too_slow", "the client fell behind, or over the connection limit",
                     "reconnect with since (backoff)"),
}
FINAL_CLOSE_CODES: Final = (CLOSE_BAD_REQUEST, CLOSE_UNAUTHORIZED)


def _strip_null_defaults(schema: Schema) -> Schema:
    """Server frames leave out fields without a value (never `null`): drop the `null` branch and the
    `default: null` pydantic gives optional fields, so the schema says what is on the wire."""
    out = copy.deepcopy(schema)
    for prop in out.get("properties", {}).values():
        any_of = prop.get("anyOf")
        if isinstance(any_of, list) and {"type": "null"} in any_of:
            rest = [s for s in any_of if s != {"type": "null"}]
            prop.pop("anyOf")
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
        if "default" in prop and prop["default"] is None:
            prop.pop("default")
    return out


def _defs(models: list[type[BaseModel]], ref_template: str = "#/$defs/{model}") -> Schema:
    _, doc = models_json_schema([(m, "validation") for m in models], ref_template=ref_template)
    defs: Schema = doc.get("$defs", {})
    return defs


def event_schema_name(event_type: str) -> str:
    """`run.tool_call.args.delta` -> `RunToolCallArgsDeltaEvent`."""
    parts = event_type.replace("_", ".").split(".")
    return "".join(p[:1].upper() + p[1:] for p in parts) + "Event"


def events_schema() -> Schema:
    """The envelope, every data model of the catalogue, and one envelope schema per catalogue type."""
    models: list[type[BaseModel]] = [Envelope, *EVENT_TYPES.values()]
    defs = _defs(models)
    for event_type, model in EVENT_TYPES.items():
        envelope = copy.deepcopy(defs["Envelope"])
        envelope["title"] = event_schema_name(event_type)
        envelope["description"] = f"A `{event_type}` event (delivery class `{DELIVERY_CLASSES[event_type]}`)."
        envelope["properties"]["type"] = {"const": event_type, "type": "string"}
        envelope["properties"]["data"] = {"$ref": f"#/$defs/{model.__name__}"}
        envelope["required"] = sorted({*envelope.get("required", []), "data"})
        defs[event_schema_name(event_type)] = envelope
    defs["CatalogueEvent"] = {
        "title": "CatalogueEvent",
        "description": "An event of one of the catalogue's types (docs/events.md).",
        "oneOf": [{"$ref": f"#/$defs/{event_schema_name(t)}"} for t in EVENT_TYPES],
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "WsgatewayEvents", "$defs": defs}


def protocol_schema(envelope_ref: Schema | None = None) -> Schema:
    """Client and server frames; `envelope_ref` replaces the envelope inside `event` frames (default: the
    envelope's own schema in `$defs`)."""
    defs = _defs([*CLIENT_FRAMES, *SERVER_FRAMES, PrincipalInfo, *HTTP_BODIES])
    server_names = [m.__name__ for m in SERVER_FRAMES]
    for name in [*server_names, "PrincipalInfo"]:
        defs[name] = _strip_null_defaults(defs[name])
    if envelope_ref is not None:
        defs.pop("Envelope", None)
        defs["EventFrame"]["properties"]["event"] = envelope_ref
        defs["StoredEvent"]["properties"]["event"] = {**envelope_ref, "description": "The envelope as published"}
    defs["ClientFrame"] = {
        "title": "ClientFrame", "description": "A frame a client sends (`op`); anything else is refused.",
        "oneOf": [{"$ref": f"#/$defs/{m.__name__}"} for m in CLIENT_FRAMES],
        "discriminator": {"propertyName": "op"},
    }
    defs["ServerFrame"] = {
        "title": "ServerFrame", "description": "A frame the server sends (`type`); ignore types you do not know.",
        "oneOf": [{"$ref": f"#/$defs/{n}"} for n in server_names],
        "discriminator": {"propertyName": "type"},
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "WsgatewayProtocol", "$defs": defs}


def constants() -> dict[str, Any]:
    """The rules a client checks before sending anything (same values as the gateway's)."""
    return {
        "VERSION": package_version(),
        "SUBPROTOCOL": SUBPROTOCOL,
        "SCOPE_PATTERN": _SCOPE_FIELD_PATTERN,
        "RESOURCE_SCOPE_PATTERN": SCOPE_PATTERN,
        "NAME_PATTERN": NAME_PATTERN,
        "KINDS": list(KINDS),
        "MAX_SEQ": str(MAX_SEQ),
        "MAX_TOKEN_CHARS": MAX_TOKEN_CHARS,
        "FINAL_CLOSE_CODES": list(FINAL_CLOSE_CODES),
        "CLOSE_CODES": {str(code): {"name": n, "meaning": m, "action": a} for code, (n, m, a) in CLOSE_CODES.items()},
        "EVENT_TYPES": list(EVENT_TYPES),
        "DELIVERY_CLASSES": dict(DELIVERY_CLASSES),
    }


# --- AsyncAPI ------------------------------------------------------------------------------------


def _to_components(schema: Schema) -> Schema:
    """A JSON Schema as an AsyncAPI Schema Object: `#/$defs/X` references become `#/components/schemas/X`,
    and a discriminator is the property's name (OpenAPI's `{propertyName, mapping}` is not allowed)."""
    if isinstance(schema, dict):
        out: Schema = {}
        for k, v in schema.items():
            if k == "$ref" and isinstance(v, str):
                out[k] = v.replace("#/$defs/", "#/components/schemas/")
            elif k == "discriminator" and isinstance(v, dict):
                out[k] = v["propertyName"]
            else:
                out[k] = _to_components(v)
        return out
    if isinstance(schema, list):
        return [_to_components(v) for v in schema]
    return schema


def asyncapi() -> Schema:
    """AsyncAPI 3.0 for `GET /v1/ws`: the channel, every client and server frame as a message, the close
    codes, and the event catalogue (each type's envelope as a message payload of `event` frames)."""
    events = events_schema()
    proto = protocol_schema(envelope_ref={"$ref": "#/$defs/Envelope"})
    schemas: Schema = {}
    for name, schema in {**events["$defs"], **proto["$defs"]}.items():
        schemas[name] = _to_components(schema)
    # An `event` frame of a catalogue type: the frame with its envelope narrowed to that type.
    messages: Schema = {}
    for model in CLIENT_FRAMES:
        op = model.model_fields["op"].annotation.__args__[0]  # type: ignore[union-attr]
        messages[model.__name__] = {
            "name": op, "title": f"{op} (client)", "summary": (model.__doc__ or "").strip() or f"`{op}` frame",
            "contentType": "application/json", "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }
    for model in SERVER_FRAMES:
        kind = model.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
        messages[model.__name__] = {
            "name": kind, "title": f"{kind} (server)", "summary": " ".join((model.__doc__ or "").split()),
            "contentType": "application/json", "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }
    for event_type in EVENT_TYPES:
        name = event_schema_name(event_type)
        frame = f"{name}Frame"
        schemas[frame] = {
            "title": frame, "description": f"An `event` frame carrying a `{event_type}` event.",
            "allOf": [
                {"$ref": "#/components/schemas/EventFrame"},
                {"type": "object", "properties": {"event": {"$ref": f"#/components/schemas/{name}"}}},
            ],
        }
        messages[frame] = {
            "name": event_type, "title": event_type,
            "summary": f"`event` frame, catalogue type `{event_type}` (delivery class "
                       f"`{DELIVERY_CLASSES[event_type]}`)",
            "contentType": "application/json", "payload": {"$ref": f"#/components/schemas/{frame}"},
        }
    close_codes = "\n".join(
        f"| {code} | `{name}` | {meaning} | {action} |" for code, (name, meaning, action) in CLOSE_CODES.items()
    )
    client_refs = [{"$ref": f"#/channels/ws/messages/{m.__name__}"} for m in CLIENT_FRAMES]
    server_refs = [{"$ref": f"#/channels/ws/messages/{m}"} for m in messages
                   if m not in {c.__name__ for c in CLIENT_FRAMES}]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "wsgateway client protocol",
            "version": package_version(),
            "description": (
                "The read-only WebSocket of wsgateway (docs/protocol.md): clients subscribe to scopes and "
                "receive events. Generated from gateway/protocol.py and gateway/events.py by "
                "scripts/gen_schemas.py; do not edit.\n\n"
                "Close codes (4400 and 4401 are final; retry everything else with backoff and `since`):\n\n"
                "| code | name | cause | client action |\n|---|---|---|---|\n" + close_codes
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": "gateway.example.com", "protocol": "wss", "pathname": "/v1",
                "description": "Any gateway instance (no sticky sessions).",
                "security": [{"$ref": "#/components/securitySchemes/bearer"}],
            },
        },
        "channels": {
            "ws": {
                "address": "/v1/ws",
                "title": "The live stream",
                "description": (
                    f"WebSocket, subprotocol `{SUBPROTOCOL}`; every frame is one JSON object in a text frame. "
                    "The token goes in `Authorization: Bearer`, a `bearer.<jwt>` subprotocol entry "
                    "(browsers), or `access_token` in the query."
                ),
                "messages": messages,
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "scope": {"type": "string", "description": (
                                    "repeatable, comma-separated lists allowed; each must match "
                                    f"{_SCOPE_FIELD_PATTERN}, otherwise close 4400")},
                                "since": {"type": "string", "pattern": "^[0-9]{1,19}$", "description": (
                                    "resume cursor: all URL scopes resume as one replay in stream order")},
                                "access_token": {"type": "string", "description": (
                                    "only while WSGATEWAY_ALLOW_QUERY_TOKEN is true")},
                            },
                        },
                        "bindingVersion": "0.1.0",
                    },
                },
            },
        },
        "operations": {
            "sendClientFrame": {
                "action": "send", "channel": {"$ref": "#/channels/ws"},
                "title": "Client frames", "summary": "subscribe, unsubscribe, refresh, ping",
                "messages": client_refs,
            },
            "receiveServerFrame": {
                "action": "receive", "channel": {"$ref": "#/channels/ws"},
                "title": "Server frames", "summary": "welcome, answers, revocations and events",
                "messages": server_refs,
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "OIDC access token, verified against the identity provider's JWKS"},
            },
        },
    }
