"""`wsgateway serve` leaves out imports serving does not use (gateway/lean_imports.py), and what those
imports are for still works: a `ws://` NATS URL gets nats-py's WebSocket transport (aiohttp), other
code of the process can still import what was left out."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import wait_ready
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wsclient import connect, events, subscribe, welcome

WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


class WebSocketNats(NatsProcess):
    """A `nats-server -js` that also listens for NATS over WebSocket (plain, loopback)."""

    def __init__(self) -> None:
        super().__init__()
        self.ws_port = free_port()
        self.conf = self.store_dir / "websocket.conf"
        self.conf.write_text(f'websocket {{ listen: "127.0.0.1:{self.ws_port}", no_tls: true }}\n')

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    def command(self) -> list[str]:
        return [*super().command(), "-c", str(self.conf)]


def _maps_mention(pid: int, package: str) -> bool:
    """Whether a file of `package` (its compiled modules) is mapped into process `pid`."""
    return f"/{package}/" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scheme", ["nats", "ws"])
async def test_serve_loads_aiohttp_only_for_a_websocket_nats_url(scheme: str, idp: TestIdP) -> None:
    """Over either transport the gateway consumes and delivers (its routes were built without
    pydantic.v1); aiohttp (nats-py's WebSocket transport, about 8 MiB) is in the process only when the
    NATS URL is a WebSocket one."""
    with WebSocketNats() as nats:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
        env.update({
            "WSGATEWAY_NATS_URL": nats.ws_url if scheme == "ws" else nats.url, "WSGATEWAY_OIDC_ISSUER": idp.issuer,
            "WSGATEWAY_AUDIENCE": idp.audience, "WSGATEWAY_PORT": str(port), "WSGATEWAY_HOST": "127.0.0.1",
            "WSGATEWAY_LOG_LEVEL": "warning",
        })
        proc = subprocess.Popen([WSGATEWAY, "serve", "--workers", "1"], env=env)  # noqa: ASYNC220
        platform = await Platform.connect(nats.url)
        try:
            await wait_ready(f"http://127.0.0.1:{port}", timeout=40)
            await platform.grant("acme.org", {"admins": ["user:alice"]})
            ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", idp.mint("alice"))
            await welcome(ws)
            await subscribe(ws, "conversation:c1")
            seq = await platform.publish("acme", "conversation:c1")
            assert [f["seq"] for f in await events(ws, 1)] == [seq]
            await ws.close()
            assert _maps_mention(proc.pid, "aiohttp") is (scheme == "ws")
            assert not _maps_mention(proc.pid, "watchfiles")  # uvicorn's --reload, which serve does not have
        finally:
            await platform.close()
            proc.terminate()
            await asyncio.to_thread(proc.wait, 20)


def test_what_was_left_out_stays_importable() -> None:
    """httpx without its command line (click, rich, pygments); afterwards the command line still imports."""
    code = (
        "import importlib, sys\n"
        "from gateway.lean_imports import import_without\n"
        "assert import_without('httpx', 'httpx._main')\n"
        "import httpx\n"
        "assert httpx.AsyncClient and 'httpx._main' not in sys.modules and 'rich' not in sys.modules\n"
        "assert not import_without('httpx', 'httpx._main')  # already imported: nothing to do\n"
        "importlib.import_module('httpx._main')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
