"""Real Prometheus tools for the alert tests: `promtool`, and a `prometheus` server on a free loopback port.

Both come from Debian's `prometheus` package; when it is missing they are installed the way `make test`
does it (scripts/ensure-apt.sh promtool=prometheus), so a test never silently skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.ports import free_port
from tests.support.wait import eventually

ROOT = Path(__file__).resolve().parents[2]


def _find(command: str) -> str | None:
    found = shutil.which(command)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin"):
        if Path(directory, command).is_file():
            return str(Path(directory, command))
    return None


def prometheus_binaries() -> tuple[str, str]:
    """(promtool, prometheus), installing the Debian package when either is missing."""
    if _find("promtool") is None or _find("prometheus") is None:
        subprocess.run([str(ROOT / "scripts" / "ensure-apt.sh"), "promtool=prometheus"], check=True)
    promtool, prometheus = _find("promtool"), _find("prometheus")
    assert promtool and prometheus, "promtool/prometheus missing after scripts/ensure-apt.sh promtool=prometheus"
    return promtool, prometheus


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; the caller asserts on returncode (stdout/stderr carry the reasons)."""
    tool, _ = prometheus_binaries()
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


class PrometheusServer:
    """A running `prometheus` and a few HTTP API helpers."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    async def get(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient(timeout=5) as c:
            r = await c.get(f"{self.url}{path}", params=params)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        return (await self.get("/api/v1/query", query=promql))["result"]  # type: ignore[no-any-return]

    async def time(self) -> float:
        """Prometheus' clock (the `time()` of a query now)."""
        return float((await self.get("/api/v1/query", query="time()"))["result"][1])

    async def alerts(self) -> list[dict[str, Any]]:
        return (await self.get("/api/v1/alerts"))["alerts"]  # type: ignore[no-any-return]

    async def alert_rules(self) -> list[dict[str, Any]]:
        groups = (await self.get("/api/v1/rules", type="alert"))["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.asynccontextmanager
async def run_prometheus(
    scrape_configs: list[dict[str, Any]], rule_files: list[Path], *, interval: str = "1s"
) -> AsyncIterator[PrometheusServer]:
    """Start prometheus (temporary TSDB, scrape and evaluation every `interval`); kill it afterwards."""
    _, binary = prometheus_binaries()
    with tempfile.TemporaryDirectory(prefix="wsgw-prometheus-") as tmp:
        work = Path(tmp)
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape_configs,
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log = work / "prometheus.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", log)
        try:
            async with httpx.AsyncClient(timeout=2) as c:

                async def ready() -> bool:
                    if proc.returncode is not None:
                        raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{server.log_tail()}")
                    return (await c.get(f"{server.url}/-/ready")).status_code == 200

                await eventually(ready, what="prometheus to answer /-/ready", interval=0.1, ignore=(httpx.HTTPError,),
                                 info=server.log_tail)
            yield server
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
