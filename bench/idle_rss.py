"""Base RSS of `wsgateway serve`: VmRSS (/proc/<pid>/status) of an idle gateway right after readiness,
with the recent window (gateway/core/window.py) empty, then full.

Each round starts a fresh gateway per tree, in alternating order, on one nats-server: first on a fresh
stream (the window starts empty), then once more after `--fill` events were published (the gateway
reads the newest of them back into its window at start; measured once its log says so). No clients are
connected: the figure is what the process costs before the first connection (bench/fanout.py reports
the base after 8 warm-up connections and the cost per connection).

    .venv/bin/python bench/idle_rss.py                            # the working tree, 3 rounds
    .venv/bin/python bench/idle_rss.py --baseline 0ef11f7         # ... and gateway/ of a revision, side by side
    .venv/bin/python bench/idle_rss.py --rounds 1 --fill 2000     # smoke test (tests/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import fanout  # noqa: E402

from gateway.devtools.natsproc import NatsProcess  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile")
FILLED = "read back from the stream"  # the bus's log line once the window holds the stream's newest events


def status_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in f) if k in FIELDS}


async def fill(url: str, n: int, size: int) -> None:
    """n events of about `size` bytes of data, over 50 scopes of the bench tenant."""
    import nats

    from gateway.sdk.publisher import Publisher

    nc = await nats.connect(url, name="bench-idle-rss")
    try:
        pub = Publisher(nc.jetstream())
        pad = "x" * size
        for i in range(0, n, 500):
            await asyncio.gather(*(pub.publish(tenant="bench", scope=f"conversation:c{j % 50}", type="bench.tick",
                                               data={"pad": pad, "i": j}) for j in range(i, min(n, i + 500))))
    finally:
        await nc.close()


def measure(tree: str, env: dict[str, str], nats: NatsProcess, jwks: fanout.Jwks, tmp: Path, full: bool,
            settle: float) -> dict[str, int]:
    server = fanout.Server("gateway", nats.url, jwks, tmp, {**env, "WSGATEWAY_LOG_LEVEL": "info"})
    try:
        server.wait_ready(60)
        deadline = time.monotonic() + 120
        while full and FILLED not in server.logfile.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tree}: the window was not filled:\n{server.log_tail()}")
            time.sleep(0.2)
        time.sleep(settle)
        return status_kib(server.pid)
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", default=None, metavar="REV", help="also measure gateway/ of this git revision")
    p.add_argument("--fill", type=int, default=30000, help="events published before the window-full round")
    p.add_argument("--event-bytes", type=int, default=300, help="data bytes per published event")
    p.add_argument("--settle", type=float, default=1.0, help="pause before each reading, seconds")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the readings (KiB) to this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wsgw-idle-rss-") as d:
        tmp = Path(d)
        trees: dict[str, dict[str, str]] = {}
        code = fanout.snapshot_gateway(tmp / "src")
        trees[f"gateway {code['describe']}"] = {"PYTHONPATH": code["path"]}
        if args.baseline:
            base = fanout.snapshot_revision(args.baseline, tmp / "baseline")
            trees[f"baseline {base['describe']}"] = {"PYTHONPATH": base["path"]}
        nats = NatsProcess(store_dir=tmp / "nats")
        nats.start()
        jwks = fanout.Jwks()
        results: dict[tuple[str, bool], list[dict[str, int]]] = {}
        try:
            asyncio.run(fanout.seed_nats(nats.url))
            for full in (False, True):
                if full:
                    t0 = time.monotonic()
                    asyncio.run(fill(nats.url, args.fill, args.event_bytes))
                    fanout.log(f"published {args.fill} events in {time.monotonic() - t0:.1f}s")
                for r in range(args.rounds):
                    order = list(trees) if r % 2 == 0 else list(reversed(trees))
                    for tree in order:
                        got = measure(tree, trees[tree], nats, jwks, tmp, full, args.settle)
                        results.setdefault((tree, full), []).append(got)
                        fanout.log(f"{tree}, window {'full' if full else 'empty'}, round {r + 1}: "
                                   + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in got.items()))
        finally:
            jwks.close()
            nats.stop()
    if args.json:
        summary = {f"{tree}, window {'full' if full else 'empty'}": {
            "median_kib": {k: statistics.median(x[k] for x in runs) for k in FIELDS}, "rounds_kib": runs}
            for (tree, full), runs in results.items()}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nIdle `wsgateway serve` right after readiness, medians of {args.rounds} rounds (MiB):")
    print(f"{'tree':32} {'window':7} " + " ".join(f"{k:>8}" for k in FIELDS) + "   VmRSS per round")
    for (tree, full), runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) / 1024 for k in FIELDS}
        print(f"{tree:32} {'full' if full else 'empty':7} " + " ".join(f"{med[k]:8.1f}" for k in FIELDS)
              + "   " + " / ".join(f"{x['VmRSS'] / 1024:.1f}" for x in runs))


if __name__ == "__main__":
    sys.exit(main())
