"""A nats-server child process with JetStream: used by `wsgateway dev`, the tests and the benchmark.

The child is tied to its parent with PR_SET_PDEATHSIG on Linux, so even a SIGKILLed parent leaves no
orphan nats-server behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.devtools.ports import free_port

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: the child gets `sig` when its parent dies, however the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
    except OSError:  # not Linux: the caller still stops the child on a normal exit
        pass


def find_nats_server() -> str:
    """Path of the nats-server binary (Debian installs it in /usr/sbin)."""
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if not found:
        raise FileNotFoundError("nats-server not found: install Debian's nats-server package (make deps)")
    return found


class NatsProcess:
    """One `nats-server -js` on loopback, with its own store dir; can be stopped, killed and restarted."""

    def __init__(
        self,
        port: int | None = None,
        store_dir: Path | None = None,
        *,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        server_name: str | None = None,
        quiet: bool = True,
    ) -> None:
        self.port = port or free_port()
        self._own_dir = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="wsgw-nats-"))
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.server_name = server_name or f"n{self.port}"
        self.quiet = quiet
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
            "-sd", str(self.store_dir), "-n", self.server_name,
        ]
        if self.cluster_name:
            cmd += ["--cluster_name", self.cluster_name, "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            if self.routes:
                cmd += ["--routes", ",".join(self.routes)]
        return cmd

    def start(self, wait: float = 10.0) -> NatsProcess:
        out = subprocess.DEVNULL if self.quiet else None
        self.proc = subprocess.Popen(
            self.command(), stdout=out, stderr=out, preexec_fn=die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop the server last
        )
        self.wait_ready(wait)
        return self

    def wait_ready(self, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {' '.join(self.command())}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server on port {self.port} did not start in {wait}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
