"""permessage-deflate end to end, the gateway beside Centrifugo: server CPU and bytes on the wire per delivery,
plain and compressed, measured in one invocation with alternating rounds.

    .venv/bin/python bench/deflatepeer.py --runs 3 --duration 3     # 5,000 connections, 50,000 deliveries/s
    .venv/bin/python bench/deflatepeer.py --quick                   # small and fast (the smoke test's form)

The machinery is bench/fanout.py's (its `Bench`: private nats-server, JWKS, the compiled load client
bench/wsload.c, the publisher bench/pubload.py, the server alone on core 0): per round, every server of
`--servers` runs twice, its load clients offering permessage-deflate once and not at all once (the order
of the four alternates between rounds). Each run connects `--connections` clients (`--fanout` per
channel), then measures one window at the fixed `--rate` per payload of `--payloads`, the same events
for every server: `padded`, the fan-out peer comparison's 300-byte envelope ("x" padding), and `text`, the
same envelope padded with words (compresses like prose, less than the "x").

Both servers compress at zlib level 1, every message (Centrifugo: `websocket.compression`, bench/peers.py).
What each one negotiated is read from its 101 responses (the load client counts the distinct
`Sec-WebSocket-Extensions` answers) and printed. The gateway answers `server_no_context_takeover;
client_no_context_takeover` and compresses each event once for all its compressing recipients;
Centrifugo answers the same parameters but compresses every message again for every connection.

Per server, mode and payload (medians over rounds): server CPU µs per delivery (utime + stime of the
server process over the window / deliveries received in it), bytes received by the load clients per
delivery (every byte `recv` returned in the window: the servers' WebSocket frames as sent, headers and
control frames included, TCP/IP headers not), inflated payload bytes per delivery, data frames per
delivery (Centrifugo joins queued pushes into one frame) and the share of them compressed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import fanout  # noqa: E402
import peers  # noqa: E402
import pubload  # noqa: E402
from benchutil import tree_cpu_times, tree_rss_kib  # noqa: E402

SERVERS = ("gateway", "centrifugo1", "centrifugo")
LABELS = {"gateway": "gateway", "centrifugo1": "Centrifugo GOMAXPROCS=1", "centrifugo": "Centrifugo"}
# (key, label, format) of the figures per server, mode and payload
FIGURES = (
    ("step_cpu_us", "server CPU µs/delivery, whole step", "{:.2f}"),
    ("step_user_us", "of it user µs", "{:.2f}"),
    ("cpu_us", "server CPU µs/delivery, window", "{:.2f}"),
    ("user_us", "user µs", "{:.2f}"),
    ("sys_us", "sys µs", "{:.2f}"),
    ("wire_b", "bytes/delivery received", "{:.1f}"),
    ("payload_b", "payload bytes/delivery", "{:.1f}"),
    ("frames", "frames/delivery", "{:.3f}"),
    ("compressed_pct", "frames compressed %", "{:.0f}"),
    ("achieved", "achieved/s", "{:,.0f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("other_cpu", "other%", "{:.0f}"),
)


def log(msg: str) -> None:
    fanout.log(msg)


# The CPU readings of a step must span its window: when this driver, starved on a busy machine, read them
# late, the CPU figures of the step are left out (the bytes, counted by the load clients, stay).
SKEW = 0.2
DRAIN_S = 20.0  # at most, for the clients to stop receiving before and after a step


def skewed(st: fanout.Step) -> bool:
    return abs(st.cpu_wall_s - st.window_s) > SKEW * st.window_s


def figures(st: fanout.Step, whole: tuple[float, float, int]) -> dict[str, float]:
    """The step's figures; `whole`: (user, system) CPU seconds of the server and deliveries over the whole step."""
    n = st.samples or float("nan")
    nan = float("nan")
    cpu_ok = not skewed(st)
    user, system, delivered = whole
    return {
        "step_cpu_us": (user + system) * 1e6 / delivered if delivered else nan,
        "step_user_us": user * 1e6 / delivered if delivered else nan,
        "cpu_us": st.cpu_us_per_delivery if cpu_ok else nan, "user_us": st.user_us_per_delivery if cpu_ok else nan,
        "sys_us": st.sys_us_per_delivery if cpu_ok else nan,
        "wire_b": st.wire_bytes / n, "payload_b": st.payload_bytes / n, "frames": st.frames / n,
        "compressed_pct": 100 * st.compressed_frames / st.frames if st.frames else float("nan"),
        "achieved": st.achieved, "p99_ms": st.p99, "other_cpu": st.other_cpu,
    }


def measure(bench: fanout.Bench, kind: str, compress: bool, run: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    """One server, its clients offering permessage-deflate or not: one window per payload."""
    fa = bench.args
    ch = bench.children
    n = a.connections
    nscopes = max(1, n // a.fanout)
    per_proc = -(-n // a.clients)
    cpus = ({fanout.SERVER_CPU} if peers.pinned(kind) else set(range(fanout.NCPU))) if fa.pin else None
    server = fanout.Server(kind, bench.nats.url, bench.jwks, bench.tmp, fa.server_env if kind == "gateway" else {},
                           1, cpus)
    mode = "deflate" if compress else "plain"
    rows: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        rss0 = tree_rss_kib(server.pid)
        got, errors, secs = ch.connect(server.port, per_proc, nscopes, 300, kind, deflate=compress)
        negotiated: Counter[str] = Counter()
        for r in ch.all(("negotiated",), "negotiated", 30):
            negotiated.update(r[1])
        time.sleep(fa.settle)
        rss1 = tree_rss_kib(server.pid)
        failed = f" errors {dict(errors)}" if errors else ""
        log(f"{kind} {mode} run {run}: {got} connected in {secs:.1f}s{failed}; negotiated {dict(negotiated)}")
        if got < 0.9 * n:
            raise RuntimeError(f"{kind}: only {got}/{n} connections ({dict(errors)}):\n{server.log_tail()}")
        pt = fanout.Point(kind, n, run, connected=got)
        for payload in a.payloads:
            # The whole step, from before its first publish until its last event reached the clients: the
            # server's CPU over every delivery of the step, read without timing (the window's figures need
            # this driver to read the CPU on time, which a busy machine does not always let it do).
            bench.drain(DRAIN_S)
            cpu0, ev0 = tree_cpu_times(server.pid), delivered(bench)
            bench.payload = payload
            st = bench.step(server, pt, 1.0, a.rate, fa.slo_ms, nscopes, None)
            st.drained, st.drain_s = bench.drain(DRAIN_S)
            cpu1, ev1 = tree_cpu_times(server.pid), delivered(bench)
            whole = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], ev1 - ev0)
            pt.steps.append(st)
            rows.append({"server": kind, "mode": mode, "payload": payload, "run": run, "connected": got,
                         "negotiated": dict(negotiated), "rss_kib_per_conn": (rss1 - rss0) / got if got else None,
                         "figures": figures(st, whole), "whole_step": whole,
                         "step": dict(vars(st))})
            f = rows[-1]["figures"]
            log(f"{kind} {mode} {payload} run {run}: {f['step_cpu_us']:.2f} µs/delivery over the step "
                f"({f['cpu_us']:.2f} in the window), {f['wire_b']:.1f} bytes/delivery "
                f"received, {f['compressed_pct']:.0f}% of {f['frames']:.3f} frames/delivery compressed")
    finally:
        with contextlib.suppress(Exception):
            ch.all(("disconnect",), "disconnected", 30)
        server.stop()
    return rows


def delivered(bench: fanout.Bench) -> int:
    """Events received so far by all load clients."""
    return sum(int(r[1]) for r in bench.children.all(("count",), "count", 30))


def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def skewed_row(r: dict[str, Any]) -> bool:
    st = r["step"]
    return bool(abs(st["cpu_wall_s"] - st["window_s"]) > SKEW * st["window_s"])


def quotients(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
    return {k: x[k] / y[k] if y[k] and x[k] == x[k] and y[k] == y[k] else float("nan")
            for k in ("step_cpu_us", "cpu_us", "wire_b")}


def summarize(rows: list[dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    groups: list[dict[str, Any]] = []
    for payload in a.payloads:
        for kind in a.servers:
            for mode in ("plain", "deflate"):
                mine = [r for r in rows if r["server"] == kind and r["mode"] == mode and r["payload"] == payload]
                if not mine:
                    continue
                negotiated: Counter[str] = Counter()
                for r in mine:
                    negotiated.update(r["negotiated"])
                groups.append({
                    "server": kind, "mode": mode, "payload": payload, "runs": [r["run"] for r in mine],
                    "negotiated": dict(negotiated),
                    "median": {k: med([r["figures"][k] for r in mine]) for k, _, _ in FIGURES},
                    "per_round": {k: [r["figures"][k] for r in mine] for k, _, _ in FIGURES},
                    "rss_kib_per_conn": med([r["rss_kib_per_conn"] for r in mine if r["rss_kib_per_conn"] is not None]),
                    "cpu_skewed_rounds": sum(skewed_row(r) for r in mine),
                    "behind_rounds": sum(r["figures"]["achieved"] < 0.95 * a.rate for r in mine),
                    "undrained_rounds": sum(not r["step"]["drained"] for r in mine),
                })
    ratios = []
    for payload in a.payloads:
        by = {(g["server"], g["mode"]): g["median"] for g in groups if g["payload"] == payload}
        for kind in a.servers:
            p, z = by.get((kind, "plain")), by.get((kind, "deflate"))
            if p and z:
                ratios.append({"payload": payload, "what": f"{LABELS[kind]}: deflate / plain", **quotients(z, p)})
        g = {m: by.get(("gateway", m)) for m in ("plain", "deflate")}
        for kind in a.servers:
            if kind == "gateway":
                continue
            for m in ("plain", "deflate"):
                other = by.get((kind, m))
                if g[m] and other:
                    ratios.append({"payload": payload, "what": f"gateway / {LABELS[kind]}, {m}",
                                   **quotients(g[m], other)})
    return {"groups": groups, "ratios": ratios}


def print_report(summary: dict[str, Any], a: argparse.Namespace, code: str) -> None:
    print(f"\n## permessage-deflate, gateway beside Centrifugo: medians of {a.runs} round(s)\n")
    print(f"{a.connections:,} connections, {a.fanout} per channel, {a.rate:,} deliveries/s, {a.duration:g} s windows; "
          f"{pubload.ENVELOPE_BYTES}-byte events; gateway at {code}; both servers zlib level 1 on every message. "
          "Bytes = what the load clients received in the window (WebSocket frames, headers and control frames "
          "included, TCP/IP headers not) per delivery.\n")
    head = ["payload", "server", "mode", *(label for _, label, _ in FIGURES), "RSS KiB/conn",
            "behind / skewed / undrained", "negotiated"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for g in summary["groups"]:
        cells = [g["payload"], LABELS[g["server"]], g["mode"]]
        for key, _, form in FIGURES:
            v = g["median"][key]
            per = " / ".join("n/a" if x != x else form.format(x) for x in g["per_round"][key])
            rounds = f" ({per})" if key in ("step_cpu_us", "wire_b") and len(g["runs"]) > 1 else ""
            cells.append(("n/a" if v != v else f"**{form.format(v)}**") + rounds)
        cells.append(f"{g['rss_kib_per_conn']:.1f}")
        cells.append(f"{g['behind_rounds']} / {g['cpu_skewed_rounds']} / {g['undrained_rounds']}")
        cells.append("; ".join(f"`{k or '(none)'}` x{v:,}" for k, v in g["negotiated"].items()))
        print("| " + " | ".join(cells) + " |")
    print(f"\nbehind = rounds in which the server delivered < 95% of {a.rate:,}/s (it fell behind: its CPU per "
          "delivery is then at bigger batches); skewed = rounds whose CPU readings did not span the window (this "
          f"driver ran late by > {SKEW:.0%}: their window CPU figures are left out); undrained = rounds whose backlog "
          f"had not reached the clients {DRAIN_S:g} s after the step (its whole-step figure misses some of the "
          "CPU). Whole step = the server's CPU from before the step's first publish until the clients stopped "
          "receiving, over every delivery in it (includes the server's idle work in the pauses, the warm-up and the "
          "drain). other% = busy CPU outside the "
          "benchmark's processes (other tenants), % of one core.")
    print("\n| payload | ratio of medians | server CPU per delivery, whole step | in the window | bytes per delivery |")
    print("|---|---|---|---|---|")
    for r in summary["ratios"]:
        cells = ["n/a" if r[k] != r[k] else f"{r[k]:.2f}x" for k in ("step_cpu_us", "cpu_us", "wire_b")]
        print(f"| {r['payload']} | {r['what']} | " + " | ".join(cells) + " |")
    for g in summary["groups"]:
        if g["mode"] == "deflate" and not (g["median"]["compressed_pct"] > 0):
            print(f"\nWARNING: {LABELS[g['server']]} sent no compressed frame to clients offering permessage-deflate "
                  f"(negotiated {g['negotiated']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="gateway,centrifugo1",
                   help=f"comma-separated, from {', '.join(SERVERS)} (centrifugo1: GOMAXPROCS=1, pinned like the "
                        "gateway; centrifugo: Go's default, unpinned)")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--fanout", type=int, default=100, help="subscribers per channel")
    p.add_argument("--rate", type=int, default=50_000, help="deliveries/s (fixed)")
    p.add_argument("--runs", type=int, default=3, help="rounds; every server in both modes per round")
    p.add_argument("--duration", type=float, default=3.0, help="measurement window per payload, seconds")
    p.add_argument("--warmup", type=float, default=1.5, help="publishing before the window opens, seconds")
    p.add_argument("--payloads", default="padded,text", help=f"comma-separated, from {', '.join(pubload.PAYLOADS)}")
    p.add_argument("--clients", type=int, default=2, help="load-client processes")
    p.add_argument("--quick", action="store_true", help="small and fast: 300 connections, 1 round, 2 s windows")
    p.add_argument("--json", dest="json_out", default=None, help="also write all results to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.connections, a.rate, a.runs, a.duration, a.warmup, a.payloads = 300, 15_000, 1, 2.0, 1.0, "padded"
    a.servers = [s for s in a.servers.split(",") if s]
    a.payloads = [s for s in a.payloads.split(",") if s]
    if bad := [s for s in a.servers if s not in SERVERS]:
        p.error(f"unknown server(s) {bad}: choose from {', '.join(SERVERS)}")
    if bad := [s for s in a.payloads if s not in pubload.PAYLOADS]:
        p.error(f"unknown payload(s) {bad}: choose from {', '.join(pubload.PAYLOADS)}")
    for name in ("connections", "fanout", "rate", "runs", "clients"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.duration <= 0 or a.warmup < 0:
        p.error("--duration must be positive and --warmup not negative")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # bench/fanout.py's settings for its Bench: the peer mode at one fixed rate, the compiled load client.
    fa = fanout.parse_args([
        "--servers", "gateway,centrifugo1", "--connections", str(a.connections), "--runs", str(a.runs),
        "--duration", str(a.duration), "--warmup", str(a.warmup), "--peer-rates", str(a.rate), "--cpu-rate",
        str(a.rate), "--fanout", str(a.fanout), "--clients", str(a.clients), "--client", "c",
        *(["--settle", "1.0"] if a.quick else []),
    ])
    fanout.raise_nofile()
    if fa.pin:
        import os

        os.sched_setaffinity(0, set(range(fanout.NCPU)) - {fanout.SERVER_CPU})
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with fanout.Bench(fa) as bench:
        code = f"{bench.code['describe']} (snapshot {bench.code['sha256'][:12]})"
        combos = [(kind, z) for kind in a.servers for z in (False, True)]
        for run in range(1, a.runs + 1):
            for kind, z in combos if run % 2 else list(reversed(combos)):
                rows.extend(measure(bench, kind, z, run, a))
    summary = summarize(rows, a)
    print_report(summary, a, code)
    elapsed = time.monotonic() - started
    print(f"\ntotal time {elapsed:.0f} s")
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "gateway_code": code, "summary": summary,
                                                "rows": rows, "elapsed_s": elapsed}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
