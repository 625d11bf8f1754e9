"""The npm ``oidc-provider`` as a real OpenID provider in a node child process.

Why: the hand-made :mod:`tests.support.idp` proves the verifier's rules; this proves interoperability
with a certified, widely used OpenID provider implementation issuing JWT access tokens through the
real OAuth 2.0 client_credentials grant. Needs node and ``tools/node_modules`` (installed on demand by
``scripts/ensure-npm.sh``); loopback only, so it works offline once the npm packages are installed.
"""

from __future__ import annotations

import ctypes
import json
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

from tests.support.ports import free_port
from tests.support.wait import eventually_sync

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
SERVER_SCRIPT = REPO / "tests" / "oidc" / "server.mjs"
ENSURE_NPM = REPO / "scripts" / "ensure-npm.sh"


def _die_with_parent() -> None:  # in the child between fork and exec: no orphaned node processes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def ensure_npm_packages() -> None:
    """Install ``tools/`` npm packages when missing or stale (fast no-op otherwise)."""
    result = subprocess.run(["bash", str(ENSURE_NPM)], capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/ensure-npm.sh failed:\n{result.stdout}\n{result.stderr}")


class OidcProviderProcess:
    """``node tests/oidc/server.mjs`` on a free loopback port; a context manager."""

    def __init__(
        self,
        *,
        tenant: str = "acme",
        groups: Sequence[str] = ("ops",),
        audience: str = "urn:wsgateway",
        alg: str = "ES256",
        ttl_s: int = 300,
        start_timeout_s: float = 20.0,
    ) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.audience = audience
        self.client_id = "wsgateway-test"
        self.client_secret = secrets.token_urlsafe(24)
        self.tenant = tenant
        self.groups = tuple(groups)
        self._config = {
            "port": self.port,
            "audience": audience,
            "clientId": self.client_id,
            "clientSecret": self.client_secret,
            "tenant": tenant,
            "groups": list(groups),
            "alg": alg,
            "ttlS": ttl_s,
            "toolsDir": str(TOOLS),
        }
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.token_endpoint: str | None = None

    def start(self) -> OidcProviderProcess:
        node = shutil.which("node")
        if node is None:
            raise FileNotFoundError("node not found: install Node.js 20+ to run the OpenID provider tests")
        ensure_npm_packages()
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [node, str(SERVER_SCRIPT), json.dumps(self._config)],
            stdin=subprocess.PIPE,  # the script exits when this closes
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,  # a file, not a pipe: an unread pipe could fill up and block node
            preexec_fn=_die_with_parent,
        )
        proc = self._proc
        with httpx.Client(timeout=2.0) as client:

            def discovered() -> str | None:
                if proc.poll() is not None:
                    raise RuntimeError(f"oidc-provider exited with {proc.returncode}:\n{self.stderr()}")
                response = client.get(f"{self.issuer}/.well-known/openid-configuration")
                return str(response.json()["token_endpoint"]) if response.status_code == 200 else None

            try:
                self.token_endpoint = eventually_sync(
                    discovered, what=f"oidc-provider to answer discovery on {self.issuer}",
                    timeout=self._start_timeout_s, ignore=(httpx.TransportError,))
            except AssertionError:
                self.close()
                raise
        return self

    def token(self, scope: str = "events:read", *, resource: str | None = None) -> str:
        """A JWT access token from the real client_credentials grant (client_secret_basic)."""
        assert self.token_endpoint is not None, "not started"
        response = httpx.post(
            self.token_endpoint,
            data={"grant_type": "client_credentials", "scope": scope, "resource": resource or self.audience},
            auth=(self.client_id, self.client_secret),
            timeout=5.0,
        )
        response.raise_for_status()
        document = response.json()
        assert document["token_type"] == "Bearer", document
        return str(document["access_token"])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)

    def stderr(self) -> str:
        """What node printed on stderr so far (warnings, server errors)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> OidcProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
