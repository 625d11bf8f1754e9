"""What an operator reads: real `wsgateway serve` processes, their stderr formatted by the configured
handlers (text and JSON): access lines without tokens, the start-up line, NATS failures, credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import check_credentials_file
from gateway.devtools.natsproc import NatsProcess
from gateway.logs import redact
from tests.support.gateway import wait_ready
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wait import eventually
from tests.support.wsclient import closed, connect, events, recv_type, welcome

WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# a user NKEY seed (the example of the NATS documentation) and a JWT-shaped token
SEED = "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY"
CREDS = f"""-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVQVQ2In0.c2ln
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
{SEED}
------END USER NKEY SEED------
"""


def _env(nats_url: str, idp: TestIdP, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
    env.update({
        "WSGATEWAY_NATS_URL": nats_url, "WSGATEWAY_OIDC_ISSUER": idp.issuer, "WSGATEWAY_AUDIENCE": idp.audience,
        "WSGATEWAY_HOST": "127.0.0.1", "WSGATEWAY_PORT": str(port), "WSGATEWAY_WORKERS": "1",
        "WSGATEWAY_LOG_LEVEL": "info", "WSGATEWAY_GC_GEN0_THRESHOLD": "0",
    })
    env.update(extra)
    return env


class Serve:
    """A `wsgateway serve` child whose stdout and stderr go to files the test reads."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.err_path, self.out_path = tmp / "stderr.log", tmp / "stdout.log"
        self._err, self._out = self.err_path.open("wb"), self.out_path.open("wb")
        self.proc = subprocess.Popen([WSGATEWAY, "serve"], env=env, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return await asyncio.to_thread(self.proc.wait, 30)
        finally:
            self._err.close()
            self._out.close()


@contextlib.asynccontextmanager
async def serve(tmp: Path, env: dict[str, str]) -> AsyncIterator[Serve]:
    s = Serve(tmp, env)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        await asyncio.to_thread(s.proc.wait, 30)


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    return records


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_serve_logs_requests_without_tokens(
    fmt: str, nats_server: NatsProcess, idp: TestIdP, platform: Platform, tmp_path: Path
) -> None:
    """Probes, history, SSE and WebSocket handshakes with tokens in every place a client may put them:
    each request has its access line, formatted by the configured handler, and no token is anywhere."""
    port = free_port()
    nats_url = nats_server.url.replace("nats://", "nats://wsgw:s3cr3t-pa55@")  # credentials in the URL
    env = _env(nats_url, idp, port, WSGATEWAY_LOG_FORMAT=fmt, WSGATEWAY_HEARTBAET_S="5")  # a typo, too
    base, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws"
    token = idp.mint("alice")
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    async with serve(tmp_path, env) as gw:
        await wait_ready(base)
        async with httpx.AsyncClient(timeout=10) as c:
            assert (await c.get(f"{base}/healthz")).status_code == 200
            # the parameter name percent-encoded: the same parameter to the server, so redacted too
            r = await c.get(httpx.URL(f"{base}/v1/history?scope=conversation:c1&access_t%6Fken={token}"))
            assert r.status_code in (200, 401, 503), r.text
            r = await c.get(f"{base}/v1/history", params={"scope": "conversation:c1"},
                            headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        sub = await connect(ws_url, token, via="subprotocol")  # bearer.<jwt>
        await welcome(sub)
        await sub.close()
        ws = await connect(f"{ws_url}?scope=conversation:c1", token, via="query")
        await welcome(ws)
        await recv_type(ws, "subscribed")
        seq = await platform.publish("acme", "conversation:c1")
        [frame] = await events(ws, 1)
        assert frame["seq"] == seq
        gw.proc.terminate()  # SIGTERM: drain, close 1001, exit 0
        assert (await closed(ws, timeout=30))[0] == 1001
        assert await gw.stop() == 0
        text, out = gw.stderr, gw.stdout

    assert out == "", "every log line goes to stderr"
    assert "Traceback" not in text and "Logging error" not in text, text
    for secret in (token, token.split(".")[1], token.split(".")[2], "s3cr3t-pa55"):
        assert secret not in text
    if fmt == "json":
        records = _json_lines(text)
        access = [r for r in records if r["logger"] == "uvicorn.access"]
        healthz = [r for r in access if r["path"] == "/healthz"]
        assert healthz and healthz[0]["method"] == "GET" and healthz[0]["status"] == 200
        assert all(isinstance(r["duration_ms"], float) and r["duration_ms"] >= 0 for r in access)
        paths = [r["path"] for r in access]
        assert any("access_t%6Fken=REDACTED" in p for p in paths), paths
        assert "/v1/history?scope=conversation%3Ac1" in paths, paths
        handshakes = [r for r in records if r.get("method") == "WEBSOCKET"]
        assert any("access_token=REDACTED" in r["path"] and r["status"] == 101 for r in handshakes), handshakes
        messages = [r["message"] for r in records]
        startup = [r for r in records if r["logger"] == "gateway.cli" and " serve " in r["message"]]
    else:
        lines = text.splitlines()
        bad = [ln for ln in lines if not TEXT_LINE.match(ln)]
        assert not bad, bad  # one line per record
        assert any(re.search(r'uvicorn\.access: 127\.0\.0\.1:\d+ - "GET /healthz HTTP/1\.1" 200 \d+\.\dms$', ln)
                   for ln in lines), text
        assert any("access_t%6Fken=REDACTED" in ln for ln in lines), text
        assert any('"WebSocket /v1/ws?scope=conversation:c1&access_token=REDACTED" [accepted]' in ln
                   for ln in lines), text
        messages = lines
        startup = [ln for ln in lines if "gateway.cli:" in ln and " serve " in ln]
    # one start-up line with the effective configuration, the URL without its credentials
    assert len(startup) == 1, startup
    line = startup[0] if isinstance(startup[0], str) else startup[0]["message"]
    assert f"nats_url={nats_server.url}" in line and "heartbeat_s=20" in line and f"log_format={fmt}" in line
    assert any("WSGATEWAY_HEARTBAET_S: unknown variable" in m and "did you mean WSGATEWAY_HEARTBEAT_S?" in m
               for m in messages), messages


@pytest.mark.timeout(120)
async def test_unreachable_nats_is_reported_with_backoff_until_it_connects(idp: TestIdP, tmp_path: Path) -> None:
    """A wrong or down NATS is no longer silent: warnings name the server (no credentials) and the cause,
    at most one per backoff interval with the number of failed attempts, until the connection is made."""
    natsd = NatsProcess()  # its port is free: nothing listens there yet
    port = free_port()
    url = f"nats://wsgw:s3cr3t-pa55@127.0.0.1:{natsd.port}"
    failed = f"NATS connection to nats://127.0.0.1:{natsd.port} failed: ConnectionRefusedError"
    async with serve(tmp_path, _env(url, idp, port)) as gw:

        def reports() -> list[str]:
            return [ln for ln in gw.stderr.splitlines() if failed in ln]

        await eventually(lambda: len(reports()) >= 2, what="two connection-failure reports", timeout=60,
                         info=lambda: gw.stderr)
        first, second = reports()[:2]
        assert " WARNING gateway.core.bus: " in first and "(1 failed attempt since the last report" in first
        count = int(re.search(r"\((\d+) failed attempts? since the last report", second).group(1))  # type: ignore[union-attr]
        assert count > 1, "failed attempts between two reports are counted, not each logged"
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{port}/readyz")).status_code == 503
        await asyncio.to_thread(natsd.start)
        try:
            await wait_ready(f"http://127.0.0.1:{port}")
            text = gw.stderr
            assert re.search(rf"NATS connected to nats://127\.0\.0\.1:{natsd.port} after \d+ failed attempts", text)
            assert "s3cr3t-pa55" not in text and "Traceback" not in text
            assert await gw.stop() == 0
        finally:
            natsd.stop()


@pytest.mark.parametrize(("content", "message"), [
    (None, " does not exist or is not a file"),
    ("not a creds file\n", " is not a NATS .creds file (no NATS USER JWT and USER NKEY SEED block)"),
    (CREDS.replace(SEED, "SUAxxxxnotaseed"), ": the USER NKEY SEED block does not hold a valid nkey seed"),
])
def test_bad_credentials_file_refuses_to_start(
    content: str | None, message: str, idp: TestIdP, tmp_path: Path
) -> None:
    creds = tmp_path / "nats.creds"
    if content is not None:
        creds.write_text(content)
    env = _env("nats://127.0.0.1:1", idp, free_port(), WSGATEWAY_NATS_CREDENTIALS=str(creds))
    out = subprocess.run([WSGATEWAY, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"wsgateway serve: WSGATEWAY_NATS_CREDENTIALS: {creds}{message}"]


def test_a_well_formed_credentials_file_is_accepted(tmp_path: Path) -> None:
    creds = tmp_path / "nats.creds"
    creds.write_text(CREDS)
    check_credentials_file(creds)


@pytest.mark.parametrize(("line", "expected"), [
    ('1.2.3.4:5 - "GET /v1/sse?scope=a&access_token=eyJh.eyJz.c2ln HTTP/1.1" 200',
     '1.2.3.4:5 - "GET /v1/sse?scope=a&access_token=REDACTED HTTP/1.1" 200'),
    ("/v1/ws?ACCESS%5Ftoken=abc&since=4", "/v1/ws?ACCESS%5Ftoken=REDACTED&since=4"),
    ("offered wsgateway.v1, bearer.abc.def.ghi", "offered wsgateway.v1, bearer.REDACTED"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz", "Authorization: Bearer REDACTED"),
    ("a JWT eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2ln in prose", "a JWT REDACTED in prose"),
    ("mytoken=abc&scope=x a bearer token", "mytoken=abc&scope=x a bearer token"),
])
def test_redaction_rules(line: str, expected: str) -> None:
    assert redact(line) == expected
    assert redact(expected) == expected
