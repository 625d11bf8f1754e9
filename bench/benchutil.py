"""Small helpers shared by the benchmark's processes: fd limit, parent-death signal, /proc readers."""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

from gateway.devtools.ports import free_port as free_port  # the benchmarks' servers take their ports from here

PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# Descriptors a benchmark process holds besides its sockets to the server (stdio, epoll, pipes, its log,
# a NATS connection, a scrape of /metrics): kept free under RLIMIT_NOFILE when connections are planned.
FD_MARGIN = 64


def load_processes(connections: int, fd_limit: int) -> int:
    """How many load-client processes hold `connections` sockets with none above its own fd limit (the
    limit is per process: RLIMIT_NOFILE cannot be raised above the hard limit, splitting can)."""
    return max(1, -(-connections // max(1, fd_limit - FD_MARGIN)))


def fd_usage(pid: int) -> tuple[int, int]:
    """(open descriptors, soft RLIMIT_NOFILE) of a process ((0, 0) if it is gone)."""
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/limits") as f:
            limit = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
    except (OSError, StopIteration, ValueError):
        return 0, 0
    return count, limit


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def child_setup() -> None:
    """preexec_fn for subprocess children: die with the parent (a SIGKILLed bench leaves no orphans)."""
    die_with_parent(signal.SIGTERM)


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds ((0.0, 0.0) if it is gone): user space and kernel apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0, 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0.0 if it is gone)."""
    return sum(cpu_times(pid))


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (e.g. `wsgateway serve --workers N`: the supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) seconds of a process and its live descendants."""
    times = [cpu_times(p) for p in process_tree(pid)]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and its live descendants, in KiB."""
    return sum(rss_kib(p) for p in process_tree(pid))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan if empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def send_blocking(pipe: Any, msg: Any) -> None:
    """Send on a multiprocessing pipe whose fd an event loop watches (uvloop makes it non-blocking)."""
    fd = pipe.fileno()
    os.set_blocking(fd, True)
    try:
        pipe.send(msg)
    finally:
        os.set_blocking(fd, False)


def recv_blocking(pipe: Any) -> Any:
    fd = pipe.fileno()
    os.set_blocking(fd, True)
    try:
        return pipe.recv()
    finally:
        os.set_blocking(fd, False)


def build_fastpath(tree: Path) -> bool:
    """Compile tree/gateway/core/_fastpath.c in place, as the package's install does (setup.py), for a
    snapshot made with `git archive` (which has the C source, not the built module). False when the
    revision has no compiled part or it does not build (its gateway then runs its Python loops)."""
    import sysconfig

    src = tree / "gateway" / "core" / "_fastpath.c"
    if not src.exists():
        return False
    out = src.with_name("_fastpath" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = ["gcc", "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False

