"""The TypeScript SDK (clients/js) in tests: installed (scripts/ensure-npm.sh) and built (`npm run build`)
once per test session, and `node --test` runs of its tests against a real gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

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
        "node", "--test", "--test-reporter=spec", str(JS / "test" / test_file), cwd=JS,
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
