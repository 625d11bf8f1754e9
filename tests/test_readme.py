"""The README's Publisher example, run as printed against `wsgateway dev` (what `make run` starts)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import wait_ready
from tests.support.ports import free_port
from tests.support.wsclient import connect, recv_type, welcome
from tests.test_dev import WSGATEWAY, _wait_banner

ROOT = Path(__file__).resolve().parent.parent


def _publisher_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Publishing (platform services)", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert block, "no Python block in the README's Publishing section"
    return block.group(1)


@pytest.mark.timeout(120)
async def test_readme_publisher_example_works_against_make_run(tmp_path: Path) -> None:
    script = tmp_path / "publish.py"
    script.write_text(_publisher_example())
    port, nats_port = free_port(), free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220
        [WSGATEWAY, "dev", "--port", str(port), "--nats-port", str(nats_port), "--no-simulator"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        banner = await asyncio.to_thread(_wait_banner, proc)
        nats_url = re.search(r"nats-server\s+(nats://\S+)", banner)
        assert nats_url and nats_url.group(1) == f"nats://127.0.0.1:{nats_port}", banner
        await wait_ready(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}/dev/idp/token", params={"sub": "alice", "tenant": "demo"})
            token = r.json()["access_token"]
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws?scope=process:onboarding", token, via="subprotocol")
        await welcome(ws)
        await recv_type(ws, "subscribed")

        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
            env={**os.environ, "NATS_URL": nats_url.group(1)},
        )
        assert out.returncode == 0, out.stderr
        seq = re.fullmatch(r"stored as stream sequence (\d+)\n", out.stdout)
        assert seq, out.stdout
        frame = await recv_type(ws, "event")  # what the viewer shows alice
        assert frame["seq"] == int(seq.group(1))
        assert frame["event"]["type"] == "process.progress" and frame["event"]["scope"] == "process:onboarding"
        await ws.close()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
