"""The TypeScript SDK (@wsgateway/client, clients/js) against a real gateway: `node --test` runs its tests
(clients/js/test/*.test.mjs) against nats-server, the test IdP and a gateway started here, with a local
control API (tests/support/jsclient.py `Rig`) for tokens, ACL documents, publishing and a restart.

Covered in Node: bad input refused before anything is sent, live events, subscribe/unsubscribe, a drop
mid-stream (resume: nothing lost or doubled), a gateway restart, token refresh, expiry (4408) and a
fresh token, revocation, 4401 final, a gap (`recovered: false`), AbortSignal, an injected WebSocket;
SSE (explicit, and the automatic fallback when WebSocket upgrades are refused), the history pager;
`npm pack` ships ESM with type declarations; and in headless Chromium (tests/browser/sdk.mjs), the
bundle the gateway serves: live events, a drop mid-stream and the resume."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway import package_version
from gateway.devtools.natsproc import NatsProcess
from tests.support.browser import ensure_browser, run_driver_async
from tests.support.idp import TestIdP
from tests.support.jsclient import JS, Rig, ensure_js, node_test
from tests.support.platform import Platform


@pytest.fixture
async def rig(nats_server: NatsProcess, idp: TestIdP, platform: Platform) -> AsyncIterator[Rig]:
    async with Rig(nats_server.url, idp, platform) as r:
        yield r


@pytest.mark.timeout(300)
async def test_node_client_against_a_real_gateway(rig: Rig) -> None:
    out = await node_test("client.test.mjs", rig.env)
    assert "# fail 0" in out and "# cancelled 0" in out, out[-3000:]
    assert rig.restarts == 1, "the restart test ran"


@pytest.mark.timeout(300)
async def test_node_client_over_sse_and_the_history_pager(rig: Rig) -> None:
    out = await node_test("sse-history.test.mjs", rig.env)
    assert "# fail 0" in out and "# cancelled 0" in out, out[-3000:]


def test_npm_pack_ships_esm_and_types() -> None:
    """`npm pack` yields the built ESM and its declarations (both entry points), no sources or tests."""
    ensure_js()
    run = subprocess.run(["npm", "pack", "--dry-run", "--json"], cwd=JS, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    [pack] = json.loads(run.stdout)
    files = {f["path"] for f in pack["files"]}
    assert pack["name"] == "@wsgateway/client" and pack["version"] == package_version()
    for name in ("index", "client", "http", "validate", "generated/events", "generated/protocol",
                 "generated/constants"):
        assert f"dist/{name}.js" in files and f"dist/{name}.d.ts" in files, name
    assert "package.json" in files
    assert not any(f.startswith(("src/", "test/", "node_modules/")) for f in files), sorted(files)
    manifest = json.loads((JS / "package.json").read_text())
    assert manifest["exports"]["."] == {"types": "./dist/index.d.ts", "import": "./dist/index.js"}
    assert manifest["exports"]["./ag-ui"] == {"types": "./dist/ag-ui.d.ts", "import": "./dist/ag-ui.js"}
    assert manifest["type"] == "module" and "dependencies" not in manifest, "no runtime dependency"


@pytest.mark.timeout(180)
async def test_sdk_in_headless_chromium_live_drop_and_resume(rig: Rig, tmp_path: Path) -> None:
    """The built ESM bundle the gateway serves, in Debian Chromium with its native WebSocket: live events,
    a drop mid-stream while events are published, the resume: every event once, in order."""
    ensure_browser()
    ensure_js()
    await rig.platform.grant("acme.conversation.b1", {"members": ["user:alice"]})
    config = {"gateway": rig.env["GW_HTTP"], "control": rig.env["CONTROL"], "scope": "conversation:b1"}
    out = await run_driver_async("sdk.mjs", config, tmp_path)
    assert out["problems"] == [], out["problems"]
    assert out["nativeWebSocket"] is True and out["transport"] == "websocket"
    assert out["seen"] == out["published"] and len(out["published"]) == 18, out
    assert out["connects"] == 2 and out["cursor"] == out["published"][-1]
    assert out["tokens"] == 2, "a fresh token for the reconnect"
