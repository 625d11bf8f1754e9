"""The peer comparison's report (bench/fanout.py with a peer server kind): figures, ratios, targets.

Per connection count and server, one value per round of each figure, their median, and the ratios
gateway / peer of the medians. The targets of issue 13 are read from those ratios (and, for memory, the
gateway's own figure), all from the same invocation.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import IO, Any

import peers

# A step with other% (busy CPU outside the benchmark's processes, % of one core) at or above this was
# measured on a disturbed machine (fanout.py repeats it and keeps both).
DISTURBED_OTHER_PCT = 30.0
# (key, label, higher is better)
FIGURES = (
    ("capacity", "max deliveries/s at p99 < {slo:g} ms", True),
    ("max_throughput", "highest deliveries/s at any latency", True),
    ("max_throughput_p99_ms", "p99 ms at that throughput", False),
    ("cpu_s_per_1m", "server CPU-s per 1M deliveries at {cpu_rate:,}/s", False),
    ("nats_cpu_s_per_1m", "nats-server CPU-s per 1M deliveries at {cpu_rate:,}/s", False),
    ("rss_kib_per_conn", "KiB RSS per idle connection", False),
    ("base_rss_mib", "base RSS MiB (after 8 warm-up connections)", False),
)
# The ratios reported: gateway / each of these that was measured.
RATIO_PEERS = ("nchan", "centrifugo1", "centrifugo", "centrifugo1-nats", "centrifugo-nats")
LABELS = {
    "gateway": "gateway", "naive": "naive app", "baseline": "baseline", "nchan": "Nchan",
    "centrifugo1": "Centrifugo GOMAXPROCS=1", "centrifugo": "Centrifugo (default GOMAXPROCS)",
    "centrifugo1-nats": "Centrifugo NATS broker GOMAXPROCS=1",
    "centrifugo-nats": "Centrifugo NATS broker (default GOMAXPROCS)",
}


def med(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def per_round(point: Any, steps: list[Any], cpu_rate: int) -> dict[str, float]:
    """The figures of one server in one round at one connection count."""
    passing = [s for s in steps if s.passed]
    top = max(steps, key=lambda s: s.achieved, default=None)
    fixed = next((s for s in steps if abs(s.target_rate * s.fraction - cpu_rate) < 1), None)
    nan = float("nan")
    return {
        "capacity": max((s.achieved for s in passing), default=0.0),
        "max_throughput": top.achieved if top else nan,
        "max_throughput_p99_ms": top.p99 if top else nan,
        "cpu_s_per_1m": fixed.server_cpu * 1e4 / fixed.achieved if fixed and fixed.achieved else nan,
        "nats_cpu_s_per_1m": fixed.nats_cpu * 1e4 / fixed.achieved if fixed and fixed.achieved else nan,
        "rss_kib_per_conn": point.rss_per_conn_kib,
        "base_rss_mib": point.rss_before_kib / 1024 if point.rss_before_kib else nan,
    }


def compare(points: list[Any], args: argparse.Namespace,
            effective_steps: Callable[[Any], list[Any]]) -> dict[str, Any]:
    """Figures, ratios and targets of the peer comparison (JSON-ready)."""
    per_count = []
    for n in args.connections:
        servers: dict[str, Any] = {}
        for kind in args.servers:
            pts = sorted((p for p in points if p.server == kind and p.connections == n), key=lambda p: p.run)
            if not pts:
                continue
            rounds = [per_round(p, effective_steps(p), args.cpu_rate) for p in pts]
            all_steps = [s for p in pts for s in p.steps]
            servers[kind] = {
                "label": LABELS.get(kind, kind),
                "rounds": [p.run for p in pts],
                "figures": {key: {"median": med([r[key] for r in rounds]), "per_round": [r[key] for r in rounds]}
                            for key, _, _ in FIGURES},
                "saturated_top": [top_saturated(effective_steps(p)) for p in pts],
                "load": {
                    "other_cpu_median": med([s.other_cpu for s in all_steps]),
                    "other_cpu_max": max((s.other_cpu for s in all_steps), default=float("nan")),
                    "disturbed_steps": sum(s.other_cpu >= DISTURBED_OTHER_PCT for s in all_steps),
                    "repeated_steps": sum(getattr(s, "repeat", 0) for s in all_steps),
                },
                "steps": [step_row(p.run, s) for p in pts for s in p.steps],
                "pinned": bool(args.pin) and peers.pinned(kind),
            }
        per_count.append({"connections": n, "servers": servers})
    return derive({
        "slo_ms": args.slo_ms, "cpu_rate": args.cpu_rate, "rates": list(args.peer_rates),
        "rounds": args.runs, "pinned": bool(args.pin), "per_count": per_count,
        "figures": [{"key": k, "label": label.format(slo=args.slo_ms, cpu_rate=args.cpu_rate),
                     "higher_is_better": hb} for k, label, hb in FIGURES],
    })


def derive(rep: dict[str, Any]) -> dict[str, Any]:
    """The ratios gateway / peer of the medians, and the targets, from the figures of `rep`."""
    for c in rep["per_count"]:
        servers = c["servers"]
        g = servers.get("gateway")
        c["ratios"] = {}
        for peer in RATIO_PEERS:
            if not g or peer not in servers:
                continue
            c["ratios"][peer] = {}
            for key, _, _ in FIGURES:
                if key == "nats_cpu_s_per_1m" and not peer.endswith("-nats"):
                    r = float("nan")  # that peer does not use nats-server
                else:
                    r = ratio(g["figures"][key]["median"], servers[peer]["figures"][key]["median"])
                c["ratios"][peer][key] = r
    rep["targets"] = targets(rep["per_count"])
    return rep


def saturated(step: Any) -> bool:
    """The server did not keep up with the step: it delivered < 95% of the step's rate (whether it fell
    behind the publisher or, through its own publish API, slowed the publisher down), or lost a client."""
    return bool(step.achieved < 0.95 * step.target_rate * step.fraction or step.lost)


def top_saturated(steps: list[Any]) -> bool:
    """Whether the top step of a round was saturated (else the highest throughput is only a lower bound)."""
    return bool(steps) and saturated(steps[-1])


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def step_row(run: int, s: Any) -> dict[str, Any]:
    return {"run": run, "rate": round(s.target_rate * s.fraction), "offered": s.offered, "achieved": s.achieved,
            "p50_ms": s.p50, "p99_ms": s.p99, "passed": s.passed, "server_cpu": s.server_cpu,
            "nats_cpu": s.nats_cpu, "clients_cpu": s.clients_cpu, "other_cpu": s.other_cpu,
            "host_busy": s.host_busy, "disturbed": s.other_cpu >= DISTURBED_OTHER_PCT,
            "repeat": getattr(s, "repeat", 0)}


def targets(per_count: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's targets, as met / not met from this run's ratios (only those this run measured)."""
    out = []
    by_n = {c["connections"]: c for c in per_count}
    for n, peer, need in ((5000, "nchan", 1.25), (1000, "nchan", 1.25), (5000, "centrifugo1", 1.0)):
        c = by_n.get(n)
        if c and peer in c["ratios"]:
            r = c["ratios"][peer]["capacity"]
            # None: undetermined (the peer met the p99 target at no step, so there is no ratio to judge).
            met = None if r != r else bool(r >= need)
            out.append({"target": f"max deliveries/s at p99 target, gateway / {LABELS[peer]} at {n:,} connections "
                                  f">= {need:g}x", "connections": n, "peer": peer, "value": r, "threshold": need,
                        "gateway": c["servers"]["gateway"]["figures"]["capacity"]["median"],
                        "peer_value": c["servers"][peer]["figures"]["capacity"]["median"], "met": met})
    for c in per_count:
        g = c["servers"].get("gateway")
        if g:
            v = g["figures"]["rss_kib_per_conn"]["median"]
            out.append({"target": f"gateway KiB RSS per idle connection at {c['connections']:,} connections <= 10",
                        "connections": c["connections"], "peer": None, "value": v, "threshold": 10.0,
                        "met": None if v != v else bool(v <= 10.0)})
    return out


def fmt(key: str, v: float) -> str:
    if v != v:
        return "n/a"
    if key in ("capacity", "max_throughput"):
        return f"{v:,.0f}"
    if key == "max_throughput_p99_ms":
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Print the peer report of a saved run: `bench/peerreport.py bench/results/peers.json`."""
    import json
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json_file", help="a bench/fanout.py --json file of a run with peer servers")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        doc = json.load(f)
    if "peers" not in doc.get("summary", {}):
        parser.error(f"{args.json_file} has no peer comparison (summary.peers)")
    print_markdown(derive(doc["summary"]["peers"]), sys.stdout)
    return 0


def print_markdown(rep: dict[str, Any], out: IO[str]) -> None:
    """The peer table per connection count, the targets, then every step of every round."""
    print(f"\n## Peer comparison: medians of {rep['rounds']} round(s), ratios gateway / peer\n", file=out)
    print(f"Same load client (bench/wsload.c), publisher pacing, 300-byte events, 100 subscribers per channel and "
          f"rate ladder ({', '.join(f'{r:,}' for r in rep['rates'])} deliveries/s, ascending until saturated) for "
          f"every server; p99 target {rep['slo_ms']:g} ms; CPU compared at {rep['cpu_rate']:,}/s. "
          + ("Server alone on core 0, the rest of the benchmark on the other cores (Centrifugo with its default "
             "GOMAXPROCS unpinned)." if rep["pinned"] else "No CPU pinning."), file=out)
    labels = {f["key"]: f["label"] for f in rep["figures"]}
    for c in rep["per_count"]:
        kinds = list(c["servers"])
        peers_here = list(c["ratios"])
        print(f"\n### {c['connections']:,} connections\n", file=out)
        head = ["figure", *(c["servers"][k]["label"] for k in kinds), *(f"gw / {c['servers'][p]['label']}"
                                                                         for p in peers_here)]
        print("| " + " | ".join(head) + " |", file=out)
        print("|" + "---|" * len(head), file=out)
        for f in rep["figures"]:
            key = f["key"]
            if all(c["servers"][k]["figures"][key]["median"] != c["servers"][k]["figures"][key]["median"]
                   for k in kinds):
                continue
            cells = [labels[key]]
            for k in kinds:
                fig = c["servers"][k]["figures"][key]
                per = " / ".join(fmt(key, v) for v in fig["per_round"])
                lower_bound = key == "max_throughput" and not all(c["servers"][k]["saturated_top"])
                cells.append(f"**{fmt(key, fig['median'])}**{' (>=)' if lower_bound else ''} ({per})")
            for p in peers_here:
                r = c["ratios"][p][key]
                cells.append("n/a" if r != r else f"{r:.2f}x")
            print("| " + " | ".join(cells) + " |", file=out)
        loads = "; ".join(f"{c['servers'][k]['label']}: other% median {c['servers'][k]['load']['other_cpu_median']:.0f}"
                          f" max {c['servers'][k]['load']['other_cpu_max']:.0f}, "
                          f"{c['servers'][k]['load']['disturbed_steps']} disturbed step(s), "
                          f"{c['servers'][k]['load']['repeated_steps']} repeated" for k in kinds)
        print(f"\nMedian **bold**, then each round's value. Busy CPU outside the benchmark (other%, % of one "
              f"core) per server over all its steps: {loads}.", file=out)
    if rep["targets"]:
        print("\n### Targets (issue 13), from this run\n", file=out)
        print("| target | value | met |", file=out)
        print("|---|---|---|", file=out)
        for t in rep["targets"]:
            unit = "x" if t["peer"] else " KiB"
            if t["value"] == t["value"]:
                v = f"{t['value']:.2f}{unit}"
            else:  # a ratio with a zero side: say which
                v = f"n/a (gateway {t.get('gateway', 0):,.0f}/s, peer {t.get('peer_value', 0):,.0f}/s)"
            verdict = "undetermined" if t["met"] is None else "met" if t["met"] else "NOT met"
            print(f"| {t['target']} | {v} | {verdict} |", file=out)
    print("\n### Every step of every round\n", file=out)
    print("rate = offered deliveries/s (nominal); * = other% >= 30 (disturbed); r = the repeat of a disturbed step.\n",
          file=out)
    print("| conns | server | round | rate | achieved/s | p50 ms | p99 ms | ok | server CPU% | nats CPU% | "
          "clients CPU% | other% |", file=out)
    print("|" + "---|" * 12, file=out)
    for c in rep["per_count"]:
        for k, srv in c["servers"].items():
            for s in srv["steps"]:
                mark = ("*" if s["disturbed"] else "") + (" r" if s["repeat"] else "")
                print(f"| {c['connections']:,} | {k} | {s['run']} | {s['rate']:,} | {s['achieved']:,.0f} | "
                      f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {'y' if s['passed'] else 'n'} | "
                      f"{s['server_cpu']:.0f} | {s['nats_cpu']:.0f} | {s['clients_cpu']:.0f} | "
                      f"{s['other_cpu']:.0f}{mark} |", file=out)


if __name__ == "__main__":
    raise SystemExit(main())
