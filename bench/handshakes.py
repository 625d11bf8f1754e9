"""Handshakes per second per core: N WebSocket connections with distinct tokens, opened as fast as the
load client can, against one gateway process pinned to one core, for RS256 and ES256 tokens.

Each handshake is the whole of it: TCP connect, HTTP upgrade with `Authorization: Bearer <own token>`,
the token fully verified (signature, exp, aud, iss, algorithm), `welcome`, one URL subscription and its
`subscribed` (the compiled load client, bench/wsload.c, 64 handshakes in flight). The gateway runs
alone on CPU 0 (`--server-cpu`), the load client on CPU 1. Reported per algorithm and tree:

- handshakes/s: connections / wall time of the connect phase (limited by the core and by the machine's
  other load);
- CPU µs per handshake: the server process's CPU time over the phase / connections, and from it
  **handshakes per core-second** (1e6 / µs), the figure that does not depend on how busy the machine is.

    .venv/bin/python bench/handshakes.py                          # 3 rounds, 3000 connections, RS256 + ES256
    .venv/bin/python bench/handshakes.py --baseline 62e2018       # ... and gateway/ of a revision, alternating
    .venv/bin/python bench/handshakes.py --profile /tmp/hs        # py-spy of one extra ES256 round per tree

Medians over `--rounds`; each round starts a fresh gateway per algorithm and tree, in alternating order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import cload  # noqa: E402
import fanout  # noqa: E402
import jwt  # noqa: E402
from benchutil import fd_usage, load_processes, process_tree, raise_nofile  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from jwt.algorithms import ECAlgorithm, RSAAlgorithm  # noqa: E402

from gateway.config import FD_RESERVE  # noqa: E402
from gateway.devtools.natsproc import NatsProcess  # noqa: E402

ALGS = ("RS256", "ES256")
WARM = 8  # warm-up connections per round (imports, first-use allocations), opened before the phase


class Keys:
    """An RS256 and an ES256 key, their JWKS on a free loopback port, and a token minter."""

    def __init__(self) -> None:
        self.private = {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        "ES256": ec.generate_private_key(ec.SECP256R1())}
        self.kids = {alg: f"bench-{alg.lower()}-{os.urandom(3).hex()}" for alg in ALGS}
        jwks = [
            {**RSAAlgorithm.to_jwk(self.private["RS256"].public_key(), as_dict=True),  # type: ignore[arg-type]
             "kid": self.kids["RS256"], "alg": "RS256", "use": "sig"},
            {**ECAlgorithm.to_jwk(self.private["ES256"].public_key(), as_dict=True),  # type: ignore[arg-type]
             "kid": self.kids["ES256"], "alg": "ES256", "use": "sig"},
        ]
        body = json.dumps({"keys": jwks}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.issuer}/jwks.json"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def mint(self, alg: str, count: int, tag: str) -> list[str]:
        now = int(time.time())
        return [
            jwt.encode({"iss": self.issuer, "aud": fanout.AUDIENCE, "sub": f"hs-{tag}-{i}", "iat": now,
                        "exp": now + 3600, "tenant": "bench", "groups": ["bench"]},
                       self.private[alg], algorithm=alg, headers={"kid": self.kids[alg], "typ": "JWT"})
            for i in range(count)
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def per_core(cpu_us: float) -> float:
    """Handshakes per core-second from CPU µs per handshake; nan when the phase used less CPU than the
    kernel's accounting tick (10 ms) resolves (too few connections: measure more)."""
    return 1e6 / cpu_us if cpu_us > 0 else float("nan")


def user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree."""
    user = system = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
            user += int(fields[11]) / os.sysconf("SC_CLK_TCK")
            system += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return user, system


def pin(pid: int, cpus: set[int]) -> None:
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p, cpus)


def host_busy() -> tuple[float, float]:
    busy, _, total = fanout.host_cpu()
    return busy, total


def one(kind: str, alg: str, tokens: list[str], env: dict[str, str], ctx: dict[str, Any],
        args: argparse.Namespace, profile: Path | None = None) -> dict[str, float]:
    """One fresh gateway, N handshakes: wall seconds, server CPU µs per handshake, machine load; the
    connections are dealt over `--clients` load processes (each of them opens its warm-up ones first)."""
    server = fanout.Server(kind, ctx["nats"].url, ctx["keys"], ctx["tmp"], env)
    k = args.clients
    clients = [cload.CLoadClient(ctx["binary"], i, k, tokens[i::k]) for i in range(k)]
    path = "/v1/ws?scope=conversation:c0"
    spy = None

    def connect_all(upto: list[int], concurrency: int, timeout: float) -> tuple[int, dict[str, int], float]:
        for c, n in zip(clients, upto, strict=True):
            c.send(("connect", "127.0.0.1", server.port, path, n, 1, concurrency))
        replies = [fanout.Children.expect(c, "connected", timeout) for c in clients]
        errors: dict[str, int] = {}
        for r in replies:
            for why, count in r[2].items():
                errors[why] = errors.get(why, 0) + count
        return sum(r[1] for r in replies), errors, max(r[3] for r in replies)

    try:
        for c in clients:
            fanout.Children.expect(c, "ready", 60)
        server.wait_ready()
        pin(server.pid, {args.server_cpu})
        for c in clients:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(c.pid, {args.client_cpu})
        warm = -(-WARM // k)
        warmed, _, _ = connect_all([warm] * k, warm, 60)
        if profile is not None:
            # a duration about that of the phase (py-spy writes its output when it ends)
            spy = fanout.start_py_spy(server.pid, args.profile_seconds, profile / f"{kind}-{alg}.txt")
        (u0, s0), (busy0, total0), t0 = user_sys(server.pid), host_busy(), time.monotonic()
        got, errors, secs = connect_all([len(tokens[i::k]) for i in range(k)], -(-args.concurrency // k), 300)
        (u1, s1), (busy1, total1), t1 = user_sys(server.pid), host_busy(), time.monotonic()
        fds, fd_limit = max(fd_usage(p) for p in process_tree(server.pid))
        if errors:
            fanout.log(f"{kind} {alg}: connect errors {errors}")
        return {"connected": got, "open": warmed + got, "wall_s": secs, "per_s": got / secs if secs else float("nan"),
                "cpu_us": (u1 - u0 + s1 - s0) / max(1, got) * 1e6, "sys_us": (s1 - s0) / max(1, got) * 1e6,
                "host_busy_pct": 100 * (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1),
                "phase_s": t1 - t0, "server_fds": fds, "server_fd_limit": fd_limit,
                # descriptors the gateway holds besides its clients' sockets: the ceiling is the limit minus these
                "server_own_fds": fds - warmed - got}
    finally:
        if spy is not None:
            ctx["profiles"][f"{kind} {alg}"] = fanout.finish_py_spy(spy)
        for c in clients:
            with contextlib.suppress(Exception):
                c.send(("exit",))
            c.close()
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64, help="handshakes in flight (over all load clients)")
    p.add_argument("--clients", type=int, default=0,
                   help="load-client processes, all on --client-cpu (0: as few as keep each under its own "
                        "file-descriptor limit minus 64: one up to 19,928 connections with a limit of 20,000)")
    p.add_argument("--algs", default=",".join(ALGS))
    p.add_argument("--baseline", default=None, metavar="REV", help="also measure gateway/ of this git revision")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--profile", default=None, metavar="DIR", help="py-spy of one more ES256 round per tree")
    p.add_argument("--profile-seconds", type=float, default=5, help="py-spy's duration (about the phase's)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the gateway (e.g. WSGATEWAY_GC_GEN0_THRESHOLD=700)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    algs = [a for a in args.algs.split(",") if a]
    nofile = raise_nofile()
    args.clients = args.clients or load_processes(args.connections + WARM, nofile)
    n_tokens = args.connections + -(-WARM // args.clients) * args.clients  # the phase's and the warm-up's
    tmp = Path(tempfile.mkdtemp(prefix="wsgw-hs-"))
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(subprocess.run, ["rm", "-rf", str(tmp)])
        code = fanout.snapshot_gateway(tmp / "src")
        extra = dict(kv.split("=", 1) for kv in args.server_env)
        envs = {"gateway": {**extra, "PYTHONPATH": os.pathsep.join(filter(None, [code["path"],
                                                                                 os.environ.get("PYTHONPATH")]))}}
        fanout.log(f"gateway as of {code['describe']} (snapshot {code['sha256'][:12]})")
        if args.baseline:
            base = fanout.snapshot_revision(args.baseline, tmp / "baseline")
            envs["baseline"] = {**extra, "PYTHONPATH": os.pathsep.join(filter(None, [base["path"],
                                                                             os.environ.get("PYTHONPATH")]))}
            fanout.log(f"baseline: gateway as of {base['describe']} ({args.baseline})")
        nats = NatsProcess(store_dir=tmp / "nats")
        nats.start()
        stack.callback(nats.stop)
        keys = Keys()
        stack.callback(keys.close)
        asyncio.run(fanout.seed_nats(nats.url))
        ctx: dict[str, Any] = {"nats": nats, "keys": keys, "tmp": tmp, "binary": cload.build(tmp), "profiles": {}}
        runs = [(kind, alg) for alg in algs for kind in envs]
        for r in range(args.rounds):
            for kind, alg in (runs if r % 2 == 0 else list(reversed(runs))):
                tokens = keys.mint(alg, n_tokens, f"{r}{kind}")
                res = one(kind, alg, tokens, envs[kind], ctx, args)
                results.setdefault((kind, alg), []).append(res)
                fanout.log(f"round {r + 1} {kind:8} {alg}: {res['connected']} in {res['wall_s']:.2f}s = "
                           f"{res['per_s']:,.0f}/s, server {res['cpu_us']:.0f} µs CPU each "
                           f"({res['sys_us']:.0f} system) "
                           f"({per_core(res['cpu_us']):,.0f} per core-second), "
                           f"machine busy {res['host_busy_pct']:.0f}%; "
                           f"{res['open']} open, the gateway holds {res['server_fds']} fds of its limit "
                           f"{res['server_fd_limit']} ({res['server_own_fds']} its own)")
        if args.profile:
            prof = Path(args.profile)
            prof.mkdir(parents=True, exist_ok=True)
            for kind in envs:
                one(kind, "ES256", keys.mint("ES256", n_tokens, f"p{kind}"), envs[kind], ctx, args, prof)
            fanout.print_profiles(ctx["profiles"])
    print(f"\nhandshakes (connect + token check + welcome + subscribe), {args.connections} per round, "
          f"{args.concurrency} in flight from {args.clients} load process(es), server on CPU {args.server_cpu}; "
          f"median of {args.rounds} rounds")
    print(f"  {'tree':10s} {'alg':6s} {'handshakes/s':>13s} {'CPU µs each':>12s} {'of it sys':>10s} {'per core-s':>11s}"
          f" {'busy%':>6s}")
    summary = {}
    for (kind, alg), rs in results.items():
        m = {k: statistics.median(r[k] for r in rs) for k in ("per_s", "cpu_us", "sys_us", "host_busy_pct")}
        summary[f"{kind} {alg}"] = {**m, "per_core_s": per_core(m["cpu_us"]), "rounds": rs}
        print(f"  {kind:10s} {alg:6s} {m['per_s']:13,.0f} {m['cpu_us']:12.0f} {m['sys_us']:10.0f} "
              f"{per_core(m['cpu_us']):11,.0f} "
              f"{m['host_busy_pct']:6.0f}   (per core-s by round: "
              f"{' '.join(format(per_core(r['cpu_us']), ',.0f') for r in rs)})")
    every = [r for rs in results.values() for r in rs]
    if every:
        own, limit = max(r["server_own_fds"] for r in every), min(r["server_fd_limit"] for r in every)
        print(f"  connections open at the end of a phase: {min(r['open'] for r in every):,}; the gateway's own "
              f"descriptors besides them: at most {own} of its limit {limit:,}, so one process holds at most "
              f"{limit - own:,} connections (the scrapes of /metrics and /readyz and a JWKS fetch need a few more); "
              f"the gateway admits {limit - FD_RESERVE:,} (its limit minus {FD_RESERVE}) and answers 4429 beyond")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
