"""Real processes for fault tests: `wsgateway serve` instances and a clustered nats-server.

Every child is tied to the test process with PR_SET_PDEATHSIG (a SIGKILLed pytest leaves no orphan
behind) and runs in its own session, so a kill reaches it and nothing else. The context managers kill
their children in `finally`, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx

from gateway.devtools.natsproc import NatsProcess, die_with_parent
from tests.support.gateway import GatewayEndpoint
from tests.support.ports import free_port, free_ports
from tests.support.wait import HANG_S, eventually

WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGKILL)


class GatewayProcess(GatewayEndpoint):
    """One `wsgateway serve --workers 1` on a free loopback port; its output goes to a log file."""

    def __init__(
        self, nats_url: str, issuer: str, audience: str | None = None, *, nofile: int | None = None, **env: str
    ) -> None:
        self.port = free_port()
        self.nofile = nofile  # the process's open-file limit (soft and hard), if not the inherited one
        # WSGATEWAY_FAST_PATH stays: the loops a test runs under (the `fast_path` fixture, tests/conftest.py)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_") or k == "WSGATEWAY_FAST_PATH"}
        self.env.update({
            "WSGATEWAY_NATS_URL": nats_url, "WSGATEWAY_OIDC_ISSUER": issuer,
            "WSGATEWAY_HOST": "127.0.0.1", "WSGATEWAY_PORT": str(self.port), "WSGATEWAY_WORKERS": "1",
            "WSGATEWAY_LOG_LEVEL": "warning", "WSGATEWAY_HEARTBEAT_S": "5", "WSGATEWAY_SHUTDOWN_TIMEOUT_S": "2",
        })
        if audience:
            self.env["WSGATEWAY_AUDIENCE"] = audience
        self.env.update({f"WSGATEWAY_{k.upper()}": v for k, v in env.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="wsgw-gateway-", suffix=".log", delete=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> GatewayProcess:
        self.proc = subprocess.Popen(
            [WSGATEWAY, "serve", "--workers", "1"], env=self.env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=self._in_child, start_new_session=True,
        )
        return self

    def _in_child(self) -> None:  # between fork and exec
        _die_with_parent()
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-tail:]

    async def wait_ready(self, timeout: float = HANG_S) -> None:
        """Until /readyz answers 200; fails at once (with the log) if the process exits."""
        last = ["no answer"]
        async with httpx.AsyncClient(timeout=2) as c:

            async def ready() -> bool:
                if not self.alive:
                    raise RuntimeError(f"gateway on port {self.port} exited:\n{self.log()}")
                r = await c.get(f"{self.http}/readyz")
                last[0] = r.text
                return r.status_code == 200

            await eventually(ready, what=f"gateway on port {self.port} to answer /readyz 200", timeout=timeout,
                             interval=0.1, ignore=(httpx.HTTPError,),
                             info=lambda: f"last /readyz answer: {last[0]}\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no close frames; the clients see their TCP connections die."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        try:
            self.terminate()
        finally:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)


@contextlib.asynccontextmanager
async def gateway_processes(
    n: int, nats_url: str, issuer: str, audience: str | None = None, *, timeout: float = 40.0, **env: str
) -> AsyncIterator[list[GatewayProcess]]:
    """Start n gateway processes at once and wait until all are ready; always stopped (or killed) after."""
    procs = [GatewayProcess(nats_url, issuer, audience, **env) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        await asyncio.gather(*(p.wait_ready(timeout) for p in procs))
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(p.cleanup)
            if p.alive and p.proc is not None:  # belt and braces: never leave one behind
                p.proc.kill()


def spawn_nats(server: NatsProcess) -> None:
    """Launch the server's process from THIS thread (PR_SET_PDEATHSIG follows the thread that forked)."""
    server.proc = subprocess.Popen(
        server.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent, start_new_session=True,
    )


async def start_nats(server: NatsProcess, wait: float = 10.0) -> None:
    """(Re)start a NatsProcess (same port, same store dir) without blocking the event loop."""
    spawn_nats(server)
    await asyncio.to_thread(server.wait_ready, wait)


class NatsCluster:
    """Three (or n) `nats-server -js` nodes clustered over loopback routes, each with its own store dir."""

    def __init__(self, store_root: Path, size: int = 3, name: str = "wsgw-faults") -> None:
        ports = free_ports(2 * size)
        client_ports, cluster_ports = ports[:size], ports[size:]
        self.nodes: list[NatsProcess] = []
        for i in range(size):
            routes = [f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i]
            store = store_root / f"n{i}"
            store.mkdir(parents=True, exist_ok=True)
            self.nodes.append(NatsProcess(
                client_ports[i], store_dir=store, cluster_name=name, cluster_port=cluster_ports[i], routes=routes,
                server_name=f"n{i}",
            ))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, server_name: str) -> NatsProcess:
        return next(n for n in self.nodes if n.server_name == server_name)

    def start(self, wait: float = 15.0) -> NatsCluster:
        for n in self.nodes:  # start all before waiting: each node retries its routes
            spawn_nats(n)
        deadline = time.monotonic() + wait
        for n in self.nodes:
            n.wait_ready(max(0.5, deadline - time.monotonic()))
        return self

    def stop(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.kill()


@contextlib.contextmanager
def nats_cluster(store_root: Path, size: int = 3) -> Iterator[NatsCluster]:
    cluster = NatsCluster(store_root, size)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
