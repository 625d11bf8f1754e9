"""Compact catch-up: what a reload in the middle of a long answer costs, with and without `compact`.

    .venv/bin/python bench/compact.py                # 2,000-delta answer, 5 rounds (~20 s)
    .venv/bin/python bench/compact.py --quick        # 300 deltas, 2 rounds (smoke test)
    .venv/bin/python bench/compact.py --json bench/results/compact.json

A run is under way in `conversation:c1`: reasoning (`--deltas / 4` deltas), a tool call with streamed
arguments (`--deltas / 10`), then an answer still being written (`--deltas` message deltas of about 12
characters each, no `finished` yet). A client reloads: it connects with
`?scope=conversation:c1&since=<the cursor before the run>` (and `&compact=true`) and renders when it
holds everything up to the `seq` of its `subscribed` frame (T: the replay is complete). Measured per
mode, medians over rounds (the modes alternate): event frames received, WebSocket payload bytes, time
from opening the connection to the complete render, and the same page from `GET /v1/history`. Also
checked each round: the rendered answer text is the same in both modes.

As bench/resilience.py: one process, a private nats-server, the test identity provider, an in-process
gateway and a `websockets` client in the same event loop. Nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("WSGATEWAY_GC_GEN0_THRESHOLD", "0")

import httpx  # noqa: E402

from gateway.devtools.natsproc import NatsProcess  # noqa: E402
from tests.support.gateway import RunningGateway, run_gateway  # noqa: E402
from tests.support.idp import TestIdP  # noqa: E402
from tests.support.platform import Platform  # noqa: E402
from tests.support.wsclient import connect, recv_type  # noqa: E402

SCOPE = "conversation:c1"
MODES = ("full", "compact")


async def publish_run(platform: Platform, deltas: int) -> int:
    """The long answer, in flight; returns the cursor before it."""
    cursor = await platform.publish("acme", SCOPE)
    kw: dict[str, Any] = {"run_id": "r1"}

    async def pub(type_: str, data: dict[str, Any]) -> None:
        await platform.publish("acme", SCOPE, type=type_, data=data, **kw)

    await pub("run.started", {"agent_id": "a1"})
    await pub("run.reasoning.started", {"message_id": "r1"})
    for i in range(deltas // 4):
        await pub("run.reasoning.delta", {"message_id": "r1", "delta": f"thought {i:05d} "})
    await pub("run.reasoning.finished", {"message_id": "r1"})
    await pub("run.tool_call.started", {"tool_call_id": "t1", "name": "search"})
    for i in range(deltas // 10):
        await pub("run.tool_call.args.delta", {"tool_call_id": "t1", "delta": f'"q{i:04d}",'})
    await pub("run.tool_call.args.finished", {"tool_call_id": "t1"})
    await pub("run.tool_call.finished", {"tool_call_id": "t1", "result": {"hits": 3}})
    await pub("run.message.started", {"message_id": "m1"})
    for i in range(deltas):
        await pub("run.message.delta", {"message_id": "m1", "delta": f"word{i:06d} "})
    return cursor


async def reload(g: RunningGateway, token: str, cursor: int, compact: bool) -> dict[str, Any]:
    url = f"{g.ws}?scope={SCOPE}&since={cursor}" + ("&compact=true" if compact else "")
    t0 = time.perf_counter()
    ws = await connect(url, token)
    await recv_type(ws, "welcome")
    ack = await recv_type(ws, "subscribed")
    frames = 0
    nbytes = 0
    text: dict[str, str] = {}
    while True:
        raw = await asyncio.wait_for(ws.recv(), 60)
        nbytes += len(raw)
        frame = json.loads(raw)
        if frame["type"] != "event":
            continue
        frames += 1
        ev = frame["event"]
        if ev["type"].endswith(".delta"):
            key = ev["data"].get("message_id") or ev["data"].get("tool_call_id")
            text[key] = text.get(key, "") + ev["data"]["delta"]
        if frame["seq"] >= ack["seq"]:
            break
    elapsed = time.perf_counter() - t0
    await ws.close()
    return {"frames": frames, "bytes": nbytes, "render_s": elapsed, "text": text}


async def history(g: RunningGateway, token: str, cursor: int, compact: bool) -> dict[str, Any]:
    params = {"scope": SCOPE, "after": str(cursor), "limit": "10000", "compact": "true" if compact else "false"}
    async with httpx.AsyncClient(base_url=g.http, headers={"Authorization": f"Bearer {token}"}) as c:
        t0 = time.perf_counter()
        r = await c.get("/v1/history", params=params)
        elapsed = time.perf_counter() - t0
    return {"items": len(r.json()["events"]), "bytes": len(r.content), "s": elapsed}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    pages: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    same_text = True
    with TestIdP() as idp, NatsProcess() as natsd:
        platform = await Platform.connect(natsd.url)
        try:
            async with run_gateway(natsd.url, idp.issuer, audience=idp.audience, history_max_limit=10_000) as g:
                await platform.grant("acme.org", {"admins": ["user:alice"]})
                cursor = await publish_run(platform, args.deltas)
                token = idp.mint("alice")
                await reload(g, token, cursor, False)  # warm-up: imports, first-use allocations
                for r in range(args.rounds):
                    order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                    got = {}
                    for mode in order:
                        got[mode] = await reload(g, token, cursor, mode == "compact")
                        rounds[mode].append(got[mode])
                        pages[mode].append(await history(g, token, cursor, mode == "compact"))
                    same_text = same_text and got["full"]["text"] == got["compact"]["text"]
        finally:
            await platform.close()
    summary: dict[str, Any] = {"deltas": args.deltas, "rounds": args.rounds, "same_text": same_text}
    for mode in MODES:
        summary[mode] = {
            "frames": statistics.median(x["frames"] for x in rounds[mode]),
            "bytes": statistics.median(x["bytes"] for x in rounds[mode]),
            "render_ms": statistics.median(x["render_s"] for x in rounds[mode]) * 1000,
            "history_items": statistics.median(x["items"] for x in pages[mode]),
            "history_bytes": statistics.median(x["bytes"] for x in pages[mode]),
            "history_ms": statistics.median(x["s"] for x in pages[mode]) * 1000,
        }
    return summary


def print_report(s: dict[str, Any]) -> None:
    n = s["deltas"]
    print(f"\nReload mid-answer: reasoning {n // 4} deltas, tool arguments {n // 10}, answer {n} deltas "
          f"(in flight); medians of {s['rounds']} rounds; same rendered text in both modes: {s['same_text']}\n")
    rows = [("event frames (WebSocket)", "frames", "{:.0f}"), ("bytes received (WebSocket)", "bytes", "{:,.0f}"),
            ("time to complete render (ms)", "render_ms", "{:.1f}"), ("history items", "history_items", "{:.0f}"),
            ("history response bytes", "history_bytes", "{:,.0f}"), ("history response (ms)", "history_ms", "{:.1f}")]
    print(f"{'':32} {'full':>12} {'compact':>12} {'compact/full':>13}")
    for name, key, fmt in rows:
        full, comp = s["full"][key], s["compact"][key]
        ratio = comp / full if full else float("nan")
        print(f"{name:32} {fmt.format(full):>12} {fmt.format(comp):>12} {ratio:>13.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="300 deltas, 2 rounds (smoke test)")
    p.add_argument("--deltas", type=int, default=2000, help="deltas of the answer")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", dest="json_out", type=Path)
    a = p.parse_args(argv)
    if a.quick:
        a.deltas, a.rounds = 300, 2
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    print_report(summary)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
