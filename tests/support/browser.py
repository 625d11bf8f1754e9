"""Headless Chromium for the browser tests: Debian's `chromium` and node (apt), npm `playwright-core`
(tools/), installed when missing; `run_driver` runs one of tests/browser/*.mjs and returns its JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.support.oidc_provider import ensure_npm_packages

REPO = Path(__file__).resolve().parent.parent.parent
BROWSER_DIR = REPO / "tests" / "browser"


def ensure_browser() -> None:
    """Debian chromium and node (apt), playwright-core (npm, tools/): installed when missing."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "ensure-apt.sh"), "chromium=chromium", "node=nodejs", "npm=npm"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, f"scripts/ensure-apt.sh failed:\n{result.stdout}\n{result.stderr}"
    ensure_npm_packages()
    assert shutil.which("chromium") or Path("/usr/bin/chromium").exists()


def _result(returncode: int | None, stdout: str, stderr: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    assert lines, f"driver printed nothing:\n{stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert returncode == 0 and "error" not in out, f"{out.get('error')}\n{stderr[-2000:]}"
    return out


def run_driver(script: str, config: dict[str, Any], tmp: Path, *, timeout: float = 90) -> dict[str, Any]:
    """`node tests/browser/<script> '<config>'`, blocking (the server must run in another process)."""
    run = subprocess.run(["node", str(BROWSER_DIR / script), json.dumps(config)], capture_output=True, text=True,
                         timeout=timeout, check=False, env={**os.environ, "TMPDIR": str(tmp)})
    return _result(run.returncode, run.stdout, run.stderr)


async def run_driver_async(script: str, config: dict[str, Any], tmp: Path, *, timeout: float = 90) -> dict[str, Any]:
    """Like `run_driver`, without blocking the event loop (for a gateway running in this test's loop)."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(BROWSER_DIR / script), json.dumps(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return _result(proc.returncode, stdout.decode(), stderr.decode())
