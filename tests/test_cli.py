"""The command line as people meet it: configuration errors, help, --version, `wsgateway watch`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.config import Settings
from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wait import eventually

ROOT = Path(__file__).resolve().parent.parent
WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
    env.update({"WSGATEWAY_OIDC_ISSUER": "http://127.0.0.1:1", "WSGATEWAY_NATS_URL": "nats://127.0.0.1:1"})
    env.update(extra)
    return env


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WSGATEWAY, "serve", *args], env=env, capture_output=True, text=True, timeout=60)


def test_bad_settings_exit_2_with_one_line_each_naming_the_variable() -> None:
    env = _env(WSGATEWAY_HEARTBEAT_S="0", WSGATEWAY_JWT_LEEWAY_S="301", WSGATEWAY_PORT="http",
               WSGATEWAY_CREATE_STREAM="perhaps", WSGATEWAY_LOG_FORMAT="xml", WSGATEWAY_MAX_CONECTIONS="5")
    out = _serve(env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "wsgateway serve: WSGATEWAY_CREATE_STREAM: must be true or false (got 'perhaps')",
        "wsgateway serve: WSGATEWAY_JWT_LEEWAY_S: must be between 0 and 300 (got '301')",
        "wsgateway serve: WSGATEWAY_PORT: must be a whole number (got 'http')",
        "wsgateway serve: WSGATEWAY_LOG_FORMAT: must be one of 'text' or 'json' (got 'xml')",
        "wsgateway serve: WSGATEWAY_HEARTBEAT_S: must be more than 0 (got '0')",
        "wsgateway serve: warning: WSGATEWAY_MAX_CONECTIONS: unknown variable, ignored "
        "(did you mean WSGATEWAY_MAX_CONNECTIONS?)",
    ]
    assert out.stdout == ""


def test_command_line_overrides_are_named_too() -> None:
    out = _serve(_env(), "--port", "70000")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["wsgateway serve: WSGATEWAY_PORT: must be between 0 and 65535 (got '70000')"]


def test_missing_identity_provider_is_one_line() -> None:
    env = {k: v for k, v in _env().items() if k != "WSGATEWAY_OIDC_ISSUER"}
    out = _serve(env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "wsgateway serve: set WSGATEWAY_OIDC_ISSUER or WSGATEWAY_JWKS_URL (or run `wsgateway dev`)"
    ]


def test_strict_env_makes_unknown_variables_an_error() -> None:
    out = _serve(_env(WSGATEWAY_STRICT_ENV="true", WSGATEWAY_NAT_URL="nats://x:4222"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "wsgateway serve: WSGATEWAY_NAT_URL: unknown variable, ignored (did you mean WSGATEWAY_NATS_URL?)",
        "wsgateway serve: WSGATEWAY_STRICT_ENV is true: unknown WSGATEWAY_* variables are errors",
    ]


def test_version_comes_from_the_package_metadata() -> None:
    out = subprocess.run([WSGATEWAY, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"wsgateway {metadata.version('wsgateway')}"


def test_the_licence_is_apache_2_0_everywhere() -> None:
    """LICENSE, the package's SPDX expression and licence file, the chart's metadata (the image's label:
    tests/test_image.py); CHANGELOG.md and SECURITY.md exist with their sections."""
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    meta = metadata.metadata("wsgateway")  # as installed
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    chart = (ROOT / "charts" / "wsgateway-operator" / "Chart.yaml").read_text()
    assert "artifacthub.io/license: Apache-2.0" in chart and "licenses: Apache-2.0" in chart
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in changelog and "## [Unreleased]" in changelog and "## [0.1.0]" in changelog
    security = (ROOT / "SECURITY.md").read_text()
    assert "## Supported versions" in security and "## Reporting a vulnerability" in security


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_option_has_help_naming_its_variable_and_docs() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"serve", "dev", "watch", "operator"}
    fields = {f"WSGATEWAY_{f.upper()}" for f in Settings.model_fields}
    for name, sub in commands.items():
        docs = re.findall(r"[\w/]+\.md", f"{sub.description} {sub.epilog}")
        assert docs, f"`wsgateway {name} --help` names no documentation"
        for doc in docs:
            assert (ROOT / doc).is_file() or (ROOT / "docs" / doc).is_file(), f"{name}: {doc} does not exist"
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings}: no help"
    for action in commands["serve"]._actions:
        if action.dest in ("host", "port", "workers"):
            assert f"$WSGATEWAY_{action.dest.upper()}" in (action.help or "")
            assert f"WSGATEWAY_{action.dest.upper()}" in fields
    help_text = subprocess.run([WSGATEWAY, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "README.md#configuration" in help_text and "docs/operations.md" in help_text


# --- wsgateway watch -------------------------------------------------------------------------------


class Watch:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._tasks = [asyncio.create_task(self._read(proc.stdout, self.out)),
                       asyncio.create_task(self._read(proc.stderr, self.err))]

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode().rstrip("\n"))

    async def wait(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await asyncio.gather(*self._tasks)
        return code


@contextlib.asynccontextmanager
async def watch(*args: str) -> AsyncIterator[Watch]:
    proc = await asyncio.create_subprocess_exec(
        WSGATEWAY, "watch", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    w = Watch(proc)
    try:
        yield w
    finally:
        if proc.returncode is None:
            proc.kill()
        await w.wait()


@pytest.mark.timeout(90)
async def test_watch_prints_events_and_reconnects_with_one_line_per_step(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.applied(idp, gw)
    async with watch("--url", gw.ws, "--token", idp.mint("alice"), "--scope", "conversation:c1") as w:
        await eventually(lambda: any(ln.startswith('{"type": "subscribed"') for ln in w.out),
                         what="the subscribed frame", info=lambda: "\n".join(w.out + w.err))
        seq = await platform.publish("acme", "conversation:c1")
        await eventually(lambda: any(ln.startswith(f"#{seq} ") and "conversation:c1" in ln for ln in w.out),
                         what="the event line", info=lambda: "\n".join(w.out + w.err))
        assert w.err[0] == f"wsgateway watch: connecting to {gw.ws}"
        assert w.err[1].startswith("wsgateway watch: connected as user:alice (connection ")
        w.proc.terminate()
        await w.wait()
    assert not any("Traceback" in ln for ln in w.out + w.err)


@pytest.mark.timeout(90)
async def test_watch_says_when_it_cannot_connect_and_retries() -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/ws"  # nothing listens there
    async with watch("--url", url, "--token", "x.y.z") as w:
        await eventually(lambda: sum("reconnecting to" in ln for ln in w.err) >= 2, what="two reconnect attempts",
                         info=lambda: "\n".join(w.err))
        w.proc.terminate()
        await w.wait()
    assert w.err[0] == f"wsgateway watch: connecting to {url}"
    assert re.fullmatch(r"wsgateway watch: connection failed \(.*\); retrying in 0\.5s", w.err[1]), w.err
    assert w.err[2] == f"wsgateway watch: reconnecting to {url}"
    assert not any("Traceback" in ln for ln in w.err)


@pytest.mark.timeout(90)
async def test_watch_exits_non_zero_on_a_final_close_code(gw: RunningGateway, idp: TestIdP) -> None:
    async with watch("--url", gw.ws, "--token", idp.mint("alice", exp_in=-3600)) as w:
        code = await w.wait()
    assert code == 1
    assert w.out == []
    assert len(w.err) == 2, w.err  # connecting, then why it stopped
    assert w.err[1].startswith("wsgateway watch: the gateway closed the connection with 4401 ")
    assert w.err[1].endswith(": final (4400 bad request, 4401 unauthorized), not retrying")


def test_watch_bad_url_is_one_line() -> None:
    out = subprocess.run([WSGATEWAY, "watch", "--url", "http//nowhere", "--token", "t"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "wsgateway watch: --url must be a ws:// or wss:// URL, e.g. ws://127.0.0.1:8080/v1/ws (got 'http//nowhere')"
    ]
