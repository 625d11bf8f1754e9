"""A reload in the middle of a long answer: what it costs to catch up on `GET /v1/agui` (the snapshot prelude)
beside `GET /v1/sse?since=0` (a replay of every event of the scope), side by side.

    .venv/bin/python bench/agui_join.py                  # 2,000-delta answer after 20 messages, 5 runs (~10 s)
    .venv/bin/python bench/agui_join.py --quick          # 200 deltas, 2 runs (smoke test)
    .venv/bin/python bench/agui_join.py --deltas 10000 --runs 5 --json bench/results/agui_join.json

The scope holds a conversation (`--messages` stored messages) and a run whose message is still streaming
(`--deltas` deltas of `--delta-bytes` characters); other scopes hold as many events again (noise the
gateway's reads filter out). Per run and endpoint: the time from sending the request until the client has
everything it needs to render the answer so far (AG-UI: the prelude's last event, the one with `id:`;
SSE: the scope's last event), and the frames and bytes it took. Medians over `--runs`. What runs: as in
bench/resilience.py, a private nats-server, the test identity provider and an in-process gateway, with the
client in the same event loop on this shared machine: compare runs made side by side.
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

os.environ.setdefault("WSGATEWAY_GC_GEN0_THRESHOLD", "0")  # an in-process gateway must not gc.freeze()

import httpx  # noqa: E402

from gateway.devtools.natsproc import NatsProcess  # noqa: E402
from tests.support.gateway import run_gateway  # noqa: E402
from tests.support.idp import TestIdP  # noqa: E402
from tests.support.platform import Platform  # noqa: E402

SCOPE = "conversation:long"


async def _fill(platform: Platform, messages: int, deltas: int, delta_bytes: int) -> int:
    """The scope's history and an answer in progress; returns the last sequence of the scope."""
    where: dict[str, Any] = {"run_id": "run-1"}
    for i in range(messages):
        await platform.publish("acme", SCOPE, type="conversation.message.created",
                               data={"message_id": f"m-{i}", "role": "user" if i % 2 == 0 else "assistant",
                                     "content": f"message {i} " * 8})
    await platform.publish("acme", SCOPE, type="run.started", data={}, **where)
    await platform.publish("acme", SCOPE, type="run.message.started", data={"message_id": "answer"}, **where)
    chunk = ("x" * (delta_bytes - 1)) + " "
    last = 0
    for i in range(deltas):
        last = await platform.publish("acme", SCOPE, type="run.message.delta",
                                      data={"message_id": "answer", "delta": chunk}, **where)
        await platform.publish("acme", f"conversation:noise-{i % 10}", type="run.message.delta",
                               data={"message_id": "n", "delta": chunk}, **where)
    return last


async def _measure(c: httpx.AsyncClient, path: str, params: dict[str, str], done: Any) -> dict[str, float]:
    """Request `path`; stop at the first SSE block for which `done(block_text)` holds."""
    t0 = time.perf_counter()
    frames = 0
    nbytes = 0
    buf = b""
    async with c.stream("GET", path, params=params) as r:
        assert r.status_code == 200, r.status_code
        async for chunk in r.aiter_bytes():
            nbytes += len(chunk)
            buf += chunk
            *blocks, buf = buf.split(b"\n\n")
            for block in blocks:
                if b"\ndata: " in b"\n" + block:
                    frames += 1
                if done(block):
                    return {"s": time.perf_counter() - t0, "frames": frames, "bytes": nbytes}
    raise AssertionError(f"{path}: the stream ended first")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"deltas": args.deltas, "messages": args.messages, "delta_bytes": args.delta_bytes,
                               "runs": args.runs, "agui": [], "sse": []}
    with TestIdP() as idp, NatsProcess() as natsd:
        platform = await Platform.connect(natsd.url)
        try:
            await platform.grant("acme.org", {"admins": ["user:alice"]})
            async with run_gateway(natsd.url, idp.issuer, audience=idp.audience,
                                   queue_max_messages=max(10_000, 2 * args.deltas + 100),
                                   queue_max_bytes=512 * 1024 * 1024) as g:
                last = await _fill(platform, args.messages, args.deltas, args.delta_bytes)
                last_id = b"id: %d\n" % last
                headers = {"Authorization": f"Bearer {idp.mint('alice', exp_in=3600)}"}
                async with httpx.AsyncClient(base_url=g.http, headers=headers, timeout=300) as c:
                    for i in range(args.runs):
                        order = ("agui", "sse") if i % 2 == 0 else ("sse", "agui")  # alternate
                        for kind in order:
                            if kind == "agui":
                                fig = await _measure(c, "/v1/agui", {"scope": SCOPE},
                                                     lambda b: b.startswith(b"id: "))
                            else:
                                fig = await _measure(c, "/v1/sse", {"scope": SCOPE, "since": "0"},
                                                     lambda b, want=last_id: b.startswith(want))
                            results[kind].append(fig)
        finally:
            await platform.close()
    for kind in ("agui", "sse"):
        runs = results[kind]
        results[f"{kind}_median"] = {k: statistics.median(r[k] for r in runs) for k in ("s", "frames", "bytes")}
    return results


def report(res: dict[str, Any]) -> None:
    a, s = res["agui_median"], res["sse_median"]
    print(f"reload mid-answer: {res['messages']} stored messages, an answer of {res['deltas']} deltas x "
          f"{res['delta_bytes']} B, medians of {res['runs']} alternating runs")
    print(f"{'':28}{'GET /v1/agui (prelude)':>26}{'GET /v1/sse?since=0':>24}{'ratio':>9}")
    print(f"{'time to render the answer':28}{a['s'] * 1000:>23.1f} ms{s['s'] * 1000:>21.1f} ms"
          f"{a['s'] / s['s']:>9.3f}")
    print(f"{'frames':28}{a['frames']:>26.0f}{s['frames']:>24.0f}{a['frames'] / s['frames']:>9.4f}")
    print(f"{'bytes':28}{a['bytes']:>26.0f}{s['bytes']:>24.0f}{a['bytes'] / s['bytes']:>9.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="200 deltas, 2 runs (smoke test)")
    parser.add_argument("--deltas", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--delta-bytes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.deltas, args.runs = 200, 2
    if args.deltas < 1 or args.runs < 1 or args.messages < 0 or args.delta_bytes < 1:
        parser.error("--deltas, --runs and --delta-bytes must be positive, --messages not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = asyncio.run(run(args))
    report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
