"""Delays under adverse conditions, as figures: the timing half of what the tests check.

    .venv/bin/python bench/resilience.py             # all three scenarios (~30 s)
    .venv/bin/python bench/resilience.py --quick     # smaller (smoke test, ~15 s)
    .venv/bin/python bench/resilience.py --only restart --json bench/results/resilience.json

The tests (tests/test_resume.py, tests/test_faults.py) assert order, completeness and state: every event
arrives, in order, exactly once, the slow client does not stop the fast one, the revocation arrives. How
long things take is measured here, the same way those tests once measured it for their thresholds (the
old threshold is printed beside each figure as a reference; nothing here asserts):

1. `fast`: a fast client beside a stalled one on the same scope (its queue coalesces, then overflows:
   4429), 10,000 lifecycle/delta events: publish-to-receive delay at the fast client (was p99 < 1 s).
2. `replay`: a client replays 20,000 retained 400-byte events while live events go to another client
   on another scope: each live event's publish-to-receive delay while the replay runs (was max < 2 s).
3. `restart`: nats-server restarted (same port, same store) under a connected gateway while events are
   published every 5 ms: when /readyz answers 200 again, and the worst ack-to-receive delay of the events
   acked after that (was < 1 s: it used to wait for nats-py's heartbeat check to re-create the lost
   in-memory consumer); then a second restart and a revocation right after it: ACL write to `revoked`
   frame (was < 2 s: the ACL watch must be re-established with the connection, not after a timeout).

What runs: all in this process and on 127.0.0.1, as in the tests: a private nats-server per scenario
(`NatsProcess`, temp store), the test identity provider (tests/support/idp.py, real keys over HTTP), an
in-process gateway under uvicorn (tests/support/gateway.py `run_gateway`), the platform's Publisher and
`websockets` clients in the same event loop. The figures therefore include the clients' share of the
same loop and of this shared 2-core machine: compare runs made side by side, not with other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
for _path in (str(REPO), str(BENCH_DIR)):  # the tests' real-process helpers, and benchutil
    if _path not in sys.path:
        sys.path.insert(0, _path)

# As in the test suite: an in-process gateway must not gc.freeze() the process it shares with its clients.
os.environ.setdefault("WSGATEWAY_GC_GEN0_THRESHOLD", "0")

import httpx  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
from benchutil import percentile  # noqa: E402
from websockets.asyncio.client import ClientConnection  # noqa: E402

from gateway.devtools.natsproc import NatsProcess  # noqa: E402
from gateway.sdk.publisher import new_event_id  # noqa: E402
from tests.support.gateway import RunningGateway, run_gateway  # noqa: E402
from tests.support.idp import TestIdP  # noqa: E402
from tests.support.platform import Platform  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import start_nats  # noqa: E402
from tests.support.wait import eventually  # noqa: E402
from tests.support.wsclient import connect, connect_stalled, events, recv, recv_type, welcome  # noqa: E402

ADMIN = {"admins": ["user:alice"]}
RETRYABLE = (nats.errors.Error, TimeoutError, OSError)
SCENARIOS = ("fast", "replay", "restart")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def spread(delays: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max (seconds) of `delays`; nan when empty."""
    ordered = sorted(delays)
    return {"n": len(ordered), "p50_s": percentile(ordered, 50), "p99_s": percentile(ordered, 99),
            "max_s": ordered[-1] if ordered else float("nan")}


@dataclass
class Sizes:
    fast_events: int = 10_000
    fast_queue: int = 400
    replay_events: int = 20_000
    restart_before: int = 100  # events delivered before the outage
    restart_after: int = 150  # events acked (and delivered) after /readyz = 200

    @classmethod
    def quick(cls) -> Sizes:
        return cls(fast_events=2_000, fast_queue=100, replay_events=5_000, restart_before=40, restart_after=60)


@dataclass
class Results:
    sizes: dict[str, int]
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- 1. a fast client beside a stalled one -------------------------------------------------------


async def fast_beside_stalled(idp: TestIdP, sizes: Sizes) -> dict[str, Any]:
    with NatsProcess() as natsd:
        platform = await Platform.connect(natsd.url)
        try:
            await platform.grant("acme.org", ADMIN)
            async with run_gateway(natsd.url, idp.issuer, audience=idp.audience,
                                   queue_max_messages=sizes.fast_queue) as g:
                slow = await connect_stalled(f"{g.ws}?scope=conversation:c1", idp.mint("alice"))
                fast = await connect(f"{g.ws}?scope=conversation:c1", idp.mint("alice"))
                await welcome(fast)
                await recv_type(fast, "subscribed")
                delays: list[float] = []
                seqs: list[int] = []
                total = sizes.fast_events

                async def read_fast() -> None:
                    while len(seqs) < total:
                        frame = await recv(fast, 30)
                        seqs.append(int(frame["seq"]))
                        delays.append(time.time() - frame["event"]["data"]["t"])

                reader = asyncio.create_task(read_fast(), name="fast-reader")
                published: list[int] = []
                run = 0
                while len(published) < total:  # runs of started, up to 40 deltas, finished (as the test)
                    kw = {"run_id": f"run{run}"}
                    mid = f"run{run}"
                    run += 1
                    published.append(await platform.publish(
                        "acme", "conversation:c1", type="run.message.started",
                        data={"message_id": mid, "t": time.time()}, **kw))
                    for _ in range(min(40, total - 1 - len(published))):
                        published.append(await platform.publish(
                            "acme", "conversation:c1", type="run.message.delta",
                            data={"message_id": mid, "delta": "abc ", "t": time.time()}, **kw))
                    if len(published) < total:
                        published.append(await platform.publish(
                            "acme", "conversation:c1", type="run.message.finished",
                            data={"message_id": mid, "t": time.time()}, **kw))
                await asyncio.wait_for(reader, 120)
                figure = spread(delays)
                figure.update({
                    "complete_in_order": seqs == published,
                    "slow_closed_4429": await g.metric("wsgateway_slow_client_disconnects_total"),
                    "coalesced": await g.metric("wsgateway_events_coalesced_total"),
                })
                slow.transport.abort()
                await fast.close()
                return figure
        finally:
            await platform.close()


# --- 2. live delivery while another client replays a large backlog ---------------------------------


async def live_during_replay(idp: TestIdP, sizes: Sizes) -> dict[str, Any]:
    with NatsProcess() as natsd:
        platform = await Platform.connect(natsd.url)
        try:
            await platform.grant("acme.org", ADMIN)
            async with run_gateway(natsd.url, idp.issuer, audience=idp.audience) as g:
                body = {"blob": "z" * 400}
                for start in range(0, sizes.replay_events, 1000):  # pipelined chunks
                    n = min(1000, sizes.replay_events - start)
                    await asyncio.gather(*(platform.publish("acme", "conversation:big", data=body)
                                           for _ in range(n)))
                live = await connect(f"{g.ws}?scope=process:live", idp.mint("alice"))
                await welcome(live)
                await recv_type(live, "subscribed")
                replayer = await connect(f"{g.ws}?scope=conversation:big&since=0", idp.mint("alice"))
                await welcome(replayer)
                await recv_type(replayer, "subscribed")
                got = 0

                async def drain_replay() -> None:
                    nonlocal got
                    while got < sizes.replay_events:
                        frame = await recv(replayer, 60)
                        got += frame["type"] == "event"

                task = asyncio.create_task(drain_replay(), name="replay-reader")
                replay_started = time.monotonic()
                delays: list[float] = []
                while got < sizes.replay_events * 3 // 4 and not task.done():
                    t0 = time.monotonic()
                    seq = await platform.publish("acme", "process:live")
                    (frame,) = await events(live, 1, timeout=30)
                    assert frame["seq"] == seq, (frame, seq)
                    if got < sizes.replay_events:
                        delays.append(time.monotonic() - t0)
                    await asyncio.sleep(0.02)  # the live rate: about 40 events/s beside the replay
                await asyncio.wait_for(task, 120)
                figure = spread(delays)
                figure.update({"replay_s": time.monotonic() - replay_started, "replayed": got})
                await live.close()
                await replayer.close()
                return figure
        finally:
            await platform.close()


# --- 3. nats-server restarts under a connected gateway ---------------------------------------------


class Steady:
    """Publishes one event every 5 ms (alternating scopes), retrying a failed publish with the same
    event id until acked; records each ack's time. The gateway's client records each receive time."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.acked: list[int] = []
        self.acked_at: dict[int, float] = {}
        self.failed_attempts = 0
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="steady-publisher")

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            scope = ("conversation:c1", "process:p1")[i % 2]
            event_id = new_event_id()
            while True:
                try:
                    ack = await self.platform.publisher.publish(
                        tenant="acme", scope=scope, type="test.tick", data={"i": i}, event_id=event_id,
                        timeout=0.5)
                    break
                except RETRYABLE:
                    self.failed_attempts += 1
                    await asyncio.sleep(0.05)
            self.acked.append(int(ack.seq))
            self.acked_at[int(ack.seq)] = time.monotonic()
            i += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self.task, 40)


async def readiness(http: str, status: int) -> None:
    async with httpx.AsyncClient(timeout=2) as c:
        async def answered() -> bool:
            return (await c.get(f"{http}/readyz")).status_code == status

        await eventually(answered, what=f"/readyz {status}", interval=0.01, ignore=(httpx.HTTPError,))


async def record(ws: ClientConnection, seqs: list[int], received_at: dict[int, float]) -> None:
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "event":
            seqs.append(int(frame["seq"]))
            received_at[seqs[-1]] = time.monotonic()


async def nats_restarts(idp: TestIdP, sizes: Sizes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wsgw-bench-resilience-") as tmp:
        natsd = NatsProcess(free_port(), Path(tmp) / "nats")
        await start_nats(natsd)
        try:
            nc = await nats.connect(natsd.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                    connect_timeout=2, error_cb=_quiet)
            platform = Platform(nc)
            try:
                async with run_gateway(natsd.url, idp.issuer, audience=idp.audience) as g:
                    return await _restarts(g, idp, platform, natsd, sizes)
            finally:
                await nc.close()
        finally:
            await asyncio.to_thread(natsd.cleanup)


async def _quiet(exc: Exception) -> None:
    """error_cb: connection errors during an outage are expected."""


async def _restarts(
    g: RunningGateway, idp: TestIdP, platform: Platform, natsd: NatsProcess, sizes: Sizes
) -> dict[str, Any]:
    await platform.grant("acme.org", ADMIN)
    await platform.grant("acme.conversation.c9", {"members": ["user:mia"]})
    ws = await connect(f"{g.ws}?scope=conversation:c1&scope=process:p1", idp.mint("alice"))
    await welcome(ws)
    await recv_type(ws, "subscribed")
    await recv_type(ws, "subscribed")
    member = await connect(f"{g.ws}?scope=conversation:c9", idp.mint("mia"))
    await welcome(member)
    await recv_type(member, "subscribed")
    seqs: list[int] = []
    received_at: dict[int, float] = {}
    reader = asyncio.create_task(record(ws, seqs, received_at), name="recorder")
    pub = Steady(platform)
    watch = [reader, pub.task]
    try:
        await eventually(lambda: len(seqs) >= sizes.restart_before, what="events before the outage", watch=watch)
        await asyncio.to_thread(natsd.stop)
        await readiness(g.http, 503)
        failed = pub.failed_attempts
        await eventually(lambda: pub.failed_attempts >= failed + 3, what="failed publishes", watch=watch)
        started = time.monotonic()
        await start_nats(natsd)
        await readiness(g.http, 200)
        ready = time.monotonic()
        after = len(pub.acked)
        await eventually(lambda: len(pub.acked) >= after + sizes.restart_after, what="publishing after the restart",
                         watch=watch)
        await pub.stop()
        await eventually(lambda: bool(seqs) and seqs[-1] >= pub.acked[-1], what="every event delivered",
                         watch=[reader])
        stall = [received_at[s] - t for s, t in pub.acked_at.items() if t >= ready and s in received_at]

        # the second restart: a revocation right after it
        assert g.gateway.bus.nc is not None
        reconnects = g.gateway.bus.nc.stats["reconnects"]
        await asyncio.to_thread(natsd.stop)
        await start_nats(natsd)
        bus_nc = g.gateway.bus.nc
        await eventually(lambda: bus_nc.stats["reconnects"] > reconnects, what="the gateway to reconnect")
        await readiness(g.http, 200)
        t0 = time.monotonic()
        await platform.grant("acme.conversation.c9", {"members": ["user:someone-else"]})
        frame = await recv(member, 30)
        revoked = time.monotonic() - t0
        assert frame == {"type": "revoked", "scope": "conversation:c9"}, frame
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        if not pub.task.done():
            pub.task.cancel()
    await ws.close()
    await member.close()
    return {
        "ready_after_start_s": ready - started,
        "stall": spread(stall),
        "events": len(pub.acked),
        "complete_in_order": seqs == pub.acked,
        "failed_publish_attempts": pub.failed_attempts,
        "revocation_s": revoked,
    }


# --- main ------------------------------------------------------------------------------------------


def report(name: str, figure: dict[str, Any], sizes: Sizes) -> None:
    if name == "fast":
        print(f"fast client beside a stalled one ({sizes.fast_events:,} events, queue {sizes.fast_queue}): "
              f"p50 {ms(figure['p50_s'])}, p99 {ms(figure['p99_s'])}, max {ms(figure['max_s'])} "
              f"[tests once asserted p99 < 1 s]; complete and in order: {figure['complete_in_order']}; "
              f"stalled one closed 4429: {figure['slow_closed_4429']:g}, coalesced {figure['coalesced']:g}")
    elif name == "replay":
        print(f"live delivery during a {figure['replayed']:,}-event replay ({figure['replay_s']:.1f} s): "
              f"{figure['n']} live events, p50 {ms(figure['p50_s'])}, max {ms(figure['max_s'])} "
              f"[tests once asserted max < 2 s]")
    else:
        stall = figure["stall"]
        print(f"nats-server restart: /readyz 200 {figure['ready_after_start_s']:.2f} s after the server started; "
              f"events acked after that: {stall['n']}, worst delay {stall['max_s']:.3f} s, p50 "
              f"{ms(stall['p50_s'])} [tests once asserted worst < 1 s]; {figure['events']} events, complete and "
              f"in order: {figure['complete_in_order']} ({figure['failed_publish_attempts']} failed publish "
              f"attempts retried)")
        print(f"revocation right after a nats-server restart: {figure['revocation_s']:.3f} s from the ACL write "
              f"to the `revoked` frame [tests once asserted < 2 s]")


async def run(args: argparse.Namespace) -> Results:
    sizes = Sizes.quick() if args.quick else Sizes()
    results = Results(sizes=asdict(sizes))
    scenarios = {"fast": fast_beside_stalled, "replay": live_during_replay, "restart": nats_restarts}
    with TestIdP() as idp:
        for name in args.only:
            figure = await scenarios[name](idp, sizes)
            results.figures[name] = figure
            report(name, figure, sizes)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated scenarios out of {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
