"""permessage-deflate's cost and gain per delivery, in-process: the hub's dispatch + flush with every connection
compressing against none, and the bytes each delivery puts on the wire.

No sockets, no NATS (like bench/hotpath.py): a hub with N connections on channels whose write only counts
bytes, S scopes of N/S subscribers, events dispatched ten at a time and flushed after each batch. With
`compressing`, every channel negotiated permessage-deflate: each event is compressed once (the
gateway's `Deflater`) and its compressed frame goes to all N/S subscribers. The kernel's send, which
`bench/fanout.py` includes, is not measured here (the load client, bench/wsload.c, does not inflate).

    .venv/bin/python bench/deflate.py                      # 5000 connections, 100 per scope, 300-byte text events
    .venv/bin/python bench/deflate.py --payload padded     # bench/pubload.py's envelope (its "x" padding)

Prints per mode: ns per delivery (best of `--repeat` passes per round, median over alternating rounds),
bytes per delivery on the wire, and the compression itself in µs per event.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bench.pubload import WORDS, make_event
from gateway.config import Settings
from gateway.core.channel import websocket_encode
from gateway.core.hub import Hub
from gateway.core.queue import OutFrame
from gateway.edge.deflate import Deflater
from gateway.events import Envelope, parse_event
from gateway.metrics import Metrics
from gateway.permissions import AclStore
from gateway.principal import Principal


class Flag:
    on = True


class CountingChannel:
    """A WebSocket channel that writes nothing and counts the bytes it was given."""

    kind = "websocket"
    writable = True

    def __init__(self, deflater: Deflater | None) -> None:
        self.on_writable = self.on_lost = self.on_shutdown = None
        self.flag = Flag()
        self.nbytes = 0
        self.frames_are_wire = deflater is None
        self.encode = websocket_encode if deflater is None else deflater.encode

    def write(self, data: bytes) -> bool:
        self.nbytes += len(data)
        return True

    def fast_path(self) -> tuple[Any, Flag]:
        return self.write, self.flag

    def close(self, code: int, reason: str = "") -> None:
        pass


def text_event(j: int, size: int) -> bytes:
    rnd = random.Random(j)
    head = {"id": f"01J{j:023d}", "type": "run.message.delta", "tenant": "t", "scope": f"conversation:s{j}",
            "time": "2026-01-01T00:00:00Z", "run_id": f"run-{j}", "data": {"message_id": "m1", "delta": ""}}
    words: list[str] = []
    while len(orjson.dumps(head)) + len(" ".join(words)) < size:
        words.append(rnd.choice(WORDS))
    head["data"]["delta"] = " ".join(words)  # type: ignore[index]
    return orjson.dumps(head)


def events(kind: str, scopes: int, size: int) -> list[tuple[Envelope, bytes]]:
    out = []
    for j in range(scopes):
        if kind == "padded":
            _, raw = make_event(time.time(), f"e{j}", j, size)
            raw = raw.replace(b'"scope":"conversation:c%d"' % j, b'"scope":"conversation:s%d"' % j)
            raw = raw.replace(b'"tenant":"bench"', b'"tenant":"t"')
        else:
            raw = text_event(j, size)
        out.append((parse_event(raw, f"events.t.conversation.s{j}"), raw))
    return out


def measure(compressing: bool, args: argparse.Namespace, evs: list[tuple[Envelope, bytes]]) -> tuple[float, float]:
    """(ns per delivery, bytes per delivery)"""
    acl = AclStore()
    acl.apply("t.org", orjson.dumps({"admins": ["user:u"]}))
    metrics = Metrics()
    hub = Hub(Settings(jwks_url="http://127.0.0.1:9/jwks"), metrics, acl)
    deflater = Deflater(metrics.frames_compressed.inc) if compressing else None
    principal = Principal(subject="u", tenant="t", expires_at=4e9)
    channels = []
    for i in range(args.connections):
        ch = CountingChannel(deflater)
        channels.append(ch)
        conn = hub.open(ch, principal, f"c{i}")  # type: ignore[arg-type]
        hub.index.add(conn, f"conversation:s{i % args.scopes}")
    seq, best, delivered = 0, float("inf"), 0
    for _ in range(args.repeat):
        t0, n = time.perf_counter(), 0
        for k in range(args.flushes):
            start = (k * args.batch) % args.scopes
            for env, raw in evs[start:start + args.batch]:
                seq += 1
                n += hub.dispatch(seq, env, raw)
            hub.writer.flush()
        best = min(best, (time.perf_counter() - t0) / n)
        delivered += n
    return best * 1e9, sum(ch.nbytes for ch in channels) / delivered


def compress_cost(evs: list[tuple[Envelope, bytes]], rounds: int = 2000) -> tuple[float, float, float]:
    """(µs per compressed event, plain frame bytes, compressed frame bytes), averaged over the events."""
    from gateway.protocol import event_payload

    deflater = Deflater(lambda n: None)
    frames = [OutFrame(event_payload(i + 1, raw), i + 1) for i, (_, raw) in enumerate(evs)]
    t0 = time.perf_counter()
    for _ in range(rounds):
        for f in frames:
            f.deflated = None
            deflater.frame(f)
    per = (time.perf_counter() - t0) / (rounds * len(frames))
    return (per * 1e6, statistics.mean(len(f.data) for f in frames),
            statistics.mean(len(f.deflated or b"") for f in frames))


async def run(args: argparse.Namespace) -> int:
    evs = events(args.payload, args.scopes, args.size)
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "compressing": []}
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        for compressing in order:
            results["compressing" if compressing else "plain"].append(measure(compressing, args, evs))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.0f} ns" for k, v in results.items()), flush=True)
    us, plain_b, z_b = compress_cost(evs)
    print(f"\n{args.connections} connections, {args.connections // args.scopes} per scope, {args.payload} events of "
          f"{args.size} bytes, {args.batch} per flush; median of {args.rounds} rounds")
    print(f"  {'':12s} {'ns/delivery':>12s} {'bytes/delivery':>15s}")
    for name, v in results.items():
        print(f"  {name:12s} {statistics.median(x[0] for x in v):12.1f} {statistics.median(x[1] for x in v):15.1f}"
              f"   (rounds: {' '.join(f'{x[0]:.0f}' for x in v)})")
    print(f"  compression: {us:.2f} µs per event (once, for all its recipients); frame {plain_b:.0f} -> {z_b:.0f} "
          f"bytes ({z_b / plain_b:.2f}x)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    p.add_argument("--repeat", type=int, default=5, help="passes per round; the best counts")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--scopes", type=int, default=50, help="scopes (connections / scopes subscribers each)")
    p.add_argument("--batch", type=int, default=10, help="events per flush")
    p.add_argument("--flushes", type=int, default=200, help="flushes per pass")
    p.add_argument("--size", type=int, default=300, help="envelope bytes")
    p.add_argument("--payload", choices=("text", "padded"), default="text",
                   help="text: an agent's message delta in words; padded: bench/pubload.py's envelope")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
