"""`wsgateway dev` (what `make run` runs): live simulated events, dev tokens, no orphan nats-server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
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


def _wait_banner(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    out = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            out.append(line)
            if "Ctrl-C stops everything" in line:
                return "".join(out)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.05)
    raise AssertionError("dev mode did not come up:\n" + "".join(out))


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
            for _ in range(100):
                if (await c.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", token, via="subprotocol")
        await welcome(ws)
        await ws.send('{"op":"subscribe","id":1,"scope":"*"}')
        assert (await recv(ws))["type"] == "subscribed"
        scopes = set()
        for _ in range(5):
            frame = await recv(ws, timeout=20)
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
        deadline = time.monotonic() + 10
        while _listening(nats_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _listening(nats_port), "nats-server orphaned by a SIGKILLed `wsgateway dev`"
    finally:
        if proc.poll() is None:
            proc.kill()
