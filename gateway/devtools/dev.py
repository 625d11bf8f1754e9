"""`wsgateway dev`: the gateway with an embedded nats-server, the INSECURE development identity
provider and a simulated agent platform, so a newcomer sees live events at once.

Ctrl-C stops everything; the nats-server child dies with us even on SIGKILL (see natsproc).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType

import nats
import orjson
import uvicorn
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from nats.js.kv import KeyValue

from gateway import provisioning
from gateway.app import create_app, uvicorn_options
from gateway.config import ConfigError, load_settings
from gateway.core.bus import ensure_stream
from gateway.devtools.devidp import DevIdentityProvider
from gateway.devtools.natsproc import NatsProcess
from gateway.devtools.simulator import DEMO_ACLS, DEMO_USERS, TENANT, Simulator, seed_acls
from gateway.events import KINDS
from gateway.sdk.publisher import Publisher

log = logging.getLogger("gateway.devtools.dev")

BANNER = """
==========================================================================================
  wsgateway DEV MODE: INSECURE. A development identity provider mints tokens for anyone
  who asks (GET /dev/idp/token?sub=NAME). Never expose this to a network or use it in
  production; production runs `wsgateway serve` against your real OpenID provider.
==========================================================================================
"""


def _client_command(url: str, token: str) -> str:
    exe = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0].endswith("wsgateway") else "wsgateway"
    return f"{shlex.quote(str(exe))} watch --url {url} --token {token}"


RESTRICTED_DOC: dict[str, object] = {}
"""What "revoke" writes for a demo scope: no project, no members, no owner. Only org admins still see it."""


def demo_router(kv: KeyValue) -> APIRouter:
    """Dev-only routes behind the viewer (mounted at /dev/demo by `wsgateway dev`, never by `serve`).

    GET  /dev/demo          the demo tenant, its users (with groups and what they see) and scopes
    POST /dev/demo/access   {"scope": "<demo scope>", "grant": false|true}: restrict a demo scope to org
                            admins (its ACL document is rewritten in the bucket, so every open connection
                            that loses it gets a `revoked` frame) or restore the seeded document
    Only the seeded demo scopes can be changed; JSON bodies only (a cross-site form cannot post one).
    """
    router = APIRouter(tags=["dev demo (insecure)"])
    scopes = {f"{key.split('.')[1]}:{key.split('.')[2]}": key for key in DEMO_ACLS
              if key.split(".")[1] in KINDS}
    restricted: set[str] = set()

    @router.get("")
    async def demo() -> JSONResponse:
        return JSONResponse({
            "tenant": TENANT,
            "users": [{"name": u.name, "groups": list(u.groups), "sees": u.sees} for u in DEMO_USERS],
            "scopes": sorted(scopes),
            "restricted": sorted(restricted),
        })

    @router.post("/access")
    async def access(request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _bad("send a JSON body (Content-Type: application/json)")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _bad("body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("grant"), bool):
            return _bad('expected {"scope": "<demo scope>", "grant": true|false}')
        scope = body.get("scope")
        if scope not in scopes:
            return _bad(f"scope must be one of the demo scopes: {', '.join(sorted(scopes))}")
        doc = DEMO_ACLS[scopes[scope]] if body["grant"] else RESTRICTED_DOC
        await kv.put(scopes[scope], orjson.dumps(doc))
        if body["grant"]:
            restricted.discard(scope)
        else:
            restricted.add(scope)
        log.info("demo: %s %s", "granted back" if body["grant"] else "restricted to org admins", scope)
        return JSONResponse({"scope": scope, "granted": body["grant"], "document": doc})

    return router


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "bad_request", "message": message}}, status_code=400)


def _listen(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound before anything starts.

    The gateway's lifespan starts loading the JWKS from the development IdP, which is this very
    server; with the socket already listening, that request waits in the backlog for the few
    milliseconds until uvicorn accepts, instead of failing with "connection refused" first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


async def _main(host: str, port: int, nats_port: int | None, simulate: bool, pace: float) -> None:
    sock = _listen(host, port)
    store = tempfile.TemporaryDirectory(prefix="wsgateway-dev-")
    natsd = NatsProcess(port=nats_port, store_dir=Path(store.name))
    try:
        natsd.start()
        public_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base = f"http://{public_host}:{port}"
        settings, unknown = load_settings(dev_mode=True, nats_url=natsd.url, host=host, port=port,
                                          audience="wsgateway", log_level="warning")
        for line in unknown:
            log.warning("%s", line)
        idp = DevIdentityProvider(f"{base}/dev/idp", audience="wsgateway")
        app = create_app(settings, dev_idp=idp)
        # seed demo permissions before the gateway starts watching them
        nc = await nats.connect(natsd.url)
        js = nc.jetstream()
        kv, _ = await provisioning.ensure_bucket(
            js, provisioning.bucket_config(settings.acl_bucket, replicas=settings.stream_replicas)
        )
        await seed_acls(kv)
        await ensure_stream(js, settings)  # before the simulator publishes (the gateway's bus connects meanwhile)
        app.include_router(demo_router(kv), prefix="/dev/demo")
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **uvicorn_options(settings)))  # type: ignore[arg-type]
        serve = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serve.done():
                serve.result()
                return
            await asyncio.sleep(0.05)
        stop = asyncio.Event()
        sim_task = None
        bus = app.state.gateway.bus
        while simulate and not bus.ready:  # publish once the stream exists and the gateway consumes it
            if serve.done():
                break
            await asyncio.sleep(0.05)
        if simulate:
            sim = Simulator(Publisher(js, subject_prefix=settings.subject_prefix), pace=pace)
            sim_task = asyncio.create_task(sim.run(stop))
        ws_url = f"ws://{public_host}:{port}/v1/ws"
        print(BANNER, flush=True)
        print(f"  live viewer    {base}/   <- open in a browser: pick a demo user, watch, drop and resume", flush=True)
        print(f"  gateway        {base}   (WebSocket {ws_url})", flush=True)
        print(f"  nats-server    {natsd.url}   (embedded, JetStream, temporary store; publishers: "
              f"Publisher.connect(\"{natsd.url}\"), --nats-port fixes the port)", flush=True)
        print(f"  metrics        {base}/metrics      readiness {base}/readyz", flush=True)
        print(f"  identity       {base}/dev/idp/.well-known/openid-configuration", flush=True)
        print(f"\n  demo users of tenant {TENANT!r}:", flush=True)
        for u in DEMO_USERS:
            groups = ",".join(u.groups) or "-"
            print(f"    {u.name:<6} groups {groups:<12} {u.sees}", flush=True)
        token = idp.mint("bob", tenant=TENANT, groups=("apollo-team",), ttl_s=12 * 3600)
        print("\n  watch the live stream as bob (paste into another terminal):\n", flush=True)
        print(f"    {_client_command(ws_url, token)}\n", flush=True)
        print(f"  other tokens: curl '{base}/dev/idp/token?sub=alice&tenant={TENANT}'", flush=True)
        print("  Ctrl-C stops everything.\n", flush=True)
        try:
            await serve
        finally:
            stop.set()
            if sim_task is not None:
                sim_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sim_task
            with contextlib.suppress(Exception):
                await nc.close()
    finally:
        sock.close()
        natsd.stop()
        store.cleanup()


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM does what Ctrl-C does: unwind, so nats-server is stopped and the temporary store removed.

    uvicorn handles the signal itself while it serves (graceful shutdown) and re-raises it afterwards;
    with the default action the process would die right there, before the clean-up below ran.
    """
    raise KeyboardInterrupt


def run_dev(
    host: str = "127.0.0.1", port: int = 8080, nats_port: int | None = None, simulate: bool = True, pace: float = 1.0
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        asyncio.run(_main(host, port, nats_port, simulate, pace))
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"wsgateway dev: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"wsgateway dev: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
