"""The TypeScript SDK (clients/js) in tests: installed (scripts/ensure-npm.sh) and built (`npm run build`)
once per test session, and `node --test` runs of its tests against a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wait import eventually

REPO = Path(__file__).resolve().parent.parent.parent
JS = REPO / "clients" / "js"
_built = False


def ensure_js() -> None:
    """npm packages of clients/js and tools/ installed, and clients/js/dist built from the current sources."""
    global _built
    if _built:
        return
    for cmd in (["bash", str(REPO / "scripts" / "ensure-npm.sh")], ["bash", str(REPO / "scripts" / "build-js.sh")]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}"
    _built = True


async def node_test(test_file: str, env: dict[str, str], *, timeout: float = 240) -> str:
    """`node --test clients/js/test/<test_file>` with `env` added; returns its output, fails on any failure."""
    ensure_js()
    proc = await asyncio.create_subprocess_exec(
        "node", "--test", "--test-reporter=tap", str(JS / "test" / test_file), cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **env},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"node --test {test_file} did not finish:\n{out.decode()[-6000:]}") from None
    text = out.decode()
    assert proc.returncode == 0, f"node --test {test_file} failed ({proc.returncode}):\n{text[-8000:]}"
    return text


class Rig:
    """A real gateway (in this test's loop) plus a small local control API for Node tests, which have no
    Python: fresh tokens from the test IdP, ACL documents, publishing through the package's Publisher, and
    a restart of the gateway on the same port.

        GET  /token?sub=alice&groups=a,b&exp_in=300[&bad=issuer]   -> {"token": ...}
        POST /acl      {"key": "acme.conversation.c1", "doc": {...} | null}
        POST /publish  {"scope": ..., "type": ..., "data": {...}, "run_id": ..., "count": n} -> {"seqs": [...]}
        POST /restart  -> {"ok": true} once the new gateway answers /readyz
    """

    def __init__(self, nats_url: str, idp: TestIdP, platform: Platform, **settings: Any) -> None:
        self.nats_url = nats_url
        self.idp = idp
        self.platform = platform
        self.settings = settings
        self.port = free_port()
        self.gateway: RunningGateway | None = None
        self._gw_cm: contextlib.AbstractAsyncContextManager[RunningGateway] | None = None
        self._control: uvicorn.Server | None = None
        self._control_task: asyncio.Task[None] | None = None
        self.control_port = free_port()
        self.restarts = 0

    @property
    def env(self) -> dict[str, str]:
        return {
            "GW_WS": f"ws://127.0.0.1:{self.port}/v1/ws",
            "GW_HTTP": f"http://127.0.0.1:{self.port}",
            "CONTROL": f"http://127.0.0.1:{self.control_port}",
            "NATS_URL": self.nats_url,
        }

    async def _start_gateway(self) -> None:
        self._gw_cm = run_gateway(self.nats_url, self.idp.issuer, audience=self.idp.audience, port=self.port,
                                  **self.settings)
        self.gateway = await self._gw_cm.__aenter__()

    async def _stop_gateway(self) -> None:
        if self._gw_cm is not None:
            await self._gw_cm.__aexit__(None, None, None)
        self._gw_cm = None
        self.gateway = None

    def _app(self) -> Starlette:
        async def token(request: Request) -> JSONResponse:
            q = request.query_params
            groups = [g for g in q.get("groups", "").split(",") if g]
            kwargs: dict[str, Any] = {"exp_in": float(q.get("exp_in", "300"))}
            if q.get("bad") == "issuer":
                kwargs["iss"] = "https://not-the-issuer.example"
            tok = self.idp.mint(q.get("sub", "alice"), q.get("tenant", "acme"), groups, **kwargs)
            return JSONResponse({"token": tok})

        async def acl(request: Request) -> JSONResponse:
            body = await request.json()
            if body.get("doc") is None:
                await self.platform.revoke(body["key"])
            else:
                await self.platform.grant(body["key"], body["doc"])
            return JSONResponse({"ok": True})

        async def publish(request: Request) -> JSONResponse:
            body = await request.json()
            seqs = []
            for i in range(int(body.get("count", 1))):
                data = dict(body["data"]) if body.get("data") is not None else {"fraction": 0.5}
                if body.get("number"):
                    data["n"] = i
                seqs.append(await self.platform.publish(body.get("tenant", "acme"), body["scope"],
                                                        body.get("type", "test.tick"), data=data,
                                                        run_id=body.get("run_id")))
            return JSONResponse({"seqs": seqs})

        async def restart(request: Request) -> JSONResponse:
            await self._stop_gateway()
            await self._start_gateway()
            self.restarts += 1
            return JSONResponse({"ok": True})

        return Starlette(routes=[
            Route("/token", token), Route("/acl", acl, methods=["POST"]),
            Route("/publish", publish, methods=["POST"]), Route("/restart", restart, methods=["POST"]),
        ])

    async def __aenter__(self) -> Rig:
        await self._start_gateway()
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.control_port, log_level="warning",
                                lifespan="off")
        self._control = uvicorn.Server(config)
        self._control.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._control_task = asyncio.create_task(self._control.serve())
        control = self._control
        await eventually(lambda: control.started, what="the control server to listen", watch=[self._control_task])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._control is not None:
            self._control.should_exit = True
            if self._control_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._control_task, 15)
        await self._stop_gateway()
