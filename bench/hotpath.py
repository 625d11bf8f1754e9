"""The Python part of fan-out alone: nanoseconds per delivery for dispatch + flush, in-process.

No sockets, no NATS: a hub with N connections on channels whose write does nothing (a builtin, `len`: a C
call like uvloop's `transport.write`), S scopes of N/S
subscribers, 300-byte events dispatched ten at a time and flushed after each batch (so every connection
gets about one event per write, as at the benchmark's target rates). What it measures is what the data
path's code costs per delivery on top of the kernel's send; `bench/fanout.py` measures the whole server.

    .venv/bin/python bench/hotpath.py                        # the working tree
    .venv/bin/python bench/hotpath.py --baseline b2dc77e     # ... and gateway/ of a revision, alternating
    .venv/bin/python bench/hotpath.py --baseline 62e2018 --instructions --flushes 20   # valgrind: instructions

Prints the best of `--repeat` passes per round (the least disturbed), per tree, and the median over the
rounds. Understands the hub of before issue 10 (Connection(hub, channel, ...), hub.add, hub.flush) and
after it (hub.open, hub.writer.flush).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from benchutil import build_fastpath  # noqa: E402

PROBE = r'''
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
import orjson
from gateway.config import Settings
from gateway.core.hub import Hub
from gateway.events import parse_event
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.principal import Principal

N, SCOPES, BATCH, FLUSHES, REPEAT = (int(a) for a in sys.argv[2:7])


class Flag:
    on = True


class Channel:
    kind = "websocket"
    frames_are_wire = True
    writable = True

    def __init__(self):
        self.on_writable = self.on_lost = self.on_shutdown = None
        self.flag = Flag()

    # a builtin that does nothing with the bytes: a C call, as uvloop's transport.write is (the gateway's
    # own per-delivery code is what is measured, not a Python stand-in for the transport)
    write = staticmethod(len)

    def fast_path(self):
        return self.write, self.flag

    @staticmethod
    def encode(frames):
        return b"".join([f.data for f in frames])

    def close(self, code, reason=""):
        pass


async def main():
    acl = AclStore()
    acl.apply("t.org", orjson.dumps({"admins": ["user:u"]}))
    hub = Hub(Settings(jwks_url="http://127.0.0.1:9/jwks"), Metrics(), acl)
    principal = Principal(subject="u", tenant="t", expires_at=4e9)
    new = hasattr(hub, "open")
    for i in range(N):
        if new:
            conn = hub.open(Channel(), principal, f"c{i}")
            hub.index.add(conn, f"conversation:s{i % SCOPES}")
        else:
            from gateway.core.hub import Connection
            conn = Connection(hub, Channel(), principal, f"c{i}")
            hub.add(conn)
            hub.add_subscription(conn, f"conversation:s{i % SCOPES}")
    flush = hub.writer.flush if new else hub.flush
    events = []
    for j in range(SCOPES):
        raw = orjson.dumps({"id": f"e{j}", "type": "bench.tick", "tenant": "t", "scope": f"conversation:s{j}",
                            "time": "2026-01-01T00:00:00Z", "data": {"text": "x" * 200}})
        events.append((parse_event(raw, f"events.t.conversation.s{j}"), raw))
    seq, best = 0, float("inf")
    for _ in range(REPEAT):
        t0, n = time.perf_counter(), 0
        for k in range(FLUSHES):
            start = (k * BATCH) % SCOPES
            for env, raw in events[start:start + BATCH]:
                seq += 1
                n += hub.dispatch(seq, env, raw)
            flush()
        best = min(best, (time.perf_counter() - t0) / max(n, 1))
    print(f"{best * 1e9:.1f} {n}")


asyncio.run(main())
'''


def probe(tree: Path, args: argparse.Namespace, flushes: int, repeat: int, prefix: list[str]) -> tuple[str, str]:
    out = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE, str(tree), str(args.connections), str(args.scopes), str(args.batch),
         str(flushes), str(repeat)],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict and set layouts in every run
    )
    return out.stdout.strip().splitlines()[-1], out.stderr


def measure(tree: Path, args: argparse.Namespace) -> float:
    return float(probe(tree, args, args.flushes, args.repeat, [])[0].split()[0])


def instructions(tree: Path, args: argparse.Namespace) -> float:
    """Instructions per delivery under valgrind (callgrind): a run with `--flushes` minus one without (the
    set-up), divided by the deliveries. Repeatable whatever else runs on the machine."""
    counts = []
    deliveries = 0
    for flushes in (args.flushes, 0):
        line, err = probe(tree, args, flushes, 1, ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"])
        found = re.search(r"Collected : (\d+)", err)
        if found is None:
            raise RuntimeError(f"no instruction count from valgrind:\n{err[-2000:]}")
        counts.append(int(found.group(1)))
        deliveries = deliveries or int(line.split()[1])
    return (counts[0] - counts[1]) / deliveries


def print_instructions(counts: dict[str, float], args: argparse.Namespace) -> int:
    print(f"\ninstructions per delivery (dispatch + flush, valgrind callgrind), {args.connections} connections, "
          f"{args.connections // args.scopes} per scope, {args.batch} events per flush, {args.flushes} flushes")
    for name, v in counts.items():
        print(f"  {name:24s} {v:9.0f}")
    if len(counts) == 2:
        a, b = counts.values()
        print(f"  ratio working tree / baseline: {a / b:.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=None, metavar="REV", help="also measure gateway/ of this git revision")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    p.add_argument("--repeat", type=int, default=5, help="passes per round; the best counts")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--scopes", type=int, default=50, help="scopes (connections / scopes subscribers each)")
    p.add_argument("--batch", type=int, default=10, help="events per flush")
    p.add_argument("--flushes", type=int, default=200, help="flushes per pass")
    p.add_argument("--instructions", action="store_true",
                   help="instead: instructions per delivery under valgrind --tool=callgrind, once per tree "
                        "(repeatable on a busy machine; slow: use --flushes 20)")
    args = p.parse_args()
    trees: dict[str, Path] = {"working tree": ROOT}
    with tempfile.TemporaryDirectory(prefix="wsgw-hotpath-") as tmp:
        if args.baseline:
            dest = Path(tmp) / "baseline"
            dest.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "gateway"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
            build_fastpath(dest)  # a revision with the compiled loops: built, as its install would
            trees[f"baseline {args.baseline}"] = dest
        if args.instructions:
            return print_instructions({name: instructions(tree, args) for name, tree in trees.items()}, args)
        results: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                results[name].append(measure(tree, args))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f} ns" for n, v in results.items()), flush=True)
    print(f"\nns per delivery (dispatch + flush), {args.connections} connections, "
          f"{args.connections // args.scopes} per scope, {args.batch} events per flush; median of {args.rounds} rounds")
    medians = {name: statistics.median(v) for name, v in results.items()}
    for name, m in medians.items():
        print(f"  {name:24s} {m:7.1f}   (rounds: {' '.join(f'{x:.0f}' for x in results[name])})")
    if len(medians) == 2:
        a, b = medians.values()
        print(f"  ratio working tree / baseline: {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
