"""Fan-out benchmark: the gateway vs. a naive FastAPI fan-out and peer servers, measured in the same run.

    .venv/bin/python bench/fanout.py                 # default: 1,000 and 5,000 connections, 3 runs
    .venv/bin/python bench/fanout.py --quick         # small and fast (smoke test)
    .venv/bin/python bench/fanout.py --json out.json --profile bench/results/profile
    .venv/bin/python bench/fanout.py --baseline b2dc77e --servers gateway,baseline   # before/after, alternating
    .venv/bin/python bench/fanout.py --servers gateway,nchan,centrifugo1,centrifugo  # the peer comparison

Everything runs on this machine, on 127.0.0.1: a private nats-server (JetStream, temp store), a
JWKS HTTP server with the benchmark's own ES256 key, the server under test as a separate process
(`wsgateway serve --workers 1`, or uvicorn running bench/naive_app.py), load-client processes
(bench/wsload.py) and a publisher process (bench/pubload.py). With `--baseline REV`, server kind
`baseline` is the gateway of git revision REV, run exactly like `gateway` (only the code snapshot on
PYTHONPATH differs), so a change is measured before and after in the same sitting. The peer servers
(bench/peers.py: Nchan, Centrifugo) take the same events from the same publisher over their own HTTP
publish API and serve the same compiled load client. See bench/README.md
for what the figures mean; speed targets are read from them, nothing here asserts.
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
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import cload  # noqa: E402
import jwt  # noqa: E402
import peerreport  # noqa: E402
import peers  # noqa: E402
import pubload  # noqa: E402
import wsload  # noqa: E402
from benchutil import (  # noqa: E402
    FD_MARGIN,
    build_fastpath,
    child_setup,
    cpu_seconds,
    fd_usage,
    free_port,
    load_processes,
    percentile,
    process_tree,
    raise_nofile,
    tree_cpu_seconds,
    tree_cpu_times,
    tree_rss_kib,
)
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from jwt.algorithms import ECAlgorithm  # noqa: E402

from gateway.devtools.natsproc import NatsProcess  # noqa: E402

AUDIENCE = "wsgateway-bench"
STREAM = "EVENTS"
ACL_BUCKET = "wsgateway-acl"
# (offered deliveries/s, p99 target in ms) per connection count: the targets of docs/performance.md.
TARGETS = {1000: (50_000, 20.0), 5000: (100_000, 50.0)}
SERVERS = ("gateway", "naive")
# Server kinds that run `wsgateway serve`: the working tree's gateway/ and, with --baseline REV, REV's.
GATEWAY_KINDS = ("gateway", "baseline")
KINDS = ("gateway", "baseline", *peers.KINDS, "naive")  # report order
NCPU = os.cpu_count() or 1
# --pin (the default on 2+ cores): the server under test alone on SERVER_CPU, everything else of the
# benchmark (nats-server, load clients, publisher, this driver) on the other cores.
SERVER_CPU = 0
# The peer comparison's rate ladder (deliveries/s, the same for every server) and its fixed rate for CPU.
PEER_RATES = "25000,50000,75000,100000,125000,150000,200000,250000"
PEER_CPU_RATE = 50_000
PEER_SLO_MS = 50.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def target_for(n: int, rate_override: dict[int, int], slo_ms: float | None = None) -> tuple[int, float]:
    """Offered deliveries/s and p99 target (ms) for n connections (--slo-ms: the same target at every count)."""
    rate, slo = TARGETS.get(n, (50 * n if n <= 1000 else 20 * n, 20.0 if n <= 1000 else 50.0))
    return rate_override.get(n, rate), slo_ms or slo


# --- identity provider -----------------------------------------------------------------------------


class Jwks:
    """An ES256 key, its JWKS served over HTTP on a free loopback port, and a token minter."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "bench-" + os.urandom(4).hex()
        jwk = {**ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": self.kid, "alg": "ES256",
               "use": "sig"}
        body = json.dumps({"keys": [jwk]}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                ok = self.path.split("?", 1)[0] == "/jwks.json"
                payload = body if ok else b'{"error":"not found"}'
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        port = self.server.server_address[1]
        self.issuer = f"http://127.0.0.1:{port}"
        self.url = f"{self.issuer}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def mint(self, count: int, ttl_s: int = 4 * 3600) -> list[str]:
        now = int(time.time())
        header = {"kid": self.kid, "typ": "JWT"}
        return [
            jwt.encode(
                {"iss": self.issuer, "aud": AUDIENCE, "sub": f"bench-user-{i}", "iat": now, "exp": now + ttl_s,
                 "tenant": "bench", "groups": ["bench"]},
                self.key, algorithm="ES256", headers=header,
            )
            for i in range(count)
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def seed_nats(url: str) -> None:
    """The events stream (as the gateway would create it, with bounded size) and the ACL document."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url, name="bench-seed")
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(
            name=STREAM, subjects=["events.>"], storage=StorageType.FILE, max_age=3600.0,
            max_bytes=512 * 1024 * 1024, num_replicas=1, duplicate_window=120.0,
        ))
        kv = await js.create_key_value(bucket=ACL_BUCKET, history=1)
        await kv.put("bench.org", json.dumps({"admins": ["group:bench"]}).encode())
    finally:
        await nc.close()


# --- processes ---------------------------------------------------------------------------------


class Server:
    """The server under test, as a child process: the gateway or the naive app."""

    def __init__(self, kind: str, nats_url: str, jwks: Jwks, logdir: Path, extra_env: dict[str, str],
                 workers: int = 1, cpus: set[int] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.pub_port = self.port  # where the publisher's HTTP requests go (peer servers)
        self.ready_path = "/readyz"
        self.sink: tuple[str, int, str] | None = None  # the publisher's HTTP sink (peer servers); None: JetStream
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("WSGATEWAY_", "BENCH_")) and k != "PROMETHEUS_MULTIPROC_DIR"}
        if kind in peers.KINDS:
            spec = peers.server_spec(kind, logdir, self.port, nats_url, jwks.url, jwks.issuer, AUDIENCE)
            cmd, self.pub_port, self.ready_path, self.sink = spec.cmd, spec.pub_port, spec.ready_path, spec.sink
            env.update(spec.env)
            extra_env = {}  # --server-env is for the gateway's settings
        elif kind in GATEWAY_KINDS:
            cmd = [str(Path(sys.executable).parent / "wsgateway"), "serve", "--workers", str(workers),
                   "--host", "127.0.0.1"]
            env.update({
                "WSGATEWAY_NATS_URL": nats_url, "WSGATEWAY_JWKS_URL": jwks.url, "WSGATEWAY_AUDIENCE": AUDIENCE,
                "WSGATEWAY_PORT": str(self.port), "WSGATEWAY_LOG_LEVEL": "warning",
            })
        else:
            cmd = [sys.executable, "-m", "uvicorn", "naive_app:app", "--app-dir", str(BENCH_DIR),
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
            env.update({"BENCH_NATS_URL": nats_url, "BENCH_JWKS_URL": jwks.url, "BENCH_AUDIENCE": AUDIENCE,
                        "BENCH_ISSUER": jwks.issuer})
        env.update(extra_env)
        self.logfile = logdir / f"{kind}-{self.port}.log"
        self._log = open(self.logfile, "wb")
        def setup() -> None:
            child_setup()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=logdir,
            preexec_fn=setup,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        raise TimeoutError(f"{self.kind} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Children:
    """The load-client processes and the publisher process, driven over pipes."""

    def __init__(self, nclients: int, tokens: list[str], nats_url: str, client_binary: Path | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.clients: list[Any] = []
        self.c_clients: list[cload.CLoadClient] = []
        for i in range(nclients):
            if client_binary is not None:  # --client c: compiled load clients, same interface
                c = cload.CLoadClient(client_binary, i, nclients, tokens[i::nclients])
                self.c_clients.append(c)
                self.clients.append(c)
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(target=wsload.main, args=(child, i, nclients, tokens[i::nclients]),
                            name=f"bench-load-{i}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.clients.append(parent)
        parent, child = ctx.Pipe()
        p = ctx.Process(target=pubload.main, args=(child, nats_url, STREAM),
                        name="bench-publisher", daemon=True)
        p.start()
        child.close()
        self.procs.append(p)
        self.publisher = parent
        self.client_pids = [self.expect(c, "ready", 60)[1] for c in self.clients]
        self.publisher_pid = self.expect(self.publisher, "ready", 30)[1]

    @staticmethod
    def expect(pipe: Any, kind: str, timeout: float) -> tuple[Any, ...]:
        if not pipe.poll(timeout):
            raise TimeoutError(f"no {kind!r} from a benchmark child within {timeout}s")
        msg = pipe.recv()
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from a benchmark child, got {msg[0]!r}")
        return tuple(msg)

    def all(self, cmd: tuple[Any, ...], answer: str, timeout: float = 60) -> list[tuple[Any, ...]]:
        for c in self.clients:
            c.send(cmd)
        return [self.expect(c, answer, timeout) for c in self.clients]

    def connect(self, port: int, per_process: int, nscopes: int, timeout: float,
                kind: str = "gateway", deflate: bool | None = None) -> tuple[int, Counter[str], float]:
        """Open connections; `deflate` True / False: they offer permessage-deflate or not (compiled client
        only), None: the load clients' default (WSLOAD_DEFLATE, --compress)."""
        path, mode = peers.ws_endpoint(kind)
        cmd: tuple[Any, ...] = ("connect", "127.0.0.1", port, path, per_process, nscopes, 64)
        if mode != "gateway" or deflate is not None:  # only the compiled client speaks the peers' handshakes
            cmd = (*cmd, mode) if deflate is None else (*cmd, mode, deflate)
        replies = self.all(cmd, "connected", timeout)
        errors: Counter[str] = Counter()
        for r in replies:
            errors.update(r[2])
        return sum(r[1] for r in replies), errors, max(r[3] for r in replies)

    def close(self) -> None:
        for pipe in [*self.clients, self.publisher]:
            with contextlib.suppress(Exception):
                pipe.send(("exit",))
        for c in self.c_clients:
            c.close()
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join()


# --- measurement -------------------------------------------------------------------------------


def host_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat (busy excludes steal)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    idle = parts[3] + parts[4]
    steal = parts[7]
    total = sum(parts[:8])
    return total - idle - steal, steal, total


def scrape_gateway(port: int) -> dict[str, Any]:
    """Delivery-latency buckets (summed over kinds), delivered count and consumer lag from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    buckets: dict[float, float] = {}
    out: dict[str, Any] = {"buckets": buckets, "delivered": 0.0, "lag": 0.0}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "wsgateway_delivery_latency_seconds_bucket":
                le = float(smp.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + smp.value
            elif smp.name == "wsgateway_events_delivered_total":
                out["delivered"] += smp.value
            elif smp.name == "wsgateway_consumer_lag":
                out["lag"] = max(out["lag"], smp.value)
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """q-quantile (ms, linear within a bucket) of the observations added between two bucket snapshots."""
    les = sorted(after)
    cum = [after[le] - before.get(le, 0.0) for le in les]
    if not cum or cum[-1] <= 0:
        return float("nan")
    rank = q * cum[-1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, cum, strict=True):
        if c >= rank:
            if le == float("inf"):
                return prev_le * 1000
            frac = (rank - prev_c) / (c - prev_c) if c > prev_c else 1.0
            return (prev_le + frac * (le - prev_le)) * 1000
        prev_le, prev_c = le, c
    return float("nan")


@dataclass
class Step:
    server: str
    connections: int
    run: int
    fraction: float
    target_rate: int
    slo_ms: float
    offered: float = 0.0
    achieved: float = 0.0
    p50: float = float("nan")
    p99: float = float("nan")
    p999: float = float("nan")
    max_ms: float = float("nan")
    p50_first_s: float = float("nan")  # p50 of roughly the first and last tenth of the window (trend)
    p50_last_s: float = float("nan")
    gw_p50: float = float("nan")  # gateway's own view: envelope time -> socket write (its /metrics)
    gw_p99: float = float("nan")
    gw_delivered: float = 0.0
    gw_lag: float = 0.0
    samples: int = 0
    window_s: float = 0.0
    cpu_wall_s: float = 0.0  # wall time between the CPU readings (window_s unless this driver ran late)
    server_cpu: float = 0.0
    nats_cpu: float = 0.0
    clients_cpu: float = 0.0
    publisher_cpu: float = 0.0
    host_busy: float = 0.0  # % of all cores
    steal: float = 0.0  # % of all cores taken by the hypervisor (VM steal time)
    other_cpu: float = 0.0  # % of one core: busy time not in our processes (other tenants, softirq)
    cpu_us_per_delivery: float = float("nan")
    # the server's utime and stime apart (/proc/<pid>/stat): the user space is the gateway's own code, the
    # system time mostly the kernel's loopback send, the floor of any server
    user_us_per_delivery: float = float("nan")
    sys_us_per_delivery: float = float("nan")
    published: int = 0
    publish_errors: dict[str, int] = field(default_factory=dict)
    publisher_max_behind: int = 0
    lost: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    # the window's totals over the compiled load clients (bench/wsload.c `report`): bytes received (the
    # server's WebSocket frames as sent: headers, pings and all; TCP/IP headers not included), data frames,
    # compressed ones (RSV1) and their payload bytes after inflating; 0 with the Python client
    wire_bytes: int = 0
    frames: int = 0
    compressed_frames: int = 0
    payload_bytes: int = 0
    payload: str = "padded"  # the events' padding (bench/pubload.py make_event)
    drained: bool = True
    drain_s: float = 0.0
    passed: bool = False
    repeat: int = 0  # 1: the repeat of a disturbed step (both are kept)


@dataclass
class Point:
    server: str
    connections: int
    run: int
    connected: int = 0
    connect_s: float = 0.0
    connect_errors: dict[str, int] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    rss_per_conn_kib: float = float("nan")
    server_fds: int = 0  # open descriptors of the server (its largest process) with every client connected
    server_fd_limit: int = 0  # its RLIMIT_NOFILE: one process holds at most limit - (fds - connected) clients
    steps: list[Step] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="wsgw-bench-"))
        self.stack = contextlib.ExitStack()
        self.points: list[Point] = []
        self.profiles: dict[str, Any] = {}
        self.payload = "padded"  # what the publisher pads its events with (bench/pubload.py PAYLOADS)

    # lifecycle

    def __enter__(self) -> Bench:
        a = self.args
        self.stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.code = snapshot_gateway(self.tmp / "src")
        log(f"measuring the gateway as of {self.code['describe']} (code snapshot {self.code['sha256'][:12]}, "
            f"run from {self.code['path']})")
        paths = [a.user_env.get("PYTHONPATH"), self.code["path"], os.environ.get("PYTHONPATH")]
        a.server_env = {**a.user_env, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        self.baseline_code: dict[str, str] | None = None
        self.baseline_env: dict[str, str] = {}
        if a.baseline:
            self.baseline_code = snapshot_revision(a.baseline, self.tmp / "baseline")
            log(f"baseline: the gateway as of {self.baseline_code['describe']} ({a.baseline}; code snapshot "
                f"{self.baseline_code['sha256'][:12]}, run from {self.baseline_code['path']})")
            paths = [a.user_env.get("PYTHONPATH"), self.baseline_code["path"], os.environ.get("PYTHONPATH")]
            self.baseline_env = {**a.user_env, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
            for code, env in ((self.code, a.server_env), (self.baseline_code, self.baseline_env)):
                check_snapshot_imports(Path(code["path"]), env["PYTHONPATH"])
        self.nats = NatsProcess(store_dir=self.tmp / "nats")
        self.nats.start()
        self.stack.callback(self.nats.stop)
        self.jwks = Jwks()
        self.stack.callback(self.jwks.close)
        asyncio.run(seed_nats(self.nats.url))
        n_tokens = max(a.connections) + 64
        t0 = time.monotonic()
        tokens = self.jwks.mint(n_tokens)
        log(f"nats-server on {self.nats.url}; JWKS on {self.jwks.url}; minted {n_tokens} ES256 tokens in "
            f"{time.monotonic() - t0:.1f}s")
        binary = cload.build(self.tmp) if a.client == "c" else None
        self.children = Children(a.clients, tokens, self.nats.url, binary)
        self.stack.callback(self.children.close)
        self.nats_pid = self.nats.proc.pid if self.nats.proc else 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    # one server, one connection count

    def point(self, kind: str, n: int, run: int, *, profile_dir: Path | None = None) -> Point:
        a = self.args
        ch = self.children
        rate, slo = target_for(n, a.rate, a.slo_ms)
        nscopes = max(1, n // a.fanout)
        per_proc = -(-n // a.clients)
        pt = Point(kind, n, run)
        env = self.baseline_env if kind == "baseline" else a.server_env
        cpus = ({SERVER_CPU} if peers.pinned(kind) else set(range(NCPU))) if a.pin else None
        server = Server(kind, self.nats.url, self.jwks, self.tmp, env, a.workers if kind in GATEWAY_KINDS else 1,
                        cpus)
        try:
            server.wait_ready()
            # Warm-up connections first (imports, first-use allocations are not per-connection cost),
            # then the RSS baseline, then the rest.
            warm_per_proc = min(4, per_proc)
            got_warm, errors, _ = ch.connect(server.port, warm_per_proc, nscopes, 60, kind)
            time.sleep(a.settle)
            pt.rss_before_kib = tree_rss_kib(server.pid)
            got, more_errors, secs = ch.connect(server.port, per_proc, nscopes, 300, kind)
            errors.update(more_errors)
            pt.connected = got_warm + got
            pt.connect_s = secs
            pt.connect_errors = dict(errors)
            time.sleep(a.settle)
            samples = []
            for _ in range(3):
                samples.append(tree_rss_kib(server.pid))
                time.sleep(0.3)
            pt.rss_after_kib = int(statistics.median(samples))
            if got:
                pt.rss_per_conn_kib = (pt.rss_after_kib - pt.rss_before_kib) / got
            pt.server_fds, pt.server_fd_limit = max(fd_usage(p) for p in process_tree(server.pid))
            log(f"{kind:7} n={n} run {run}: {pt.connected} connected (+{got} in {secs:.1f}s"
                f"{', errors ' + str(dict(errors)) if errors else ''}); RSS {pt.rss_before_kib} -> "
                f"{pt.rss_after_kib} KiB = {pt.rss_per_conn_kib:.1f} KiB/conn; {pt.server_fds} fds open of "
                f"{pt.server_fd_limit} ({pt.server_fds - pt.connected} its own)")
            if pt.connected < n * 0.9:
                log(f"{kind}: only {pt.connected}/{n} connections; skipping load steps\n{server.log_tail()}")
                return pt
            fractions = a.gateway_steps if kind in GATEWAY_KINDS else a.naive_steps
            if profile_dir is not None:
                fractions = [1.0]
            def run_step(f: float) -> Step:
                if pt.steps:  # let the previous step's backlog (if any) reach the clients first
                    prev = pt.steps[-1]
                    prev.drained, prev.drain_s = self.drain(a.drain_timeout)
                    if not prev.drained:
                        log(f"{kind}: backlog of the previous step not drained after {prev.drain_s:.0f}s")
                st = self.step(server, pt, f, rate, slo, nscopes, profile_dir)
                pt.steps.append(st)
                if st.other_cpu >= DISTURBED_OTHER_PCT and a.repeat_disturbed and profile_dir is None:
                    # Measured while something else used the machine: measure it again, keep both; the
                    # figures use the less disturbed of the two (effective_steps).
                    log(f"{kind}: step {f:g}x disturbed (other CPU {st.other_cpu:.0f}%): repeating it")
                    st.drained, st.drain_s = self.drain(a.drain_timeout)
                    again = self.step(server, pt, f, rate, slo, nscopes, profile_dir)
                    again.repeat = 1
                    pt.steps.append(again)
                    st = min(st, again, key=lambda x: x.other_cpu)
                return st

            if a.peer_mode and profile_dir is None:
                # The peer comparison: the same absolute rates for every server, ascending until the server
                # is saturated (achieved < 95% of the step's rate, or a connection lost): the highest
                # throughput at any latency is then known (a lower bound if even the top step kept up).
                for f in fractions:
                    st = run_step(f)
                    if peerreport.saturated(st):
                        break
                return pt
            below = [f for f in fractions if f < 1.0]
            for i, f in enumerate(below):
                if run_step(f).passed:
                    continue
                if i == 0:  # even the lowest step missed: halve the rate until one passes (or 1/16)
                    g = f / 2
                    while g >= 1 / 16 and not run_step(g).passed:
                        g /= 2
                break
            if run_step(1.0).passed:
                for f in (f for f in fractions if f > 1.0):
                    if not run_step(f).passed:
                        break
        finally:
            with contextlib.suppress(Exception):
                ch.all(("disconnect",), "disconnected", 30)
            server.stop()
        return pt

    def memprobe(self, n: int, outdir: Path) -> dict[str, Any]:
        """Attribute the gateway's per-connection memory to source lines with tracemalloc (no load)."""
        a = self.args
        ch = self.children
        outdir = outdir.resolve()
        outdir.mkdir(parents=True, exist_ok=True)
        for old in outdir.glob("snap-*.pickle"):
            old.unlink()
        env = {
            "PYTHONPATH": os.pathsep.join([str(BENCH_DIR / "memprobe"), a.server_env["PYTHONPATH"]]),
            "BENCH_TRACEMALLOC_DIR": str(outdir), "BENCH_TRACEMALLOC_FRAMES": "1",
        }
        env = {**a.server_env, **env}
        nscopes = max(1, n // a.fanout)
        per_proc = -(-n // a.clients)
        server = Server("gateway", self.nats.url, self.jwks, self.tmp, env)

        def snapshot(i: int) -> Path:
            server.proc.send_signal(signal.SIGUSR1)
            path = outdir / f"snap-{i}.pickle"
            deadline = time.monotonic() + 120
            while not path.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no tracemalloc snapshot from the gateway:\n{server.log_tail()}")
                time.sleep(0.2)
            return path

        try:
            server.wait_ready()
            ch.connect(server.port, min(4, per_proc), nscopes, 60)
            time.sleep(a.settle)
            rss0, before = tree_rss_kib(server.pid), snapshot(0)
            got, _, _ = ch.connect(server.port, per_proc, nscopes, 300)
            time.sleep(a.settle)
            rss1, after = tree_rss_kib(server.pid), snapshot(1)
        finally:
            with contextlib.suppress(Exception):
                ch.all(("disconnect",), "disconnected", 30)
            server.stop()
        return analyze_snapshots(before, after, got, rss0, rss1)

    def step(self, server: Server, pt: Point, fraction: float, target_rate: int, slo: float, nscopes: int,
             profile_dir: Path | None) -> Step:
        a = self.args
        ch = self.children
        st = Step(server.kind, pt.connections, pt.run, fraction, target_rate, slo, payload=self.payload)
        deliveries = target_rate * fraction
        fanout = pt.connected / nscopes  # subscribers per scope (as connected)
        ev_rate = deliveries / (pt.connections / nscopes)
        t_start = time.time() + 0.3
        w0 = t_start + a.warmup
        duration = a.duration if fraction == 1.0 else a.sweep_duration
        w1 = w0 + duration
        st.window_s = duration
        ch.publisher.send(("run", ev_rate, t_start, w1, nscopes, w0, w1, 1024, server.sink, self.payload))
        ch.all(("measure", w0, w1), "measuring", 10)
        pids = {"server": server.pid, "nats": self.nats_pid, "publisher": ch.publisher_pid}
        time.sleep(max(0.0, w0 - time.time()))
        m0 = scrape_gateway(server.port) if server.kind in GATEWAY_KINDS else {}
        cpu0 = {k: (tree_cpu_seconds if k == "server" else cpu_seconds)(p) for k, p in pids.items()}
        us0 = tree_cpu_times(server.pid)
        cl0 = sum(cpu_seconds(p) for p in ch.client_pids)
        h0 = host_cpu()
        wall0 = time.monotonic()
        spy = perf = None
        if profile_dir is not None and a.perf:
            perf = start_perf(server.pid, duration, profile_dir / f"{server.kind}-{pt.connections}.perf.data")
        elif profile_dir is not None:
            spy = start_py_spy(server.pid, duration, profile_dir / f"{server.kind}-{pt.connections}.txt",
                               a.profile_native)
        time.sleep(max(0.0, w1 - time.time()))
        wall = time.monotonic() - wall0
        st.cpu_wall_s = wall
        cpu1 = {k: (tree_cpu_seconds if k == "server" else cpu_seconds)(p) for k, p in pids.items()}
        us1 = tree_cpu_times(server.pid)
        cl1 = sum(cpu_seconds(p) for p in ch.client_pids)
        h1 = host_cpu()
        m1 = scrape_gateway(server.port) if m0 else {}
        if m0 and m1:
            st.gw_p50 = bucket_quantile(m0["buckets"], m1["buckets"], 0.50)
            st.gw_p99 = bucket_quantile(m0["buckets"], m1["buckets"], 0.99)
            st.gw_delivered = (m1["delivered"] - m0["delivered"]) / wall
            st.gw_lag = m1["lag"]
        st.server_cpu = 100 * (cpu1["server"] - cpu0["server"]) / wall
        st.nats_cpu = 100 * (cpu1["nats"] - cpu0["nats"]) / wall
        st.publisher_cpu = 100 * (cpu1["publisher"] - cpu0["publisher"]) / wall
        st.clients_cpu = 100 * (cl1 - cl0) / wall
        st.host_busy = 100 * (h1[0] - h0[0]) / max(1, h1[2] - h0[2])
        st.steal = 100 * (h1[1] - h0[1]) / max(1, h1[2] - h0[2])
        ours = st.server_cpu + st.nats_cpu + st.publisher_cpu + st.clients_cpu
        st.other_cpu = max(0.0, st.host_busy * NCPU - ours)
        _, sent, _acked, in_window, errors, behind = Children.expect(ch.publisher, "published", 60)
        st.published, st.publish_errors, st.publisher_max_behind = sent, errors, behind
        st.offered = in_window * fanout / duration
        reports = ch.all(("report",), "report", 60)
        lat = array("f")
        first: list[float] = []
        last: list[float] = []
        lost = 0
        closes: Counter[str] = Counter()
        for r in reports:
            mine = array("f")
            mine.frombytes(r[2])
            tenth = len(mine) // 10
            if tenth:
                first.extend(mine[:tenth])
                last.extend(mine[-tenth:])
            lat.extend(mine)
            lost += r[4]
            closes.update({str(k): v for k, v in r[5].items()})
            window = r[7] if len(r) > 7 else {}
            st.wire_bytes += window.get("wire_bytes", 0)
            st.frames += window.get("frames", 0)
            st.compressed_frames += window.get("compressed_frames", 0)
            st.payload_bytes += window.get("payload_bytes", 0)
        st.lost, st.closes = lost, dict(closes)
        st.samples = sum(r[1] for r in reports)
        st.achieved = st.samples / duration
        if st.achieved:
            st.cpu_us_per_delivery = st.server_cpu * 1e4 / st.achieved
            delivered = st.achieved * wall
            st.user_us_per_delivery = (us1[0] - us0[0]) * 1e6 / delivered
            st.sys_us_per_delivery = (us1[1] - us0[1]) * 1e6 / delivered
        values = sorted(lat)
        st.p50, st.p99 = percentile(values, 50), percentile(values, 99)
        st.p999, st.max_ms = percentile(values, 99.9), (values[-1] if values else float("nan"))
        st.p50_first_s, st.p50_last_s = percentile(sorted(first), 50), percentile(sorted(last), 50)
        st.passed = st.p99 <= slo and st.achieved >= 0.95 * st.offered and not lost
        if a.peer_mode:  # a peer's HTTP publish API shares its loop: a server that slows its publisher down
            st.passed = st.passed and st.achieved >= 0.95 * deliveries  # did not take the step's rate
        if spy is not None:
            self.profiles[f"{server.kind}-{pt.connections}"] = finish_py_spy(spy)
        if perf is not None:
            self.profiles[f"{server.kind}-{pt.connections}"] = {**finish_perf(perf), "achieved": st.achieved,
                                                                 "server_cpu": st.server_cpu}
        log(f"{server.kind:7} n={pt.connections} run {pt.run} step {fraction:g}x: offered {st.offered:,.0f}/s "
            f"achieved {st.achieved:,.0f}/s p50 {st.p50:.1f} ms p99 {st.p99:.1f} ms (max {st.max_ms:.0f}; p50 "
            f"{st.p50_first_s:.0f}->{st.p50_last_s:.0f})"
            + (f" [gw-side p50 {st.gw_p50:.1f} p99 {st.gw_p99:.1f} ms, {st.gw_delivered:,.0f}/s, lag "
               f"{st.gw_lag:.0f}]" if m0 else "")
            + " | "
            f"CPU server {st.server_cpu:.0f}% nats {st.nats_cpu:.0f}% clients {st.clients_cpu:.0f}% "
            f"pub {st.publisher_cpu:.0f}% host {st.host_busy:.0f}% | server µs/delivery user "
            f"{st.user_us_per_delivery:.2f} sys {st.sys_us_per_delivery:.2f} | {'PASS' if st.passed else 'miss'}"
            f"{' lost ' + str(lost) if lost else ''}{' closes ' + str(dict(closes)) if closes else ''}"
            f" | other CPU {st.other_cpu:.0f}% steal {st.steal:.0f}%")
        return st

    def drain(self, timeout: float) -> tuple[bool, float]:
        """Wait until the clients stop receiving (the server's backlog is empty), at most `timeout`."""
        t0 = time.monotonic()
        last = -1
        while time.monotonic() - t0 < timeout:
            total = sum(r[1] for r in self.children.all(("count",), "count", 10))
            if total == last:
                return True, time.monotonic() - t0
            last = total
            time.sleep(0.4)
        return False, time.monotonic() - t0


# --- profiling ---------------------------------------------------------------------------------


def start_perf(pid: int, duration: float, out: Path) -> tuple[subprocess.Popen[bytes], Path] | None:
    """`perf record` (software clock, call graphs) of the server process for the window."""
    exe = shutil.which("perf")
    if exe is None:
        log("perf not found: no profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "-F", "499", "-g", "-p", str(pid), "-o", str(out), "--", "sleep", str(duration)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=child_setup), out


def finish_perf(rec: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
    """Shares of the server's CPU samples by object (kernel, interpreter, libc, ...) and by symbol."""
    proc, out = rec
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if not out.exists():
        return {"error": err.decode(errors="replace")[-500:]}

    def report(sort: str, limit: float) -> list[tuple[str, float]]:
        text = subprocess.run(["perf", "report", "-i", str(out), "--stdio", "--no-children", "-g", "none",
                               "--sort", sort, "-q", "--percent-limit", str(limit)],
                              capture_output=True, text=True, timeout=300).stdout
        rows = []
        for line in text.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].endswith("%"):
                rows.append((" ".join(parts[1].split()), float(parts[0].rstrip("%"))))
        return rows

    return {"file": str(out), "tool": "perf", "by_object": report("dso", 0.5), "self": report("dso,sym", 0.7)}


def start_py_spy(
    pid: int, duration: float, out: Path, native: bool = False
) -> tuple[subprocess.Popen[bytes], Path] | None:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        log("py-spy not found in the venv (pip install py-spy): no profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "250",
           "--format", "raw", "--output", str(out), *(["--native"] if native else ["--nonblocking"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=child_setup)
    return proc, out


def finish_py_spy(spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
    proc, out = spy
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if not out.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    return summarize_folded(out)


def summarize_folded(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's folded ('raw') output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [shorten(f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = lambda c: [(f, round(100 * v / total, 1)) for f, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "file": str(path), "self": pct(self_c), "inclusive": pct(incl)}


def shorten(frame: str) -> str:
    """'func (/long/path/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py:12)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if "/src/gateway/" in where:  # the run's code snapshot
        where = "gateway/" + where.split("/src/gateway/", 1)[1]
    elif "/baseline/gateway/" in where:  # --baseline's snapshot
        where = "baseline:gateway/" + where.split("/baseline/gateway/", 1)[1]
    for marker in ("site-packages/", str(BENCH_DIR.parent) + "/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def analyze_snapshots(before: Path, after: Path, conns: int, rss0: int, rss1: int) -> dict[str, Any]:
    import tracemalloc

    s0, s1 = tracemalloc.Snapshot.load(str(before)), tracemalloc.Snapshot.load(str(after))
    traced = sum(st.size for st in s1.statistics("filename")) - sum(st.size for st in s0.statistics("filename"))
    per = max(1, conns)

    def top(key: str, limit: int) -> list[tuple[str, float, float]]:
        rows = []
        for d in s1.compare_to(s0, key)[:limit]:
            frame = d.traceback[0]
            where = shorten(f"x ({frame.filename}:{frame.lineno})")[3:-1] if key == "lineno" else shorten(
                f"x ({frame.filename})")[3:-1]
            rows.append((where, round(d.size_diff / per, 1), round(d.count_diff / per, 2)))
        return rows

    return {
        "connections": conns, "traced_bytes_per_conn": round(traced / per, 1),
        "rss_kib_per_conn_with_tracemalloc": round((rss1 - rss0) / per, 1),
        "by_line": top("lineno", 25), "by_file": top("filename", 15),
    }


def print_memprobe(m: dict[str, Any]) -> None:
    print(f"\ntracemalloc: {m['connections']} idle connections, Python heap +{m['traced_bytes_per_conn'] / 1024:.1f} "
          f"KiB/conn (RSS +{m['rss_kib_per_conn_with_tracemalloc']:.1f} KiB/conn incl. tracemalloc's own overhead)")
    print("  bytes/conn  blocks/conn  allocated at")
    for where, size, count in m["by_line"]:
        print(f"  {size:>10,.0f}  {count:>11.2f}  {where}")
    print("  by file:")
    for where, size, count in m["by_file"]:
        print(f"  {size:>10,.0f}  {count:>11.2f}  {where}")


# --- report ------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop nan
    return statistics.median(values) if values else float("nan")


def summarize(points: list[Point], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    caps: dict[tuple[str, int], dict[str, Any]] = {}
    for n in args.connections:
        for kind in KINDS:
            pts = [p for p in points if p.server == kind and p.connections == n]
            if not pts:
                continue
            rss = med([p.rss_per_conn_kib for p in pts])
            fractions = sorted({s.fraction for p in pts for s in p.steps})
            for f in fractions:
                steps = [s for p in pts for s in effective_steps(p) if s.fraction == f]
                rows.append({
                    "server": kind, "connections": n, "fraction": f, "target_rate": steps[0].target_rate,
                    "slo_ms": steps[0].slo_ms, "runs": len(steps),
                    "offered": med([s.offered for s in steps]), "achieved": med([s.achieved for s in steps]),
                    "p50_ms": med([s.p50 for s in steps]), "p99_ms": med([s.p99 for s in steps]),
                    "server_cpu": med([s.server_cpu for s in steps]),
                    "cpu_us_per_delivery": med([s.cpu_us_per_delivery for s in steps]),
                    "user_us_per_delivery": med([s.user_us_per_delivery for s in steps]),
                    "sys_us_per_delivery": med([s.sys_us_per_delivery for s in steps]),
                    "other_cpu": med([s.other_cpu for s in steps]),
                    "steal": med([s.steal for s in steps]),
                    "host_busy": med([s.host_busy for s in steps]),
                    "rss_kib_per_conn": rss, "passed": sum(s.passed for s in steps),
                })
            # Capacity at the p99 target: per run, the highest achieved rate among passing steps.
            per_run = [max((s.achieved for s in effective_steps(p) if s.passed), default=0.0) for p in pts]
            below = min((s.offered for p in pts for s in p.steps), default=0.0)
            caps[(kind, n)] = {"capacity": med(per_run), "per_run": per_run, "lowest_offered": below,
                               "rss_kib_per_conn": rss}
    summary: dict[str, Any] = {"rows": rows, "capacity": []}
    for n in args.connections:
        g, nv = caps.get(("gateway", n)), caps.get(("naive", n))
        if not g or not nv:
            continue
        ratio = g["capacity"] / nv["capacity"] if nv["capacity"] else float("inf")
        at_target = {}
        for kind in SERVERS:  # gateway, naive
            r = next((r for r in rows if r["server"] == kind and r["connections"] == n and r["fraction"] == 1.0), None)
            at_target[kind] = r["achieved"] if r else float("nan")
        summary["capacity"].append({
            "connections": n, "slo_ms": target_for(n, args.rate, args.slo_ms)[1],
            "gateway_capacity": g["capacity"], "naive_capacity": nv["capacity"],
            "naive_lowest_offered": nv["lowest_offered"], "gateway_lowest_offered": g["lowest_offered"],
            "ratio": ratio,
            "gateway_per_run": g["per_run"], "naive_per_run": nv["per_run"],
            "ratio_at_target_rate": (at_target["gateway"] / at_target["naive"]) if at_target["naive"] else float("inf"),
        })
    if any(p.server == "baseline" for p in points):
        summary["ab"], summary["ab_steps"] = compare_baseline(points, args)
    if args.peer_mode:
        summary["peers"] = peerreport.compare(points, args, effective_steps)
    return summary


def effective_steps(p: Point) -> list[Step]:
    """One step per rate: of a disturbed step and its repeat (--repeat-disturbed), the less disturbed."""
    best: dict[float, Step] = {}
    for s in p.steps:
        if s.fraction not in best or s.other_cpu < best[s.fraction].other_cpu:
            best[s.fraction] = s
    return sorted(best.values(), key=lambda s: s.fraction)


# A step whose busy CPU outside the benchmark's processes (other%, % of one core) reaches this is marked
# in the side-by-side table: it was measured on a disturbed machine.
DISTURBED_OTHER_PCT = 30.0
# The headline figures of --baseline: (key, label, higher is better).
HEADLINE = (
    ("capacity", "deliveries/s within the p99 target", True),
    ("p99_at_target_ms", "p99 ms at the target rate", False),
    ("cpu_s_per_1m", "server CPU s per 1M deliveries, target rate", False),
    ("user_us", "server user µs per delivery, target rate", False),
    ("sys_us", "server system µs per delivery, target rate", False),
    ("rss_kib_per_conn", "RSS KiB per idle connection", False),
)


def headline_per_run(pts: list[Point]) -> dict[str, list[float]]:
    """The headline figures of one server at one connection count, one value per run (in run order)."""
    out: dict[str, list[float]] = {key: [] for key, _, _ in HEADLINE}
    for p in sorted(pts, key=lambda p: p.run):
        steps = effective_steps(p)
        target = next((s for s in steps if s.fraction == 1.0), None)
        out["capacity"].append(max((s.achieved for s in steps if s.passed), default=0.0))
        out["p99_at_target_ms"].append(target.p99 if target else float("nan"))
        # µs of server CPU per delivery = s per 1,000,000 deliveries.
        out["cpu_s_per_1m"].append(target.cpu_us_per_delivery if target else float("nan"))
        out["user_us"].append(target.user_us_per_delivery if target else float("nan"))
        out["sys_us"].append(target.sys_us_per_delivery if target else float("nan"))
        out["rss_kib_per_conn"].append(p.rss_per_conn_kib)
    return out


def step_brief(s: Step | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"offered": s.offered, "achieved": s.achieved, "p50_ms": s.p50, "p99_ms": s.p99, "passed": s.passed,
            "server_cpu": s.server_cpu, "cpu_us_per_delivery": s.cpu_us_per_delivery, "host_busy": s.host_busy,
            "user_us_per_delivery": s.user_us_per_delivery, "sys_us_per_delivery": s.sys_us_per_delivery,
            "other_cpu": s.other_cpu, "steal": s.steal,
            "disturbed": s.other_cpu >= DISTURBED_OTHER_PCT}


def compare_baseline(
    points: list[Point], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """gateway vs baseline per connection count: the headline figures (medians over runs, ratio
    gateway/baseline, the values per run) and every step of every run side by side."""
    ab: list[dict[str, Any]] = []
    ab_steps: list[dict[str, Any]] = []
    for n in args.connections:
        g = [p for p in points if p.server == "gateway" and p.connections == n]
        b = [p for p in points if p.server == "baseline" and p.connections == n]
        if not g or not b:
            continue
        rate, slo = target_for(n, args.rate, args.slo_ms)
        runs = sorted({p.run for p in g + b})
        gv, bv = headline_per_run(g), headline_per_run(b)
        figures: dict[str, Any] = {}
        for key, _, higher_better in HEADLINE:
            gm, bm = med(gv[key]), med(bv[key])
            figures[key] = {"gateway": gm, "baseline": bm, "ratio": gm / bm if bm else float("nan"),
                            "higher_is_better": higher_better,
                            "gateway_per_run": gv[key], "baseline_per_run": bv[key]}
        lowest = {kind: min((s.offered for p in pts for s in p.steps), default=0.0)
                  for kind, pts in (("gateway", g), ("baseline", b))}
        load = {}
        for kind, pts in (("gateway", g), ("baseline", b)):
            steps = [s for p in pts for s in p.steps]
            load[kind] = {"host_busy_median": med([s.host_busy for s in steps]),
                          "host_busy_max": max((s.host_busy for s in steps), default=float("nan")),
                          "other_cpu_median": med([s.other_cpu for s in steps]),
                          "other_cpu_max": max((s.other_cpu for s in steps), default=float("nan")),
                          "disturbed_steps": sum(s.other_cpu >= DISTURBED_OTHER_PCT for s in steps)}
        order = {run: [p.server for p in points if p.connections == n and p.run == run] for run in runs}
        ab.append({"connections": n, "target_rate": rate, "slo_ms": slo, "runs": runs, "order": order,
                   "figures": figures, "lowest_offered": lowest, "load": load})
        fractions = sorted({s.fraction for p in g + b for s in p.steps})
        for f in fractions:
            for run in runs:
                pair = {}
                for kind, pts in (("gateway", g), ("baseline", b)):
                    pair[kind] = step_brief(next((s for p in pts if p.run == run for s in p.steps
                                                  if s.fraction == f), None))
                if pair["gateway"] or pair["baseline"]:
                    ab_steps.append({"connections": n, "fraction": f, "run": run, **pair})
    return ab, ab_steps


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    out = sys.stdout
    print(f"\nMedians of {args.runs} run(s); window {args.duration:g} s at the target rate, {args.sweep_duration:g} s "
          f"at the other steps, after {args.warmup:g} s warm-up; {args.fanout} subscribers per scope; "
          f"~{pubload.ENVELOPE_BYTES}-byte envelopes; {args.clients} load processes; naive = uvicorn's default "
          f"WebSocket implementation + the same JWT check (PyJWT, JWKS), no ACL. Gateway at {args.code}; "
          f"{NCPU} CPUs."
          + (f" Baseline at {args.baseline_code}." if getattr(args, "baseline_code", "") else "")
          + (f" Server env: {args.user_env}." if args.user_env else "")
          + (" Load clients offer permessage-deflate (--compress)." if getattr(args, "compress", False) else ""),
          file=out)
    head = (f"{'server':8} {'conns':>6} {'step':>6} {'offered/s':>10} {'achieved/s':>11} {'p50 ms':>7} {'p99 ms':>8} "
            f"{'srv CPU%':>8} {'us/deliv':>8} {'user':>5} {'sys':>5} {'host%':>6} {'other%':>6} {'RSS KiB/conn':>12} "
            f"{'p99 ok':>7}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in summary["rows"]:
        print(f"{r['server']:8} {r['connections']:>6} {r['fraction']:>5g}x {r['offered']:>10,.0f} "
              f"{r['achieved']:>11,.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>8.1f} {r['server_cpu']:>8.0f} "
              f"{r['cpu_us_per_delivery']:>8.1f} {r['user_us_per_delivery']:>5.2f} {r['sys_us_per_delivery']:>5.2f} "
              f"{r['host_busy']:>6.0f} {r['other_cpu']:>6.0f} "
              f"{r['rss_kib_per_conn']:>12.1f} "
              f"{r['passed']:>3}/{r['runs']:<3}", file=out)
    print("\nstep = offered rate as a fraction of the target rate; 'p99 ok' = runs in which the step met the p99 "
          "target with achieved >= 95% of offered and no lost connections; srv CPU% = server process, % of one "
          "core; us/deliv = server CPU per delivery (user + sys: µs in user space and in the kernel, from utime and "
          "stime); host% = busy share of all cores (load clients, publisher, "
          "nats-server and other tenants of the machine included); other% = busy CPU outside the benchmark's "
          "processes (other tenants, unattributed kernel time), % of one core.", file=out)
    others = [s for r in summary["rows"] for s in [r["other_cpu"]] if s == s]
    if others:
        print(f"Machine noise: median other% over all steps {statistics.median(others):.0f} (of {NCPU * 100}).",
              file=out)
    if summary.get("ab"):
        print_ab(summary, args)
    if summary.get("peers"):
        peerreport.print_markdown(summary["peers"], out)
    if not summary["capacity"]:
        return
    head = (f"\n{'conns':>6} {'p99 target':>10} {'gateway/s':>10} {'naive/s':>10} {'gw/naive':>9} "
            f"{'at target rate':>14}")
    print(head, file=out)
    print("-" * (len(head) - 1), file=out)
    for c in summary["capacity"]:
        if not c["gateway_capacity"]:
            ratio = "n/a"
        elif c["naive_capacity"]:
            ratio = f"{c['ratio']:.2f}x"
        else:
            ratio = f">{c['gateway_capacity'] / max(1, c['naive_lowest_offered']):.1f}x"
        naive = f"{c['naive_capacity']:,.0f}" if c["naive_capacity"] else f"<{c['naive_lowest_offered']:,.0f}"
        gw = f"{c['gateway_capacity']:,.0f}" if c["gateway_capacity"] else f"<{c['gateway_lowest_offered']:,.0f}"
        print(f"{c['connections']:>6} {c['slo_ms']:>8g} ms {gw:>10} {naive:>10} {ratio:>9} "
              f"{c['ratio_at_target_rate']:>13.2f}x", file=out)
    print("gateway/s, naive/s = achieved deliveries/s at the highest step that met the p99 target (median over "
          "runs; a lower bound: steps are discrete); 'at target rate' = achieved(gateway) / achieved(naive) at "
          "the target offered rate, whatever the latency.", file=out)


def print_ab(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """gateway vs baseline: the headline figures, then every step of every run side by side."""
    out = sys.stdout
    print(f"\nSide by side: gateway = {args.code}; baseline = {args.baseline_code}. Medians over runs; "
          "ratio = gateway / baseline (above 1 is better for deliveries/s, below 1 for the others).", file=out)
    head = f"{'conns':>6}  {'figure':44} {'gateway':>10} {'baseline':>10} {'gw/base':>8}   per run: gateway | baseline"
    print(head, file=out)
    print("-" * len(head), file=out)

    def fmt(key: str, v: float, c: dict[str, Any], kind: str) -> str:
        if v != v:
            return "n/a"
        if key == "capacity":
            return f"{v:,.0f}" if v else f"<{c['lowest_offered'][kind]:,.0f}"
        return f"{v:.2f}" if key in ("user_us", "sys_us") else f"{v:.1f}"

    for c in summary["ab"]:
        for key, label, _ in HEADLINE:
            fig = c["figures"][key]
            if key == "capacity":
                label = f"{label} ({c['slo_ms']:g} ms)"
            elif key == "p99_at_target_ms":
                label = f"{label} ({c['target_rate']:,}/s)"
            ratio = f"{fig['ratio']:.2f}x" if fig["ratio"] == fig["ratio"] else "n/a"
            runs = " ".join(fmt(key, v, c, "gateway") for v in fig["gateway_per_run"]) + " | " + " ".join(
                fmt(key, v, c, "baseline") for v in fig["baseline_per_run"])
            print(f"{c['connections']:>6}  {label:44} {fmt(key, fig['gateway'], c, 'gateway'):>10} "
                  f"{fmt(key, fig['baseline'], c, 'baseline'):>10} {ratio:>8}   {runs}", file=out)
    for c in summary["ab"]:
        order = "; ".join(f"run {r}: {' then '.join(k for k in kinds if k in GATEWAY_KINDS)}"
                          for r, kinds in c["order"].items())
        load = "; ".join(f"{k} steps host% median {v['host_busy_median']:.0f} (max {v['host_busy_max']:.0f}), "
                         f"other% median {v['other_cpu_median']:.0f} (max {v['other_cpu_max']:.0f}), "
                         f"{v['disturbed_steps']} disturbed" for k, v in c["load"].items())
        print(f"n={c['connections']}: {order}. {load}.", file=out)

    print(f"\nEvery step of every run: achieved/s, p99 ms, p99 ok, host% (busy share of all cores), other% (% of "
          f"one core outside the benchmark's processes); * = other% >= {DISTURBED_OTHER_PCT:g}, a disturbed step.",
          file=out)
    side = f"{'p99':>7} {'ok':>2} {'host%':>5} {'other%':>7}"
    head = (f"{'conns':>6} {'step':>6} {'run':>3} | {'gateway/s':>10} {side} | {'baseline/s':>10} {side} | "
            f"{'p99 gw/base':>11}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in summary["ab_steps"]:
        cells = []
        for kind in GATEWAY_KINDS:
            s = r[kind]
            if s is None:
                cells.append(f"{'-':>10} {'':>7} {'':>2} {'':>5} {'':>7}")
                continue
            mark = "*" if s["disturbed"] else " "
            cells.append(f"{s['achieved']:>10,.0f} {s['p99_ms']:>7.1f} {'y' if s['passed'] else 'n':>2} "
                         f"{s['host_busy']:>5.0f} {s['other_cpu']:>6.0f}{mark}")
        ratio = (f"{r['gateway']['p99_ms'] / r['baseline']['p99_ms']:.2f}x"
                 if r["gateway"] and r["baseline"] and r["baseline"]["p99_ms"] else "")
        print(f"{r['connections']:>6} {r['fraction']:>5g}x {r['run']:>3} | {cells[0]} | {cells[1]} | {ratio:>11}",
              file=out)


def print_profiles(profiles: dict[str, Any]) -> None:
    for name, prof in profiles.items():
        if prof.get("tool") == "perf":
            print(f"\nperf profile of {name} (target step: {prof.get('achieved', 0):,.0f} deliveries/s, server CPU "
                  f"{prof.get('server_cpu', 0):.0f}%; {prof['file']}); % of the server's CPU samples")
            print("  by object: " + ", ".join(f"{o} {v:.1f}" for o, v in prof["by_object"]))
            for f, v in prof["self"][:20]:
                print(f"  {v:6.1f}   {f}")
            continue
        print(f"\npy-spy profile of {name} (target step, {prof.get('samples', 0)} samples; "
              f"{prof.get('file', prof.get('error', ''))})")
        if "self" not in prof:
            continue
        print("  self %   function")
        for f, p in prof["self"][:15]:
            print(f"  {p:6.1f}   {f}")
        print("  incl %   function")
        for f, p in prof["inclusive"][:15]:
            print(f"  {p:6.1f}   {f}")


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", default="1000,5000", help="comma-separated connection counts")
    p.add_argument("--runs", type=int, default=3, help="repetitions of every point (medians are reported)")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window per step, seconds")
    p.add_argument("--sweep-duration", type=float, default=4.0,
                   help="measurement window of the steps other than the target rate, seconds")
    p.add_argument("--warmup", type=float, default=1.5, help="publishing before the window opens, seconds")
    p.add_argument("--settle", type=float, default=1.5, help="pause before each RSS reading, seconds")
    p.add_argument("--drain-timeout", type=float, default=5.0, help="max wait for a backlog after a step")
    p.add_argument("--fanout", type=int, default=100, help="subscribers per scope (S = connections / fanout)")
    p.add_argument("--clients", type=int, default=2, help="load-client processes")
    p.add_argument("--workers", type=int, default=1,
                   help="gateway worker processes (`wsgateway serve --workers N`); CPU and RSS are summed")
    p.add_argument("--client", choices=("py", "c"), default="c",
                   help="load client: c (bench/wsload.c, compiled with gcc at start; the default: a fraction of "
                        "the CPU, so more of the machine is left to the server under test) or py (bench/wsload.py)")
    p.add_argument("--rate", default="", help="override offered deliveries/s: 'conns=rate,...'")
    p.add_argument("--gateway-steps", default="0.5,0.625,0.75,0.875,1,1.25,1.5,2",
                   help="offered rates as fractions of the target, ascending while p99 holds (1 always runs)")
    p.add_argument("--naive-steps", default="0.125,0.25,0.375,0.5,0.625,0.75,1",
                   help="as --gateway-steps, for the naive app")
    p.add_argument("--servers", default=None,
                   help="which servers to measure, alternating their order between runs: gateway, naive, baseline "
                        "(needs --baseline), and the peers nchan, centrifugo1, centrifugo, centrifugo1-nats, "
                        "centrifugo-nats (bench/peers.py); default gateway,naive, or gateway,baseline with --baseline")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also measure the gateway of git revision REV as server 'baseline': gateway/ of REV "
                        "(git archive) first on its PYTHONPATH, everything else as for 'gateway'")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server processes (experiments, e.g. "
                        "WSGATEWAY_FLUSH_INTERVAL_MS=2); printed with the results")
    p.add_argument("--slo-ms", type=float, default=None,
                   help="p99 target in ms at every connection count (default: 20 ms up to 1,000 connections, 50 "
                        f"ms above; {PEER_SLO_MS:g} ms at every count when a peer server is measured)")
    p.add_argument("--peer-rates", default=PEER_RATES,
                   help="with a peer server (nchan, centrifugo*): the rate ladder in deliveries/s, the same for "
                        "every server and count, ascending until the server is saturated")
    p.add_argument("--cpu-rate", type=int, default=PEER_CPU_RATE,
                   help="with a peer server: the fixed rate (deliveries/s) at which CPU per delivery is compared "
                        "(its step gets the --duration window); added to --peer-rates")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=NCPU >= 2,
                   help=f"server under test alone on core {SERVER_CPU}, the rest of the benchmark on the other "
                        "cores (default on 2+ cores); kinds centrifugo and centrifugo-nats are never pinned")
    p.add_argument("--repeat-disturbed", action=argparse.BooleanOptionalAction, default=True,
                   help="measure a step again when other%% >= 30 (busy CPU outside the benchmark); both are "
                        "kept, the figures use the less disturbed one")
    p.add_argument("--quick", action="store_true", help="small and fast: 300 connections, 1 run, short windows")
    p.add_argument("--compress", action="store_true",
                   help="the load clients offer permessage-deflate (compiled client with zlib only); the gateway "
                        "and Centrifugo negotiate it (bench/deflatepeer.py compares both modes in one run)")
    p.add_argument("--json", dest="json_out", default=None, help="also write all results to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the runs, profile each server with py-spy at the largest count (target rate)")
    p.add_argument("--memprobe", default=None, metavar="DIR",
                   help="after the runs, attribute the gateway's per-connection memory with tracemalloc")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--perf", default=None, metavar="DIR",
                   help="after the runs, `perf record` every server (any kind) at the largest count at the target "
                        "rate (--cpu-rate with peers): CPU samples by object (kernel / user space) and symbol")
    args = p.parse_args(argv)
    requested = (args.servers or "").split(",")
    unknown = [s for s in requested if s and s not in KINDS]
    if unknown:
        p.error(f"unknown server kind(s) {unknown}: choose from {', '.join(KINDS)}")
    args.peer_mode = any(s in peers.KINDS for s in requested)
    if args.peer_mode and args.client != "c":
        p.error("the peer servers need the compiled load client (--client c)")
    if args.quick:
        args.connections, args.runs, args.duration, args.warmup, args.settle = "300", 1, 3.0, 1.0, 1.0
        args.sweep_duration = 3.0
        args.gateway_steps, args.naive_steps, args.rate = "1", "1", args.rate or "300=15000"
        if args.peer_mode:
            args.peer_rates, args.cpu_rate = "15000", 15000
    args.connections = [int(x) for x in str(args.connections).split(",") if x.strip()]
    args.rate = {int(k): int(v) for k, v in (kv.split("=") for kv in args.rate.split(",") if kv.strip())}
    args.gateway_steps = sorted({float(x) for x in args.gateway_steps.split(",")} | {1.0})
    args.naive_steps = sorted({float(x) for x in args.naive_steps.split(",")} | {1.0})
    if args.peer_mode:
        # One ladder for every server: absolute rates; the fixed CPU rate is the "target" (fraction 1).
        ladder = {int(x) for x in str(args.peer_rates).split(",") if x.strip()} | {args.cpu_rate}
        args.peer_rates = sorted(ladder)
        args.rate = {n: args.cpu_rate for n in args.connections}
        args.gateway_steps = args.naive_steps = [r / args.cpu_rate for r in args.peer_rates]
        if args.slo_ms is None:
            args.slo_ms = PEER_SLO_MS
    if args.servers is None:
        args.servers = "gateway,baseline" if args.baseline else "gateway,naive"
    requested = args.servers.split(",")
    if "baseline" in requested and not args.baseline:
        p.error("--servers baseline needs --baseline REV")
    args.servers = [s for s in requested if s in KINDS]
    if "gateway" not in args.servers and args.peer_mode:
        p.error("the peer comparison measures the gateway beside the peers: add gateway to --servers")
    args.user_env = dict(kv.split("=", 1) for kv in args.server_env)
    args.server_env = dict(args.user_env)
    if args.compress:
        if args.client != "c":
            p.error("--compress needs the compiled load client (--client c)")
        os.environ["WSLOAD_DEFLATE"] = "1"  # inherited by the load clients (bench/wsload.c)
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_nofile()  # per process: the server needs one per connection and its own, each load client its share
    n = max(args.connections)
    if n + FD_MARGIN > limit:
        log(f"warning: file-descriptor limit {limit} per process < {n} connections + {FD_MARGIN} of the server's "
            "own: connections will fail")
    if -(-n // args.clients) + FD_MARGIN > limit:
        log(f"warning: {n} connections over {args.clients} load processes exceed each one's file-descriptor "
            f"limit {limit}: use --clients {load_processes(n, limit)}")
    signal.signal(signal.SIGTERM, _terminate)
    if args.pin:  # inherited by nats-server, the load clients and the publisher; servers set their own
        os.sched_setaffinity(0, set(range(NCPU)) - {SERVER_CPU})
    started = time.monotonic()
    points: list[Point] = []
    profiles: dict[str, Any] = {}
    memprobe: dict[str, Any] = {}
    with Bench(args) as bench:
        for run in range(1, args.runs + 1):
            for n in args.connections:
                order = args.servers if run % 2 else list(reversed(args.servers))
                for kind in order:
                    points.append(bench.point(kind, n, run))
        if args.profile or args.perf:
            prof_dir = Path(args.perf or args.profile)
            n = max(args.connections)
            for kind in args.servers:
                bench.point(kind, n, 0, profile_dir=prof_dir)
            profiles = bench.profiles
        if args.memprobe:
            memprobe = bench.memprobe(max(args.connections), Path(args.memprobe))
        args.code = f"{bench.code['describe']} (snapshot {bench.code['sha256'][:12]})"
        code = bench.code
        baseline_code = bench.baseline_code
        if baseline_code:
            args.baseline_code = f"{baseline_code['describe']} (snapshot {baseline_code['sha256'][:12]})"
    summary = summarize(points, args)
    print_table(summary, args)
    print_profiles(profiles)
    if memprobe:
        print_memprobe(memprobe)
    elapsed = time.monotonic() - started
    print(f"\ntotal time {elapsed:.0f} s", file=sys.stdout)
    if args.json_out:
        doc = {
            "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()), "python": sys.version.split()[0]},
            "gateway_code": code,
            **({"baseline_code": baseline_code} if baseline_code else {}),
            "args": {k: v for k, v in vars(args).items()},
            "summary": summary,
            "points": [point_dict(p) for p in points],
            "profiles": profiles,
            "memprobe": memprobe,
            "elapsed_s": elapsed,
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(doc, indent=1, default=str))
    return 0


def snapshot_gateway(dest: Path) -> dict[str, str]:
    """Copy gateway/ once, so that every server of this run executes the same code even while the
    working tree changes; the servers get the copy first on PYTHONPATH (before the editable install)."""
    src = BENCH_DIR.parent / "gateway"
    shutil.copytree(src, dest / "gateway", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    compiled = build_fastpath(dest)  # the compiled loops from the C source as it is now (never a stale build)
    return {"path": str(dest), "sha256": tree_digest(dest), "describe": git_describe(),
            "compiled_fast_path": str(compiled)}


def tree_digest(dest: Path) -> str:
    """sha256 over the relative paths and contents of the files of dest/gateway."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted((dest / "gateway").rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def snapshot_revision(rev: str, dest: Path) -> dict[str, str]:
    """gateway/ of git revision `rev` (`git archive`) into dest/gateway, for --baseline. The snapshot is
    self-contained: a revision older than a restructuring of gateway/ brings its own module layout."""
    import io
    import tarfile

    root = str(BENCH_DIR.parent)

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        archive = subprocess.run(["git", "-C", root, "archive", "--format=tar", commit, "gateway"],
                                 capture_output=True, check=True, timeout=120).stdout
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise SystemExit(f"--baseline {rev}: no gateway/ at that revision ({err.strip() or 'not a commit'})") from e
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    compiled = build_fastpath(dest)  # a revision with gateway/core/_fastpath.c: built as its install would
    return {"rev": rev, "compiled_fast_path": str(compiled), "commit": commit,
            "describe": git("rev-parse", "--short", commit),
            "subject": git("log", "-1", "--format=%s", commit), "date": git("log", "-1", "--format=%cI", commit),
            "path": str(dest), "sha256": tree_digest(dest)}


def check_snapshot_imports(snapshot: Path, pythonpath: str) -> None:
    """With this PYTHONPATH, `gateway.cli` (what `wsgateway serve` imports) and everything it imports of
    gateway must come from the snapshot: the editable install's finder would silently fill in a module
    the snapshot lacks from the working tree."""
    code = ("import json, sys, gateway.cli; print(json.dumps({n: getattr(m, '__file__', None) "
            "for n, m in sys.modules.items() if n == 'gateway' or n.startswith('gateway.')}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WSGATEWAY_", "BENCH_"))}
    env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=snapshot.parent, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"importing gateway.cli from {snapshot} failed:\n{proc.stderr[-2000:]}")
    modules: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    root = snapshot.resolve()
    outside = {n: f for n, f in modules.items() if f and not Path(f).resolve().is_relative_to(root)}
    if outside:
        raise RuntimeError(f"modules not from the snapshot {snapshot}: {outside}")


def git_describe() -> str:
    """The commit the gateway was measured at, with '+dirty' when gateway/ has uncommitted changes."""
    root = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "gateway"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def point_dict(p: Point) -> dict[str, Any]:
    d = dict(vars(p))
    d["steps"] = [dict(vars(s)) for s in p.steps]
    return d


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted: children stopped")
        sys.exit(130)
