"""The naive baseline: how a WebSocket fan-out is commonly written with FastAPI.

One JetStream ordered consumer; for each event, `for ws in subscribers[scope]: await ws.send_text(text)`.
uvicorn runs it with its default WebSocket implementation. The same JWT check as the gateway's
essentials is done once per connection (PyJWT against the benchmark's JWKS: signature, exp, aud, iss;
no ACL, no per-connection queues, no slow-client handling). It speaks the same wire protocol subset
the load clients use: `{"op":"subscribe","scope":...}` in, `welcome`/`subscribed`/`event` frames out.

Run: BENCH_NATS_URL=... BENCH_JWKS_URL=... BENCH_AUDIENCE=... BENCH_ISSUER=...
     python -m uvicorn naive_app:app --app-dir bench --host 127.0.0.1 --port 8090 --log-level warning
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import defaultdict
from collections.abc import AsyncIterator

import jwt
import nats
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from nats.js.api import ConsumerConfig, DeliverPolicy

NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
JWKS_URL = os.environ.get("BENCH_JWKS_URL", "")
AUDIENCE = os.environ.get("BENCH_AUDIENCE") or None
ISSUER = os.environ.get("BENCH_ISSUER") or None

subscribers: dict[str, set[WebSocket]] = defaultdict(set)
state: dict[str, object] = {"ready": False}


async def on_event(msg: nats.aio.msg.Msg) -> None:
    event = json.loads(msg.data)
    text = json.dumps({"type": "event", "seq": msg.metadata.sequence.stream, "event": event})
    scope = event["scope"]
    for ws in list(subscribers.get(scope, ())):
        try:
            await ws.send_text(text)
        except Exception:
            subscribers[scope].discard(ws)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    jwks = jwt.PyJWKClient(JWKS_URL, cache_keys=True)
    await asyncio.to_thread(jwks.get_signing_keys)
    state["jwks"] = jwks
    nc = await nats.connect(NATS_URL, name="naive-fanout")
    js = nc.jetstream()
    await js.subscribe(
        "events.>", stream="EVENTS", cb=on_event, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    state["ready"] = True
    try:
        yield
    finally:
        await nc.close()


app = FastAPI(lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> JSONResponse:
    return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)


@app.websocket("/v1/ws")
async def ws_endpoint(ws: WebSocket) -> None:
    auth = ws.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else ""
    try:
        key = state["jwks"].get_signing_key_from_jwt(token)  # type: ignore[attr-defined]
        claims = jwt.decode(token, key.key, algorithms=["ES256", "RS256"], audience=AUDIENCE, issuer=ISSUER)
    except Exception:
        await ws.close(code=4401)
        return
    await ws.accept()
    await ws.send_text(json.dumps({"type": "welcome", "sub": claims["sub"]}))
    mine: set[str] = set()
    try:
        while True:
            req = json.loads(await ws.receive_text())
            if req.get("op") == "subscribe":
                scope = req["scope"]
                subscribers[scope].add(ws)
                mine.add(scope)
                await ws.send_text(json.dumps({"type": "subscribed", "id": req.get("id"), "scope": scope}))
            elif req.get("op") == "unsubscribe":
                subscribers[req["scope"]].discard(ws)
                mine.discard(req["scope"])
    except WebSocketDisconnect:
        pass
    finally:
        for scope in mine:
            subscribers[scope].discard(ws)
