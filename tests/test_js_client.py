"""The TypeScript SDK (@wsgateway/client, clients/js) against a real gateway: `node --test` runs its tests
(clients/js/test/*.test.mjs) against nats-server, the test IdP and a gateway started here, with a local
control API (tests/support/jsclient.py `Rig`) for tokens, ACL documents, publishing and a restart.

Covered in Node: bad input refused before anything is sent, live events, subscribe/unsubscribe, a drop
mid-stream (resume: nothing lost or doubled), a gateway restart, token refresh, expiry (4408) and a
fresh token, revocation, 4401 final, a gap (`recovered: false`), AbortSignal, an injected WebSocket;
SSE (explicit, and the automatic fallback when WebSocket upgrades are refused), the history pager;
`npm pack` ships ESM with type declarations; and in headless Chromium, the bundle the gateway serves
(/static/sdk) with the browser's own WebSocket and fetch: live events, a drop mid-stream and the resume
(tests/browser/sdk.mjs); token refresh past the first token's session, 4401 final, revocation and a
re-grant, SSE with a drop and the resume, a gateway restart (tests/browser/sdk-lifecycle.mjs); the AG-UI
GatewayAgent without a bundler, through a drop mid-message (tests/browser/agui.mjs). The Node
publisher example (clients/js/examples/publish.mjs, npm `nats`) publishes what a WebSocket client
receives, deduplicated by `Nats-Msg-Id`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway import package_version
from gateway.devtools.natsproc import NatsProcess
from gateway.events import parse_event
from tests.support.browser import ensure_browser, run_driver_async
from tests.support.idp import TestIdP
from tests.support.jsclient import JS, REPO, Rig, ensure_js, node_test
from tests.support.platform import Platform
from tests.support.wsclient import connect, nothing_before, recv_type


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
    assert not any(f.startswith(("src/", "test/", "node_modules/")) or "/." in f for f in files), sorted(files)
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
    await rig.platform.applied(rig.idp, rig.env["GW_HTTP"])
    config = {"gateway": rig.env["GW_HTTP"], "control": rig.env["CONTROL"], "scope": "conversation:b1"}
    out = await run_driver_async("sdk.mjs", config, tmp_path)
    assert out["problems"] == [], out["problems"]
    assert out["nativeWebSocket"] is True and out["transport"] == "websocket"
    assert out["seen"] == out["published"] and len(out["published"]) == 18, out
    assert out["connects"] == 2 and out["cursor"] == out["published"][-1]
    assert out["tokens"] == 2, "a fresh token for the reconnect"


LIFECYCLE_SCOPES = {"refresh": "conversation:bl-refresh", "final": "conversation:bl-final",
                    "revoke": "conversation:bl-revoke", "marker": "conversation:bl-marker",
                    "sse": "conversation:bl-sse", "restart": "conversation:bl-restart"}


def _closes(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in rec["notices"] if n["type"] == "disconnected"]


@pytest.mark.timeout(180)
async def test_sdk_in_headless_chromium_restart_refresh_revocation_4401_and_sse(rig: Rig, tmp_path: Path) -> None:
    """The bundle the gateway serves, in Debian Chromium (tests/browser/sdk-lifecycle.mjs, one client per
    scenario): token refresh past the first token's session end (no 4408, one connection), 4401 final (no
    retry, the error surfaced), revocation and a re-grant, SSE with a drop and the resume, a gateway restart:
    every event once, in order."""
    ensure_browser()
    ensure_js()
    for key in ("refresh", "final", "sse", "restart"):
        await rig.platform.grant(f"acme.{LIFECYCLE_SCOPES[key].replace(':', '.')}", {"members": ["user:alice"]})
    await rig.platform.applied(rig.idp, rig.env["GW_HTTP"])
    # A process event in the stream before the restart: a gateway restarting on a stream that holds events but
    # none of events.*.process.* never becomes ready (the inbox's start-up scan, gateway/core/history.py
    # `scan`, waits for an event that does not come and retries every 30 s). Not what this test is about.
    await rig.platform.publish("acme", "process:bl-inbox")
    config = {"gateway": rig.env["GW_HTTP"], "control": rig.env["CONTROL"], "scopes": LIFECYCLE_SCOPES,
              "leewayS": rig.gateway.settings.jwt_leeway_s if rig.gateway else 1}
    out = await run_driver_async("sdk-lifecycle.mjs", config, tmp_path, timeout=150)
    assert out["problems"] == [] and out["consoleErrors"]["unexpected"] == [], out
    assert out["nativeWebSocket"] is True
    assert set(out["states"].values()) == {"closed"}, out["states"]

    refresh = out["refresh"]
    assert refresh["seqs"] == refresh["published"] and len(refresh["published"]) == 6, refresh
    assert refresh["connects"] == 1 and _closes(refresh) == [], "no reconnect: the token was refreshed in time"
    assert refresh["checkedAt"] > refresh["sessionEnd"], "checked after the first token's session had ended"
    refreshed = [f for f in refresh["frames"] if f["type"] == "refreshed"]
    assert refreshed and refreshed[0]["expires_at"] > refresh["firstExpiresAt"], refresh["frames"]
    assert refresh["tokens"] >= 2 and refresh["pong"]["type"] == "pong" and refresh["transport"] == "websocket"

    final = out["final"]
    for where in ("connect", "iteration", "closed"):
        err = final[where]
        assert err["isClosedError"] is True and err["name"] == "GatewayClosedError", (where, err)
        assert err["code"] == 4401 and "wrong_issuer" in err["reason"], (where, err)
    [close] = _closes(final)
    assert close["code"] == 4401 and close["final"] is True and close["retryInMs"] is None, close
    assert final["tokens"] == 1 and final["connects"] == 0, "not retried"
    assert final["state"] == "closed" and final["states"] == ["connecting", "closed"], final["states"]

    revoke = out["revoke"]
    assert revoke["seqs"] == [*revoke["before"], revoke["marker"], *revoke["after"]], revoke
    assert not set(revoke["withheld"]) & set(revoke["seqs"]), "nothing of a revoked scope"
    revoked = [f for f in revoke["frames"] if f["type"] == "revoked"]
    assert revoked == [{"type": "revoked", "scope": LIFECYCLE_SCOPES["revoke"]}], revoke["frames"]
    regranted = [f for f in revoke["frames"] if f["type"] == "subscribed" and f["scope"] == LIFECYCLE_SCOPES["revoke"]]
    assert len(regranted) == 2 and revoke["withheld"][-1] <= regranted[1]["seq"] < revoke["after"][0], regranted
    assert revoke["connects"] == 1 and _closes(revoke) == []

    sse = out["sse"]
    assert sse["seqs"] == sse["published"] and len(sse["published"]) == 10, sse
    assert sse["transport"] == "sse" and sse["connects"] == 2 and sse["cursor"] == sse["published"][-1]
    [drop] = _closes(sse)
    assert drop["final"] is False and drop["transport"] == "sse", drop
    resumed = [f for f in sse["frames"] if f["type"] == "subscribed" and "since" in f]
    assert len(resumed) == 1 and resumed[0]["recovered"] is True, sse["frames"]

    restart = out["restart"]
    assert restart["seqs"] == restart["published"] and len(restart["published"]) == 10, restart
    assert restart["connects"] >= 2 and restart["transport"] == "websocket"
    drops = _closes(restart)
    assert drops and drops[0]["code"] == 1001, "the restart is a graceful shutdown"
    assert all(d["final"] is False and d["retryInMs"] is not None for d in drops), drops
    # The reconnect subscribed the scope again. Not asserted: that it was a resume (`since`, `recovered`).
    # The SDK reconnects as soon as the port accepts, and a gateway accepts sessions before its bus has
    # loaded the ACLs: a reconnect in that window gets `error forbidden`, then `subscribed` (seq 0, no
    # `since`) once they are loaded, live from there (gateway/core/hub.py `_notify`): events stored while
    # no gateway ran would not be replayed. Seen in 2 of 8 runs on a loaded machine (reported); the events
    # above are published after /readyz.
    last_welcome = max(i for i, f in enumerate(restart["frames"]) if f["type"] == "welcome")
    assert any(f["type"] == "subscribed" and f["scope"] == LIFECYCLE_SCOPES["restart"]
               for f in restart["frames"][last_welcome:]), restart["frames"]
    assert rig.restarts == 1


@pytest.mark.timeout(180)
async def test_agui_gateway_agent_in_headless_chromium(rig: Rig, tmp_path: Path) -> None:
    """GatewayAgent (@wsgateway/client/ag-ui) in Debian Chromium without a bundler (tests/browser/agui.mjs: an
    import map; rxjs from its UMD bundle, its ESM cannot load in a browser): it attaches to a run already
    going, through a drop in the middle of a message, and @ag-ui/client's own verifier and state-applying
    pipeline accept the stream (connectAgent() resolves) and reach the thread."""
    ensure_browser()
    ensure_js()
    scope = "conversation:bl-agui"
    await rig.platform.grant("acme.conversation.bl-agui", {"members": ["user:alice"]})
    await rig.platform.applied(rig.idp, rig.env["GW_HTTP"])
    config = {"gateway": rig.env["GW_HTTP"], "control": rig.env["CONTROL"], "scope": scope}
    out = await run_driver_async("agui.mjs", config, tmp_path)
    assert out["problems"] == [] and out["consoleErrors"]["unexpected"] == [], out
    assert out["nativeWebSocket"] is True and out["rxjsFromUmd"] is True and out["transport"] == "websocket"
    assert out["attached"] == "resolved", out["attached"]
    assert "No active text message" in out["outOfOrder"], "the verifier runs in the page (the check is not vacuous)"
    assert out["types"] == [
        "RUN_STARTED", "MESSAGES_SNAPSHOT", "STATE_SNAPSHOT", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT", "STATE_DELTA", "TEXT_MESSAGE_END", "RUN_FINISHED",
    ], out["types"]
    assert out["messages"] == [{"id": "m-0", "role": "user", "content": "Hi"},
                               {"id": "m-1", "role": "assistant", "content": "Hello, world"}], out["messages"]
    assert out["state"] == {"step": 2} and out["threadId"] == scope
    assert out["drops"] == 1 and out["connects"] == 2


async def _publish_node(rig: Rig, *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node", str(JS / "examples" / "publish.mjs"), "--nats", rig.nats_url, *args, cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@pytest.mark.timeout(120)
async def test_node_publisher_example_follows_the_rules(rig: Rig, idp: TestIdP) -> None:
    """clients/js/examples/publish.mjs (npm `nats`, JetStream, Nats-Msg-Id) publishes an event a WebSocket
    client receives; the same id again is deduplicated by JetStream and never delivered twice."""
    ensure_js()
    await rig.platform.grant("acme.process.p-node", {"members": ["user:alice"]})
    await rig.platform.applied(rig.idp, rig.env["GW_HTTP"])
    assert rig.gateway is not None
    ws = await connect(f"{rig.gateway.ws}?scope=process:p-node", idp.mint("alice"))
    try:
        await recv_type(ws, "welcome")
        await recv_type(ws, "subscribed")
        args = ("--tenant", "acme", "--scope", "process:p-node", "--type", "process.progress",
                "--data", '{"fraction": 0.25, "message": "from node"}', "--id", "01NODEEXAMPLE0000000000001")
        first = await _publish_node(rig, *args)
        assert first["subject"] == "events.acme.process.p-node" and first["duplicate"] is False
        frame = await recv_type(ws, "event")
        assert frame["seq"] == first["seq"]
        event = frame["event"]
        assert event["id"] == "01NODEEXAMPLE0000000000001" and event["type"] == "process.progress"
        assert event["data"] == {"fraction": 0.25, "message": "from node"} and event["time"].endswith("Z")
        parse_event(json.dumps(event).encode(), first["subject"])  # what the gateway validated

        again = await _publish_node(rig, *args)
        assert again["duplicate"] is True and again["seq"] == first["seq"]
        marker = await rig.platform.publish("acme", "process:p-node")
        await nothing_before(ws, marker)  # the re-publish was not delivered
        generated = await _publish_node(rig, "--tenant", "acme", "--scope", "process:p-node",
                                        "--type", "run.started", "--run-id", "run-1", "--data", "{}")
        assert len(generated["id"]) == 26 and generated["duplicate"] is False
        assert (await recv_type(ws, "event"))["event"]["run_id"] == "run-1"
    finally:
        await ws.close()


async def test_node_publisher_example_refuses_bad_input(rig: Rig) -> None:
    ensure_js()
    for args, message in [(("--tenant", "acme", "--scope", "*", "--type", "x"), "scope must be"),
                          (("--tenant", "a b", "--scope", "process:p", "--type", "x"), "tenant must match"),
                          (("--tenant", "acme", "--scope", "process:p", "--type", "run.started"), "needs a run id")]:
        proc = await asyncio.create_subprocess_exec(
            "node", str(JS / "examples" / "publish.mjs"), "--nats", rig.nats_url, *args, cwd=JS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0 and message in err.decode(), err.decode()


def _readme_sdk_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### TypeScript and JavaScript: `@wsgateway/client`", 1)[1]
    block = re.search(r"```ts\n(.*?)```", section, flags=re.S)
    assert block, "no TypeScript block in the README's SDK section"
    return block.group(1)


def test_readme_sdk_example_type_checks(tmp_path: Path) -> None:
    """The README's SDK example compiles against the package's declarations (strict), with the app's own
    functions declared: the README shows the API as it is."""
    ensure_js()
    prelude = (
        "declare function getAccessToken(): Promise<string>;\n"
        "declare function reload(scope: string, earliest: number): void;\n"
        "declare function showNoAccess(scope: string): void;\n"
        "declare function appendText(messageId: string, text: string): void;\n"
        "declare function render(seq: number, event: import('@wsgateway/client').Envelope): void;\n"
    )
    example = _readme_sdk_example()
    (tmp_path / "example.ts").write_text(example.replace('import {', prelude + "import {", 1) + "\nexport {};\n")
    (tmp_path / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {
            "strict": True, "noEmit": True, "target": "ES2022", "module": "ESNext", "moduleResolution": "Bundler",
            "lib": ["ES2022", "DOM", "DOM.Iterable"], "types": [], "skipLibCheck": False,
            "paths": {"@wsgateway/client": [str(JS / "dist" / "index.d.ts")]},
        },
        "files": ["example.ts"],
    }))
    run = subprocess.run([str(JS / "node_modules" / ".bin" / "tsc"), "-p", str(tmp_path / "tsconfig.json")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
