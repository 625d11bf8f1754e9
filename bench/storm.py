"""Reconnect storm: instance A is SIGKILLed under load and all its clients resume on instance B.

    .venv/bin/python bench/storm.py                          # 5,000 clients, 50 scopes, 20,000 deliveries/s
    .venv/bin/python bench/storm.py --quick                  # 500 clients, 10 scopes, 2,000/s (smoke test)
    .venv/bin/python bench/storm.py --baseline 62e2018       # the same storm against REV's gateway, then ours
    .venv/bin/python bench/storm.py --json bench/results/storm.json

What runs (all on 127.0.0.1): a private nats-server, the benchmark's JWKS (bench/fanout.py's), two
`wsgateway serve --workers 1` processes A and B, a publisher process (bench/pubload.py) and storm-client
processes (bench/stormload.py). The movers (N clients, `--fanout` per scope) connect to A, the
stayers (`--stayers`, spread over the same scopes) to B; events are published at `--deliveries` per
second to the movers (deliveries / fanout events/s). After `--warm` s, A's process tree is SIGKILLed;
every mover waits 0..`--jitter` s and connects to B with `?scope=...&since=<its last seq>`. Publishing
goes on for `--observe` s after the kill, then the clients have `--drain` s to receive the rest.

Reported per run: the curve of movers live again (the first event published after their new
`subscribed` frame has arrived, so their replay is complete) against seconds after the kill; p50 / p99 /
100 % of live-again and of re-subscribed; lost and doubled events (every mover's received sequences
against the stream's own record of its scope, read back from JetStream after the run); B's p50 / p99 /
max publish-to-receive delay for the stayers in the first 2 s and the first 10 s after the kill; B's
CPU and replay sources (wsgateway_replays_total). Nothing asserts: the targets (issue 13: 100 % live
within 10 s, nothing lost or doubled, stayers' p99 < 100 ms) are printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from array import array
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import pubload  # noqa: E402
import stormload  # noqa: E402
from benchutil import percentile, process_tree, raise_nofile, tree_cpu_seconds  # noqa: E402
from fanout import (  # noqa: E402
    NCPU,
    STREAM,
    Jwks,
    Server,
    check_snapshot_imports,
    host_cpu,
    seed_nats,
    snapshot_gateway,
    snapshot_revision,
)

from gateway.devtools.natsproc import NatsProcess  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
CURVE_S = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 45, 60)


def log(msg: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def expect(pipe: Any, kind: str, timeout: float) -> tuple[Any, ...]:
    if not pipe.poll(timeout):
        raise TimeoutError(f"no {kind!r} from a benchmark child within {timeout}s")
    msg = pipe.recv()
    if msg[0] != kind:
        raise RuntimeError(f"expected {kind!r} from a benchmark child, got {msg[0]!r}")
    return tuple(msg)


async def stream_record(url: str) -> dict[int, list[int]]:
    """Every event in the stream: scope number -> sequences, in order (the truth a client is checked against)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(url, name="bench-storm-record")
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        last = int(info.state.last_seq)
        psub = await js.pull_subscribe("events.bench.>", stream=STREAM, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True))
        out: dict[int, list[int]] = {}
        seen = 0
        while seen < last:
            msgs = await psub.fetch(1000, timeout=5)
            for m in msgs:
                seq = int(m.metadata.sequence.stream)
                seen = max(seen, seq)
                out.setdefault(int(m.subject.rsplit(".c", 1)[1]), []).append(seq)
        await psub.unsubscribe()
        return out
    finally:
        await nc.close()


def scrape(port: int, name: str) -> dict[str, float]:
    """Samples of one metric family of a live gateway: label text -> value."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                out[key[len(name):] or "-"] = float(value)
    return out


def run_storm(a: argparse.Namespace, kind: str, env: dict[str, str], nats_url: str, nats_pid: int, jwks: Jwks,
              tokens: list[str], tmp: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    n, stayers = a.clients, a.stayers
    nscopes = n // a.fanout
    plan = [(i % nscopes, False) for i in range(n)] + [(i % nscopes, True) for i in range(stayers)]
    server_env = {**env, "WSGATEWAY_MAX_CONNECTIONS": str(n + stayers + 100)}
    srv_a = Server("gateway", nats_url, jwks, tmp, server_env)
    srv_b = Server("gateway", nats_url, jwks, tmp, server_env)
    procs: list[Any] = []
    pipes: list[Any] = []
    parent: Any = None
    try:
        srv_a.wait_ready()
        srv_b.wait_ready()
        for i in range(a.procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=stormload.main, args=(child, tokens[i::a.procs], plan[i::a.procs], a.jitter),
                            name=f"bench-storm-{i}", daemon=True)
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        parent, child = ctx.Pipe()
        pub = ctx.Process(target=pubload.main, args=(child, nats_url, STREAM), name="bench-publisher", daemon=True)
        pub.start()
        child.close()
        procs.append(pub)
        for pipe in pipes:
            expect(pipe, "ready", 60)
        expect(parent, "ready", 30)
        t0 = time.monotonic()
        for pipe in pipes:
            pipe.send(("connect", "127.0.0.1", srv_a.port, srv_b.port))
        replies = [expect(pipe, "connected", 600) for pipe in pipes]
        connected = sum(r[1] for r in replies)
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r[2].items():
                errors[k] = errors.get(k, 0) + v
        log(f"{kind}: {connected}/{n + stayers} clients connected in {time.monotonic() - t0:.1f}s"
            + (f"; errors {errors}" if errors else ""))
        rate = a.deliveries / a.fanout  # events/s: each goes to `fanout` movers (and some stayers)
        t_start = time.time() + 0.5
        t_kill = t_start + a.warm
        t_end = t_kill + a.observe
        parent.send(("run", rate, t_start, t_end, nscopes, 0.0, 0.0, 256))
        for pipe in pipes:
            pipe.send(("measure", t_kill, t_kill + 10.0))
            expect(pipe, "measuring", 30)
        time.sleep(max(0.0, t_kill - time.time()))
        victims = process_tree(srv_a.pid)
        ours = [srv_b.pid, nats_pid, pub.pid, *(p.pid for p in procs[:-1])]

        def cpu() -> tuple[float, float, float]:  # B, every process of the benchmark, the whole machine
            busy, _, _ = host_cpu()
            return tree_cpu_seconds(srv_b.pid), sum(tree_cpu_seconds(q) for q in ours), busy / CLK_TCK
        cpu0 = cpu()
        t_kill = time.time()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log(f"{kind}: A (pids {victims}) SIGKILLed; publishing {rate:.0f} events/s for {a.observe:.0f}s more")
        time.sleep(max(0.0, t_kill + 10.0 - time.time()))
        cpu10 = cpu()
        usage = {"b": cpu10[0] - cpu0[0], "bench": cpu10[1] - cpu0[1], "host": cpu10[2] - cpu0[2]}
        usage["other"] = max(0.0, usage["host"] - usage["bench"])  # CPU-s of processes outside the benchmark
        published = expect(parent, "published", a.observe + 60)
        time.sleep(a.drain)
        sources = scrape(srv_b.port, "wsgateway_replays_total")
        clients: list[dict[str, Any]] = []
        samples = array("f")
        for pipe in pipes:
            pipe.send(("report",))
        for pipe in pipes:
            _, part, raw = expect(pipe, "report", 120)
            clients.extend(part)
            samples.frombytes(raw)
        truth = asyncio.run(stream_record(nats_url))
        return analyze(kind, clients, samples, truth, t_kill, published, usage, sources, connected)
    finally:
        for pipe in [*pipes, parent]:
            with contextlib.suppress(Exception):
                if pipe is not None:
                    pipe.send(("exit",))
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        srv_a.stop()
        srv_b.stop()


def quantiles(values: list[float], of: int | None = None) -> dict[str, float]:
    """p50 / p99 / max of `values`; with `of`, over `of` clients, those without a value counting as never
    (inf: not within the run)."""
    v = sorted(values) + [float("inf")] * max(0, (of or 0) - len(values))
    return {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[-1] if v else float("nan")}


def analyze(
    kind: str, clients: list[dict[str, Any]], samples: array[float], truth: dict[int, list[int]], t_kill: float,
    published: tuple[Any, ...], usage: dict[str, float], sources: dict[str, float], connected: int,
) -> dict[str, Any]:
    """Lost = an event of the client's scope after its first `seq` that it never got although it got a
    later one (a gap); behind = events it had not received yet when the run ended (still catching up)."""
    movers = [c for c in clients if not c["stays"]]
    live_after = [c["live_at"] - t_kill for c in movers if c["live_at"]]
    resub_after = [c["resub_at"] - t_kill for c in movers if c["resub_at"]]
    lost = doubled = stray = behind = 0
    lost_clients = behind_clients = 0
    for c in clients:
        got = array("q")
        got.frombytes(c["seqs"])
        want = [s for s in truth.get(c["scope"], []) if s > c["first"]] if c["first"] >= 0 else []
        have = set(got)
        top = got[-1] if got else 0
        gap = sum(1 for s in want if s not in have and s < top)
        late = sum(1 for s in want if s > top)
        lost += gap
        lost_clients += gap > 0
        behind += late
        behind_clients += late > 0
        stray += len(have - set(want))
        doubled += c["doubled"]
    total = len(movers)
    curve = {str(s): 100.0 * sum(1 for x in live_after if x <= s) / total if total else 0.0 for s in CURVE_S}
    return {
        "server": kind, "movers": total, "stayers": len(clients) - total, "connected": connected,
        "published": {"sent": published[1], "acked": published[2], "errors": published[4]},
        "live_again_s": quantiles(live_after, total) | {"count": len(live_after)},
        "resubscribed_s": quantiles(resub_after, total) | {"count": len(resub_after)},
        "curve_pct_live": curve,
        "lost": lost, "lost_clients": lost_clients, "doubled": doubled, "stray": stray,
        "behind_at_end": behind, "behind_clients": behind_clients,
        "closes": _sum_closes(clients),
        "stayers_delay_ms_10s": quantiles(list(samples)),  # the samples are of [kill, kill + 10 s)
        "cpu_s_first_10s": usage,
        "b_replays": sources,
        "reconnect_attempts_max": max((c["attempts"] for c in movers), default=0),
    }


def _sum_closes(clients: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in clients:
        for code, count in c["closes"].items():
            out[str(code)] = out.get(str(code), 0) + count
    return out


def print_report(results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    print(f"\nReconnect storm: {a.clients} movers on A ({a.clients // a.fanout} scopes x {a.fanout}), "
          f"{a.stayers} stayers on B, {a.deliveries:,} deliveries/s to the movers, jitter 0-{a.jitter:g}s; "
          f"A SIGKILLed after {a.warm:g}s, observed {a.observe:g}s + {a.drain:g}s drain")
    print("targets (issue 13): 100 % live again <= 10 s after the kill, lost = doubled = 0, stayers' p99 < 100 ms\n")
    cols = [f"{r['server']} #{r['run']}" for r in results]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, f: Any) -> None:
        rows.append((name, [f(r) for r in results]))

    def secs(x: float) -> str:
        return f"> {a.observe + a.drain:g}" if x == float("inf") else f"{x:.1f}"

    for q in ("p50", "p99", "max"):
        row(f"live again {q if q != 'max' else '100 %'} (s)", lambda r, q=q: secs(r["live_again_s"][q]))
    row("live again (clients)", lambda r: f"{r['live_again_s']['count']}/{r['movers']}")
    for q in ("p50", "p99", "max"):
        row(f"re-subscribed {q if q != 'max' else '100 %'} (s)", lambda r, q=q: secs(r["resubscribed_s"][q]))
    for s in CURVE_S:
        row(f"% live at {s:>2} s", lambda r, s=s: f"{r['curve_pct_live'][str(s)]:.1f}")
    row("lost events (clients)", lambda r: f"{r['lost']} ({r['lost_clients']})")
    row("doubled events", lambda r: str(r["doubled"]))
    row("stray events", lambda r: str(r["stray"]))
    for q in ("p50", "p99", "max"):
        row(f"stayers delay {q}, kill..+10 s (ms)", lambda r, q=q: f"{r['stayers_delay_ms_10s'][q]:.0f}")
    row("not received at the end (clients)", lambda r: f"{r['behind_at_end']} ({r['behind_clients']})")
    row("CPU-s kill..+10 s: B", lambda r: f"{r['cpu_s_first_10s']['b']:.1f}")
    row("CPU-s kill..+10 s: benchmark", lambda r: f"{r['cpu_s_first_10s']['bench']:.1f}")
    row(f"CPU-s kill..+10 s: others ({NCPU} cores)", lambda r: f"{r['cpu_s_first_10s']['other']:.1f}")
    row("B replays by source", lambda r: " ".join(f"{k}={v:g}" for k, v in r["b_replays"].items()) or "-")
    row("close codes seen", lambda r: json.dumps(r["closes"]))
    width = max(len(name) for name, _ in rows)
    colw = max(12, *(len(c) for c in cols), *(len(v) for _, vals in rows for v in vals))
    print(" " * width + " | " + " | ".join(c.rjust(colw) for c in cols))
    for name, vals in rows:
        print(name.ljust(width) + " | " + " | ".join(v.rjust(colw) for v in vals))
    for kind in dict.fromkeys(r["server"] for r in results):
        mine = [r for r in results if r["server"] == kind]
        if len(mine) > 1:
            med = statistics.median(r["live_again_s"]["max"] for r in mine)
            print(f"{kind}: median over {len(mine)} runs of 100 % live again: {secs(med)} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 movers, 10 scopes, 2,000/s, short windows")
    p.add_argument("--clients", type=int, default=5000, help="movers: clients on A that resume on B")
    p.add_argument("--fanout", type=int, default=100, help="movers per scope")
    p.add_argument("--stayers", type=int, default=1000, help="clients on B from the start")
    p.add_argument("--deliveries", type=int, default=20_000, help="deliveries per second to the movers")
    p.add_argument("--jitter", type=float, default=1.0, help="reconnect delay of a mover: uniform 0..J s")
    p.add_argument("--warm", type=float, default=5.0, help="seconds of traffic before the kill")
    p.add_argument("--observe", type=float, default=30.0, help="seconds of traffic after the kill")
    p.add_argument("--drain", type=float, default=5.0, help="seconds for the clients to receive the rest")
    p.add_argument("--procs", type=int, default=3, help="storm-client processes")
    p.add_argument("--runs", type=int, default=1, help="runs per server (alternating with --baseline)")
    p.add_argument("--baseline", metavar="REV", help="also measure the gateway of git revision REV")
    p.add_argument("--server-env", action="append", default=[], metavar="K=V", help="extra env for A and B")
    p.add_argument("--json", dest="json_out", metavar="FILE")
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.fanout, a.stayers, a.deliveries = 500, 50, 100, 2000
        a.warm, a.observe, a.drain, a.procs = 2.0, 12.0, 3.0, 2
    a.clients -= a.clients % a.fanout
    a.user_env = dict(kv.split("=", 1) for kv in a.server_env)
    return a


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="wsgw-storm-"))
    results: list[dict[str, Any]] = []
    try:
        code = snapshot_gateway(tmp / "src")
        envs = {"gateway": {**a.user_env, "PYTHONPATH": os.pathsep.join(filter(None, [code["path"],
                                                                                        os.environ.get("PYTHONPATH")]))}}
        codes = {"gateway": code}
        if a.baseline:
            base = snapshot_revision(a.baseline, tmp / "baseline")
            codes["baseline"] = base
            envs["baseline"] = {**a.user_env, "PYTHONPATH": os.pathsep.join(filter(None, [
                base["path"], os.environ.get("PYTHONPATH")]))}
        for kind, env in envs.items():
            check_snapshot_imports(Path(codes[kind]["path"]), env["PYTHONPATH"])
        log("code: " + ", ".join(f"{k} = {c['describe']} ({c['sha256'][:12]})" for k, c in codes.items()))
        jwks = Jwks()
        tokens = jwks.mint(a.clients + a.stayers)
        kinds = list(envs)
        if len(kinds) > 1:
            kinds = ["baseline", "gateway"]
        for run in range(1, a.runs + 1):
            for kind in (kinds if run % 2 else list(reversed(kinds))):
                with NatsProcess(store_dir=tmp / f"nats-{kind}-{run}") as natsd:
                    asyncio.run(seed_nats(natsd.url))
                    pid = natsd.proc.pid if natsd.proc else 0
                    r = run_storm(a, kind, envs[kind], natsd.url, pid, jwks, tokens, tmp)
                    r["run"] = run
                    r["code"] = codes[kind]["describe"]
                    results.append(r)
                    log(f"{kind} run {run}: 100 % live again after {r['live_again_s']['max']:.1f}s, "
                        f"lost {r['lost']}, doubled {r['doubled']}")
        jwks.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(results, a)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        args = {k: v for k, v in vars(a).items() if k != "user_env"}
        Path(a.json_out).write_text(json.dumps({"args": args, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
