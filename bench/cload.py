"""The C load client (bench/wsload.c) behind the interface fanout.py uses for bench/wsload.py.

`fanout.py --client c` runs these instead of the Python load processes: same connections, same
subscriptions, same latency samples, a fraction of the CPU (so the co-located load generator takes
less from the server under test). `CLoadClient` exposes `send(tuple)`, `poll(timeout)` and `recv()`
like a `multiprocessing` pipe end, translating to the C program's line protocol on stdin/stdout.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SOURCE = BENCH_DIR / "wsload.c"


def build(outdir: Path) -> Path:
    """Compile wsload.c with the system C compiler (gcc/cc) into `outdir`; returns the binary."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("--client c needs a C compiler (gcc or cc on PATH)")
    binary = outdir / "wsload"
    zlib = ["-DHAVE_ZLIB", "-lz"] if Path("/usr/include/zlib.h").exists() else []  # for WSLOAD_DEFLATE=1
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(SOURCE), *zlib], check=True)
    return binary


class CLoadClient:
    """One wsload.c process; a duck-typed stand-in for a multiprocessing pipe end."""

    def __init__(self, binary: Path, index: int, nprocs: int, tokens: list[str]) -> None:
        fd, name = tempfile.mkstemp(prefix="wsload-tokens-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(tokens) + "\n")
        self.tokens_file = Path(name)
        self.proc = subprocess.Popen(
            [str(binary), str(index), str(nprocs), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self._buf = b""
        self._pending: tuple[Any, ...] | None = None

    # -- pipe interface -------------------------------------------------------------------------

    def send(self, msg: tuple[Any, ...]) -> None:
        cmd, *args = msg
        if cmd == "connect":
            host, port, path, upto, nscopes, concurrency, *rest = args
            mode = rest[0] if rest else "gateway"
            deflate = f" {int(bool(rest[1]))}" if len(rest) > 1 else ""  # absent: the WSLOAD_DEFLATE default
            line = f"connect {host} {port} {path} {upto} {nscopes} {concurrency} {mode}{deflate}"
        elif cmd == "measure":
            line = f"measure {args[0]!r} {args[1]!r}"
        elif cmd in ("report", "count", "negotiated", "disconnect", "exit"):
            line = cmd
        else:
            raise ValueError(f"unknown load-client command {cmd!r}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def poll(self, timeout: float) -> bool:
        if self._pending is None:
            self._pending = self._read(timeout)
        return self._pending is not None

    def recv(self) -> tuple[Any, ...]:
        if self._pending is None:
            self._pending = self._read(None)
        msg, self._pending = self._pending, None
        if msg is None:
            raise EOFError("the C load client exited")
        return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tokens_file.unlink(missing_ok=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- line protocol --------------------------------------------------------------------------

    def _fill(self, timeout: float | None) -> bool:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise EOFError(f"the C load client exited with {self.proc.wait()}")
        self._buf += chunk
        return True

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill(None)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read(self, timeout: float | None) -> tuple[Any, ...] | None:
        while b"\n" not in self._buf:
            if not self._fill(timeout):
                return None
        line, self._buf = self._buf.split(b"\n", 1)
        kind, _, rest = line.decode().partition(" ")
        if kind == "ready":
            return ("ready", int(rest))
        if kind == "connected":
            ok, secs, errors = rest.split(" ", 2)
            return ("connected", int(ok), json.loads(errors), float(secs))
        if kind == "report":
            window_events, nsamples, total, lost, bad, wire, frames, zframes, payload, closes = rest.split(" ", 9)
            samples = self._read_exact(4 * int(nsamples))
            # the window's bytes: received (the server's frames as sent), data frames, compressed ones, payload
            window = {"wire_bytes": int(wire), "frames": int(frames), "compressed_frames": int(zframes),
                      "payload_bytes": int(payload)}
            return ("report", int(window_events), samples, int(total), int(lost),
                    {int(k): v for k, v in json.loads(closes).items()}, int(bad), window)
        if kind == "negotiated":
            return ("negotiated", {str(k): int(v) for k, v in json.loads(rest).items()})
        if kind == "count":
            total, lost, closes = rest.split(" ", 2)
            return ("count", int(total), int(lost), {int(k): v for k, v in json.loads(closes).items()})
        return (kind,)
