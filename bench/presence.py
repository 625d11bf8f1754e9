"""Presence under a reconnect burst: CPU and frames when a pod's clients all reconnect at once, in-process.

No sockets, no NATS: a hub (gateway/core/hub.py with its `Presence`) with C connections on channels whose
write does nothing. Every client watches one of S scopes (C/S watchers each) and one scope they all share
(C watchers), all with `presence: true`. Then the burst: every client drops and reconnects (leave, join,
snapshot), spread over `--spread` flush intervals (1: all within one interval, the worst case). Half the
clients come back on this instance, the other half on "another instance", whose growing entries arrive
through the same decode-and-merge path the presence bucket's watch uses (`Entry.encode` / `decode`,
`Presence.apply`), once per scope and flush, as the other instance would write them. A second scenario,
`join`, connects every client to an empty cluster (a new deployment's clients arriving at once).

Reported per run: presence frames queued to clients (deltas and snapshots) against what one frame per
join/leave to every watcher would have cost (the uncoalesced count, computed for the same burst), the
CPU time of the burst (subscriptions, flushes, merges), and the bucket writes this instance made.

    .venv/bin/python bench/presence.py                    # 5,000 clients, 100 scopes, 3 runs, medians
    .venv/bin/python bench/presence.py --quick            # 500 clients, 10 scopes, 1 run (smoke test)
    .venv/bin/python bench/presence.py --spread 8 --json bench/results/presence.json
    .venv/bin/python bench/presence.py --kill --kill-ttl 15    # real processes: SIGKILL to the watchers' leave

`--kill` measures the other promise, with real processes (nats-server, two `wsgateway serve`, the tests'
identity provider): the time from SIGKILLing the instance a watcher's peer is on to the `presence` delta
in which that peer leaves, against the documented bound of 4/3 of WSGATEWAY_PRESENCE_TTL_S.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import Settings  # noqa: E402
from gateway.core.connection import Connection  # noqa: E402
from gateway.core.hub import Hub  # noqa: E402
from gateway.core.presence import Entry, Member  # noqa: E402
from gateway.core.queue import OutFrame  # noqa: E402
from gateway.devtools.natsproc import NatsProcess  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.permissions import AclStore  # noqa: E402
from gateway.principal import Principal  # noqa: E402

OTHER = "f" * 32  # the other instance's id


class Flag:
    on = True


class Channel:
    """A channel whose writes go nowhere (the cost of the sockets is not what this measures)."""

    kind = "websocket"
    frames_are_wire = True

    def __init__(self) -> None:
        self.on_writable: Callable[[], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_shutdown: Callable[[], None] | None = None
        self.flag = Flag()

    @property
    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> bool:
        return True

    def fast_path(self) -> tuple[Callable[[bytes], object], Any]:
        return self.write, self.flag

    def encode(self, frames: Sequence[OutFrame]) -> bytes:
        return b"".join([f.data for f in frames])

    def close(self, code: int, reason: str = "") -> None:
        pass

    def limit_kernel_buffer(self, size: int) -> None:
        pass


def scopes_of(i: int, scopes: int) -> list[str]:
    return ["conversation:shared", f"conversation:s{i % scopes}"]


def uncoalesced(clients: int, scopes: int, scenario: str) -> int:
    """Frames of one presence frame per join and per leave to every other watcher, for the same burst:
    each client leaves (C-1, C-2, ... others remain) and then joins again (0, 1, ... others there); `join`:
    the joins only."""
    total = 0
    sizes = {"conversation:shared": clients} | {f"conversation:s{j}": 0 for j in range(scopes)}
    for i in range(clients):
        sizes[f"conversation:s{i % scopes}"] += 1
    for size in sizes.values():
        total += (2 if scenario == "reconnect" else 1) * (size * (size - 1) // 2)
    return total


async def run_once(clients: int, scopes: int, spread: int, flush_ms: float, cap: int, scenario: str) -> dict[str, Any]:
    """One burst. `reconnect`: every client drops and comes back one flush interval later (half on the other
    instance); `join`: every client connects to an empty cluster (half of them to the other instance)."""
    settings = Settings(jwks_url="http://127.0.0.1:9/jwks", presence_flush_ms=flush_ms, presence_max_members=cap,
                        max_subscriptions=4)
    acl = AclStore()
    acl.apply("t.org", orjson.dumps({"admins": [f"user:u{i}" for i in range(clients)]}))
    metrics = Metrics()
    hub = Hub(settings, metrics, acl)
    presence = hub.presence
    writes = [0]

    def publish(key: object, raw: bytes | None) -> None:
        writes[0] += 1

    presence.publish = publish
    principals = [Principal(subject=f"u{i}", tenant="t", expires_at=4e9, display_name=f"User {i}")
                  for i in range(clients)]
    moved = set(range(clients // 2, clients))  # these come back on (or join) the other instance
    remote: dict[str, dict[str, tuple[Member, int]]] = {}
    conns: dict[int, Connection] = {}

    def join(i: int) -> None:
        if i in moved and (scenario == "join" or i in conns):
            for scope in scopes_of(i, scopes):
                remote.setdefault(scope, {})[principals[i].name] = (Member(f"User {i}", None), 1)
            conns.pop(i, None)
            return
        conn = conns[i] = hub.open(Channel(), principals[i], f"c{i}-{time.perf_counter_ns()}")
        for scope in scopes_of(i, scopes):
            hub.subscribe(conn, None, scope)
            presence.watch(conn, scope, listed=True, frames=True)

    def remote_entries(now: float) -> None:
        for scope, members in remote.items():
            raw = Entry(dict(members)).encode()  # what the other instance writes (once per flush) ...
            presence.apply(OTHER, ("t", scope), Entry.decode(raw), now)  # ... and what the watch here applies

    if scenario == "reconnect":
        for i in range(clients):
            join(i)
        presence.flush()
        hub.writer.flush()
    snaps0 = metrics.presence_snapshots._value.get()
    frames = 0
    writes0 = writes[0]
    groups = [list(range(clients))[g::spread] for g in range(spread)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(spread + 1):
        if scenario == "reconnect" and step < spread:
            for i in groups[step]:
                conn = conns.get(i)
                if conn is not None:
                    hub.remove(conn)  # the pod's connections drop ...
        back = step - 1 if scenario == "reconnect" else step
        if 0 <= back < spread:
            for i in groups[back]:  # ... and come back an interval later, here or on the other instance
                join(i)
        remote_entries(time.monotonic())
        frames += presence.flush()
        hub.writer.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    snapshots = int(metrics.presence_snapshots._value.get() - snaps0)
    state = presence.state(("t", "conversation:shared"))
    assert state.total == clients, (state.total, clients)  # the end state is exact
    return {
        "scenario": scenario, "clients": clients, "scopes": scopes, "spread": spread, "deltas": frames,
        "snapshots": snapshots, "frames": frames + snapshots, "uncoalesced": uncoalesced(clients, scopes, scenario),
        "cpu_ms": round(cpu * 1000, 1), "wall_ms": round(wall * 1000, 1),
        "cpu_us_per_client": round(cpu * 1e6 / clients, 1), "kv_writes": writes[0] - writes0,
    }


async def kill_to_leave(ttl: float, runs: int) -> list[float]:
    """Seconds from SIGKILL of bob's instance to the delta in which alice (on the other instance) sees him leave."""
    sys.path.insert(0, str(ROOT))
    from tests.support.idp import TestIdP
    from tests.support.platform import Platform
    from tests.support.procs import gateway_processes
    from tests.support.wsclient import connect, recv, recv_type, welcome

    figures: list[float] = []
    with TestIdP() as idp, NatsProcess() as natsd:
        platform = await Platform.connect(natsd.url)
        await platform.grant("acme.org", {"admins": ["user:alice", "user:bob"]})
        await platform.close()
        for _ in range(runs):
            env: dict[str, Any] = {"presence_ttl_s": str(ttl), "presence_flush_ms": "50"}
            async with gateway_processes(2, natsd.url, idp.issuer, idp.audience, **env) as (a, b):
                alice = await connect(a.ws, idp.mint("alice"))
                await welcome(alice)
                await alice.send(json.dumps({"op": "subscribe", "scope": "conversation:c1", "presence": True}))
                await recv_type(alice, "subscribed")
                bob = await connect(b.ws, idp.mint("bob"))
                await welcome(bob)
                await bob.send(json.dumps({"op": "subscribe", "scope": "conversation:c1"}))
                while "user:bob" not in [m["id"] for m in (await recv(alice)).get("joined", [])]:
                    pass
                t0 = time.monotonic()
                b.kill()
                while "user:bob" not in (await recv(alice, timeout=ttl * 3 + 30)).get("left", []):
                    pass
                figures.append(time.monotonic() - t0)
                await alice.close()
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--scopes", type=int, default=100, help="scopes besides the shared one")
    p.add_argument("--spread", type=int, default=1, help="flush intervals the burst is spread over")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--flush-ms", type=float, default=250)
    p.add_argument("--cap", type=int, default=100, help="WSGATEWAY_PRESENCE_MAX_MEMBERS")
    p.add_argument("--quick", action="store_true", help="500 clients, 10 scopes, 1 run")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--kill", action="store_true", help="measure SIGKILL-to-leave with real processes instead")
    p.add_argument("--kill-ttl", type=float, default=15.0, help="WSGATEWAY_PRESENCE_TTL_S of the --kill runs")
    args = p.parse_args()
    if args.kill:
        runs = 1 if args.quick else args.runs
        figures = asyncio.run(kill_to_leave(args.kill_ttl, runs))
        print(f"SIGKILL to the watchers' leave delta, WSGATEWAY_PRESENCE_TTL_S={args.kill_ttl:g} "
              f"(documented bound {args.kill_ttl * 4 / 3:.1f} s, plus the flush interval):")
        print(f"  median {statistics.median(figures):.2f} s, max {max(figures):.2f} s; runs: "
              + " ".join(f"{f:.2f}" for f in figures))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"kill_ttl_s": args.kill_ttl, "seconds": figures}, indent=2))
        return 0
    if args.quick:
        args.clients, args.scopes, args.runs = 500, 10, 1
    keys = ("frames", "deltas", "snapshots", "uncoalesced", "cpu_ms", "cpu_us_per_client", "kv_writes")
    print(f"presence bursts: {args.clients} clients, each on 1 of {args.scopes} scopes and on 1 shared scope, all "
          f"with presence: true, half of them on another instance; spread over {args.spread} flush interval(s) of "
          f"{args.flush_ms:g} ms; median of {args.runs} run(s)\n")
    print(f"  {'scenario':10s} {'frames':>10s} {'deltas':>9s} {'snapshots':>9s} {'uncoalesced':>12s} "
          f"{'CPU ms':>8s} {'µs/client':>9s} {'KV writes':>9s}  runs (frames / CPU ms)")
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    for scenario in ("reconnect", "join"):
        results = [asyncio.run(run_once(args.clients, args.scopes, args.spread, args.flush_ms, args.cap, scenario))
                   for _ in range(args.runs)]
        m = {k: statistics.median(r[k] for r in results) for k in keys}
        runs = " ".join(f"{r['frames']}/{r['cpu_ms']}" for r in results)
        print(f"  {scenario:10s} {m['frames']:>10,.0f} {m['deltas']:>9,.0f} {m['snapshots']:>9,.0f} "
              f"{m['uncoalesced']:>12,.0f} {m['cpu_ms']:>8,.1f} {m['cpu_us_per_client']:>9,.1f} "
              f"{m['kv_writes']:>9,.0f}  {runs}")
        report[scenario] = {"runs": results, "median": m}
    print("\n  reconnect: every client drops and is back one interval later (half here, half on the other instance);"
          "\n  join: every client connects to an empty cluster; uncoalesced: one frame per join/leave per watcher")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
