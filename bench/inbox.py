"""The inbox's start-up cost: how fast a gateway process builds its request registry from the stream, and
what the registry costs in memory per request.

A gateway reads the retained process events (`<prefix>.*.process.*`) before it consumes live events
(gateway/core/inbox.py, `Inbox.load`), so this is the time a restarted process is not ready for. The
benchmark starts its own nats-server, publishes `--processes` processes of 9 events each (started,
5 progress, input_required, input_received or nothing, completed or nothing) and conversation traffic
the load does not read, then runs the load `--rounds` times into fresh registries and prints the
median, plus tracemalloc's bytes per request held.

    .venv/bin/python bench/inbox.py                  # 5,000 processes (45,000 process events), 3 rounds
    .venv/bin/python bench/inbox.py --processes 500 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import nats
from nats.js.api import StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.history import StreamReader
from gateway.core.inbox import Inbox
from gateway.devtools.natsproc import NatsProcess
from gateway.permissions import AclStore
from gateway.sdk.publisher import Publisher


async def publish(pub: Publisher, processes: int) -> tuple[int, int]:
    """Every process's events, published concurrently in chunks (acknowledged): (last sequence, process events)."""
    last = count = 0

    async def one(i: int) -> None:
        nonlocal last, count
        scope = f"process:p{i}"
        events: list[tuple[str, dict[str, object]]] = [("process.started", {"name": f"p{i}"})]
        events += [("process.progress", {"fraction": k / 5}) for k in range(5)]
        events.append(("process.input_required", {"request_id": f"q{i}", "prompt": "Approve?",
                                                  "assignees": [f"user:u{i % 50}", "group:ops"]}))
        if i % 3:
            events.append(("process.input_received", {"request_id": f"q{i}", "by": "u1", "value": True}))
        if i % 2:
            events.append(("process.completed", {}))
        count += len(events)
        for etype, data in events:
            ack = await pub.publish(tenant=f"t{i % 10}", scope=scope, type=etype, data=data)
            last = max(last, int(ack.seq))
        await pub.publish(tenant=f"t{i % 10}", scope=f"conversation:c{i}", type="test.noise", data={"i": i})

    for start in range(0, processes, 200):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 200, processes))))
    return last, count


async def main(processes: int, rounds: int) -> None:
    with NatsProcess() as natsd:
        nc = await nats.connect(natsd.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"]))
        t0 = time.perf_counter()
        last, events = await publish(Publisher(js), processes)
        print(f"published {processes} processes up to seq {last} in {time.perf_counter() - t0:.1f} s")
        reader = StreamReader(js, "EVENTS")
        times: list[float] = []
        for r in range(rounds):
            registry = Inbox(AclStore())
            t0 = time.perf_counter()
            applied = await registry.load(reader, "events", last)
            times.append(time.perf_counter() - t0)
            print(f"round {r + 1}: {times[-1]:.2f} s, {applied} request events applied")
        # memory: one more load with tracemalloc (slow), after the rounds warmed every cache the load fills
        registry = Inbox(AclStore())
        tracemalloc.start()
        await registry.load(reader, "events", last)
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        held = sum(len(reqs) for procs in registry.requests.values() for reqs in procs.values())
        open_now = sum(len(mine) for mine in registry.open.values())
        print(f"registry: {held} requests ({open_now} open, envelope kept), {size:,} B traced after the load: "
              f"{size / max(held, 1):.0f} B per request")
        await nc.close()
    med = statistics.median(times)
    print(f"\ninbox load, {processes} processes: median {med:.2f} s over {rounds} round(s) "
          f"(rounds: {' '.join(f'{t:.2f}' for t in times)}); {events} process events read, "
          f"about {events / med:,.0f} per second")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.processes, args.rounds))
