"""`wsgateway dev` (what `make run` runs): live simulated events, dev tokens, no orphan nats-server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import wait_ready
from tests.support.ports import free_port
from tests.support.wait import eventually_sync
from tests.support.wsclient import connect, recv, welcome

WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(port: int, nats_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [WSGATEWAY, "dev", "--port", str(port), "--nats-port", str(nats_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_banner(proc: subprocess.Popen[str]) -> str:
    """Dev mode's output up to the end of its banner (read without blocking, as it arrives)."""
    out: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    os.set_blocking(stdout.fileno(), False)

    def banner() -> str | None:
        while line := stdout.readline():
            out.append(line)
            if "Ctrl-C stops everything" in line:
                return "".join(out)
        assert proc.poll() is None, "dev mode exited:\n" + "".join(out)
        return None

    return eventually_sync(banner, what="dev mode's banner", info=lambda: "output so far:\n" + "".join(out))


@pytest.mark.timeout(90)
async def test_dev_mode_streams_simulated_events_and_stops_cleanly() -> None:
    port, nats_port = free_port(), free_port()
    proc = _start(port, nats_port)
    try:
        banner = await asyncio.to_thread(_wait_banner, proc)
        assert "INSECURE" in banner
        assert re.search(r"watch --url ws://127\.0\.0\.1:\d+/v1/ws --token \S+", banner)
        assert all(name in banner for name in ("alice", "bob", "carol"))
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}/dev/idp/token", params={"sub": "carol", "groups": "support"})
            token = r.json()["access_token"]
        await wait_ready(f"http://127.0.0.1:{port}")
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", token, via="subprotocol")
        await welcome(ws)
        await ws.send('{"op":"subscribe","id":1,"scope":"*"}')
        assert (await recv(ws))["type"] == "subscribed"
        scopes = set()
        for _ in range(5):
            frame = await recv(ws)
            assert frame["type"] == "event"
            scopes.add(frame["event"]["scope"])
        assert scopes == {"conversation:support"}  # carol sees only what her group may see
        await ws.close()
        assert _listening(nats_port)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert not _listening(nats_port), "nats-server outlived `wsgateway dev`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_no_orphan_nats_server_even_after_sigkill() -> None:
    port, nats_port = free_port(), free_port()
    proc = _start(port, nats_port)
    try:
        _wait_banner(proc)
        assert _listening(nats_port)
        proc.kill()
        proc.wait()
        eventually_sync(lambda: not _listening(nats_port),
                        what="nats-server to go with the SIGKILLed `wsgateway dev` (not be orphaned)")
    finally:
        if proc.poll() is None:
            proc.kill()


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.timeout(90)
async def test_sigterm_ends_dev_mode_without_leftovers_after_a_quiet_start(tmp_path: Path) -> None:
    """SIGTERM (docker stop, systemd, CI) ends dev mode as Ctrl-C does: exit 0, nats-server stopped and its
    temporary store removed. Start-up logs no JWKS fetch failure: the gateway's socket listens before it
    fetches the keys of its own development IdP."""
    port, nats_port = free_port(), free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220
        [WSGATEWAY, "dev", "--port", str(port), "--nats-port", str(nats_port), "--no-simulator"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        banner = await asyncio.to_thread(_wait_banner, proc)
        assert f'Publisher.connect("nats://127.0.0.1:{nats_port}")' in banner  # what the README tells publishers
        await wait_ready(f"http://127.0.0.1:{port}")  # JWKS loaded, among others
        assert [name.startswith("wsgateway-dev-") for name in _entries(tmp_path)] == [True]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert proc.stdout is not None
        output = banner + (proc.stdout.read() or "")
        for alarm in ("JWKS not loaded yet", "ConnectError", "Traceback", "NATS disconnected"):
            assert alarm not in output, output
        assert not _listening(nats_port), "nats-server outlived `wsgateway dev`"
        assert _entries(tmp_path) == [], "the temporary store was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
