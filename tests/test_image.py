"""The container image, built by `make image` (scripts/build-image.sh, cached by the hash of its inputs)
and run through its entrypoint with `buildah run --isolation chroot --network host`: the gateway in the
image serves a real nats-server and identity provider on the host, runs as its non-root uid, drains on
SIGTERM; the operator starts from the same image; no compiler or test tool is inside.

`buildah run` does not forward SIGTERM (it kills its child), so the test signals the entrypoint's
process itself, as a container runtime signals a container's first process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import wait_ready
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port
from tests.support.wait import eventually_sync
from tests.support.wsclient import closed, connect, events, recv_type, welcome

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
UID = 10001
MAX_IMAGE_BYTES = 250 * 1000 * 1000  # the image's budget, uncompressed


def _run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """The image `make image` builds (a no-op when an image with the same inputs exists)."""
    out = _run(str(ROOT / "scripts" / "build-image.sh"), timeout=3600)
    assert out.returncode == 0, f"scripts/build-image.sh failed:\n{out.stderr[-6000:]}"
    name = out.stdout.strip().splitlines()[-1]
    assert name == f"wsgateway/wsgateway:{VERSION}"
    return name


@pytest.fixture(scope="module")
def config(image: str) -> dict[str, Any]:
    out = _run("buildah", "inspect", "--type", "image", image)
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    return {"config": document["OCIv1"]["config"], "size": _image_size(image)}


def _image_size(image: str) -> int:
    """Uncompressed size in bytes (buildah prints it in decimal units, e.g. "222 MB")."""
    out = _run("buildah", "images", "--json", image)
    assert out.returncode == 0, out.stderr
    number, unit = json.loads(out.stdout)[0]["size"].split()
    return int(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


@pytest.fixture
def container(image: str) -> Iterator[str]:
    """A working container of the image (buildah from), removed afterwards."""
    out = _run("buildah", "from", "--pull=never", image)
    assert out.returncode == 0, out.stderr
    ctr = out.stdout.strip().splitlines()[-1]
    try:
        yield ctr
    finally:
        _run("buildah", "rm", ctr)


def _run_in(ctr: str, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """`buildah run` of argv in the container, with the host's network."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return ["buildah", "run", "--isolation", "chroot", "--network", "host", *flags, ctr, "--", *argv]


def _entrypoint(config: dict[str, Any]) -> list[str]:
    return [*config["config"]["Entrypoint"], *config["config"]["Cmd"]]


def test_image_metadata(config: dict[str, Any]) -> None:
    c = config["config"]
    assert c["Entrypoint"] == ["wsgateway"] and c["Cmd"] == ["serve"]  # exec form: no shell in between
    assert "8080/tcp" in c["ExposedPorts"]
    user, _, group = c["User"].partition(":")
    assert user.isdigit() and int(user) == UID and group.isdigit()  # numeric: runAsNonRoot can check it
    labels = c["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", labels["org.opencontainers.image.revision"])
    assert re.fullmatch(r"[0-9a-f]{64}", labels["org.wsgateway.inputs"])
    assert config["size"] < MAX_IMAGE_BYTES, f"image is {config['size'] / 1e6:.0f} MB"
    # a docker/podman build without build args labels the same version
    assert f"ARG VERSION={VERSION}\n" in (ROOT / "Containerfile").read_text()


def test_an_unchanged_tree_is_not_built_again(image: str) -> None:
    """The cache: with an image labelled with the inputs' hash in storage, the script only re-tags it.
    (Retried a few times: in a shared working tree someone may change gateway/ in between.)"""
    outputs = []
    for _ in range(3):
        out = _run(str(ROOT / "scripts" / "build-image.sh"), timeout=3600)
        assert out.returncode == 0, out.stderr[-4000:]
        outputs.append(out.stderr)
        if re.search(r"is up to date \(inputs [0-9a-f]{64}, image [0-9a-f]{12}\): build skipped", out.stderr):
            assert out.stdout.strip() == image and "STEP" not in out.stderr
            return
    raise AssertionError("the build ran every time:\n" + "\n---\n".join(outputs))


def test_final_image_holds_no_compiler_pip_or_test_tool(container: str) -> None:
    tools = "gcc cc c++ g++ clang make ld pip pip3 pytest ruff mypy"
    script = f"for t in {tools}; do command -v $t; done; for m in pip pytest setuptools; do " \
             "python3 -c \"import $m\" 2>/dev/null && echo module $m; done; true"
    out = _run(*_run_in(container, "sh", "-c", script))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"found in the image:\n{out.stdout}"


def test_the_image_runs_the_compiled_fan_out_loops(container: str) -> None:
    """The fast path is built into the image (setup.py in the app stage), not silently the Python fallback."""
    out = _run(*_run_in(container, "/opt/wsgateway/bin/python", "-c",
                        "from gateway.core import fastpath; import gateway.core._fastpath as m; print(m.__file__)"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(".so"), out.stdout


def test_operator_runs_from_the_same_image(container: str, config: dict[str, Any]) -> None:
    out = _run(*_run_in(container, *config["config"]["Entrypoint"], "operator", "--help"))
    assert out.returncode == 0, out.stderr
    assert "--all-namespaces" in out.stdout and "WSGATEWAY_OPERATOR_NAMESPACES" in out.stdout
    out = _run(*_run_in(container, *config["config"]["Entrypoint"], "--version"))
    assert out.stdout.strip() == f"wsgateway {VERSION}"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _gateway_process(root_pid: int) -> int | None:
    """The `wsgateway serve` process under `buildah run` (its descendants are in the host's pid namespace)."""
    tree, todo = _children(), [root_pid]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            # the python interpreter running the console script (not buildah's chroot helper above it,
            # whose argv names the same command)
            if len(argv) > 2 and b"python" in argv[0] and argv[1].endswith(b"/wsgateway") and b"serve" in argv:
                return pid
        todo.extend(tree.get(pid, []))
    return None


def _status(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.timeout(180)
async def test_gateway_in_the_image_serves_and_drains_on_sigterm(
    container: str, config: dict[str, Any], nats_server: NatsProcess, idp: TestIdP, platform: Platform,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        "WSGATEWAY_NATS_URL": nats_server.url, "WSGATEWAY_OIDC_ISSUER": idp.issuer,
        "WSGATEWAY_AUDIENCE": idp.audience, "WSGATEWAY_HOST": "127.0.0.1", "WSGATEWAY_PORT": str(port),
        "WSGATEWAY_WORKERS": "1", "WSGATEWAY_SHUTDOWN_TIMEOUT_S": "20", "WSGATEWAY_LOG_FORMAT": "json",
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(_run_in(container, *_entrypoint(config), env=env), stdout=sink,  # noqa: ASYNC220
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, timeout=90)
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{base}/healthz")).status_code == 200
            assert (await c.get(f"{base}/readyz")).status_code == 200
        pid = eventually_sync(lambda: _gateway_process(proc.pid), what="the gateway process in the container")
        assert _status(pid, "Uid") == [str(UID)] * 4, "the gateway runs as the image's non-root uid"
        assert os.readlink(f"/proc/{pid}/root") != "/", "the gateway runs inside the image's root file system"

        await platform.grant("acme.org", {"admins": ["user:alice"]})
        await platform.applied(idp, base)
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws?scope=conversation:c1", idp.mint("alice"),
                           via="subprotocol")
        await welcome(ws)
        await recv_type(ws, "subscribed")
        seq = await platform.publish("acme", "conversation:c1", type="test.tick")
        [frame] = await events(ws, 1)
        assert frame["seq"] == seq and frame["event"]["scope"] == "conversation:c1"

        os.kill(pid, signal.SIGTERM)  # what the runtime does to the container's first process
        assert await closed(ws, timeout=30) == (1001, "server shutting down")
        assert await asyncio.to_thread(proc.wait, 60) == 0, log.read_text()
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
        assert any(r.get("path") == "/healthz" and r.get("status") == 200 for r in lines), log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
