"""Storm-client process for bench/storm.py: WebSocket clients that keep a cursor and resume elsewhere.

Each client connects to its home instance with `?scope=conversation:c<N>` and records every event
frame's `seq` (a `seq` not above the last one is counted as doubled and dropped) and, for clients that
stay, the publish-to-receive delay. When its home instance dies (the connection is lost), a client
that was told to fail over waits a random 0..jitter s and connects to the other instance with
`?scope=...&since=<last seq>` (retrying every 0.2 s while the connection fails). It notes when its
connection was lost, when the new `subscribed` frame arrived, and when it was live again: the receive
time of the first event published after that `subscribed` frame (every such event has `seq > T`, so
it arrives after the whole replay). Frames are parsed from the bytes like bench/wsload.py (the raw
RFC 6455 client there): no JSON parsing per frame.

Driven by bench/storm.py over a multiprocessing pipe:
  ("connect", host, port_home, port_other)  -> ("connected", ok, errors, seconds)
  ("measure", w0, w1)                        -> ("measuring",)   stayers' delay samples in [w0, w1)
  ("report",)                                -> ("report", clients, samples)
  ("exit",)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import re
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

from benchutil import die_with_parent, raise_nofile, recv_blocking, send_blocking
from wsload import GUID, mask_frame

T_KEY = b'"t":'
SEQ_KEY = b'"seq":'
ACK_SEQ = re.compile(rb'"seq":(\d+)')

W0 = float("inf")
W1 = float("-inf")
SAMPLES = array("f")  # stayers: publish-to-receive delay in ms of events received in [W0, W1)


class StormClient(asyncio.Protocol):
    def __init__(self, proc: StormProcess, local: int, scope_n: int, stays: bool) -> None:
        self.proc = proc
        self.local = local
        self.scope_n = scope_n
        self.stays = stays  # connected to the instance that survives: never leaves
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.accept = b""
        self.request = b""
        self.subscribed: asyncio.Future[None] | None = None
        self.seqs = array("q")
        self.last = 0
        self.first = -1  # `seq` of the first subscription: events after it are this client's to get
        self.doubled = 0
        self.closes: dict[int, int] = {}
        self.lost_at = 0.0  # wall-clock time the home connection was lost (0: never)
        self.resub_at = 0.0  # ... the `subscribed` frame of the resumed connection arrived
        self.live_at = 0.0  # ... the first event published after `resub_at` arrived
        self.attempts = 0
        self.resumed = False

    def start(self, host: str, port: int, since: int | None) -> None:
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).lower()
        path = f"/v1/ws?scope=conversation:c{self.scope_n}" + ("" if since is None else f"&since={since}")
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {self.proc.tokens[self.local]}\r\n\r\n"
        ).encode()
        self.buf = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.open
        self.open = False
        self.transport = None
        if self.subscribed is not None and not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"lost before subscribed: {exc}"))
        if was_open and not self.resumed and not self.stays and self.proc.failover:
            self.lost_at = time.time()
            self.resumed = True
            self.proc.spawn(self.proc.resume(self))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head = data[:end].lower()
            if not head.startswith(b"http/1.1 101") or (b"sec-websocket-accept: " + self.accept) not in head:
                self.closes[0] = self.closes.get(0, 0) + 1
                if self.transport is not None:
                    self.transport.abort()
                return
            self.open = True
            data = data[end + 4 :]
        now = time.time()
        n = len(data)
        pos = 0
        find = data.find
        while n - pos >= 2:
            ln = data[pos + 1]
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + ln
            if end > n:
                break
            op = data[pos] & 0x0F
            pos = end
            if op == 1:
                i = find(T_KEY, start, end)
                if i >= 0:
                    j = find(SEQ_KEY, start, end) + 6
                    seq = int(data[j : find(b",", j, end)])
                    if seq <= self.last:
                        self.doubled += 1
                        continue
                    self.last = seq
                    self.seqs.append(seq)
                    i += 4
                    t = float(data[i : find(b",", i, end)])
                    if self.stays:
                        if W0 <= now < W1:
                            SAMPLES.append((now - t) * 1000.0)
                    elif self.resub_at and not self.live_at and t >= self.resub_at:
                        self.live_at = now
                    continue
                self.control(data[start:end], now)
            elif op == 9:
                if self.transport is not None:
                    self.transport.write(mask_frame(0xA, data[start:end]))
            elif op == 8:
                code = int.from_bytes(data[start : start + 2], "big") if ln >= 2 else 1005
                self.closes[code] = self.closes.get(code, 0) + 1
        if pos < n:
            self.buf = data[pos:]

    def control(self, payload: bytes, now: float) -> None:
        if b'"subscribed"' in payload:
            m = ACK_SEQ.search(payload)
            if self.first < 0 and m is not None:
                self.first = int(m.group(1))
            if self.lost_at and not self.resub_at:
                self.resub_at = now
            if self.subscribed is not None and not self.subscribed.done():
                self.subscribed.set_result(None)

    def summary(self) -> dict[str, Any]:
        return {
            "scope": self.scope_n, "stays": self.stays, "first": self.first, "seqs": self.seqs.tobytes(),
            "doubled": self.doubled, "closes": self.closes, "lost_at": self.lost_at, "resub_at": self.resub_at,
            "live_at": self.live_at, "attempts": self.attempts,
        }


class StormProcess:
    def __init__(self, pipe: Connection, tokens: list[str], plan: list[tuple[int, bool]], jitter: float) -> None:
        self.pipe = pipe
        self.tokens = tokens
        self.jitter = jitter
        self.clients = [StormClient(self, i, scope_n, stays) for i, (scope_n, stays) in enumerate(plan)]
        self.failover = False
        self.host = "127.0.0.1"
        self.port_other = 0
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Future[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def reply(self, *msg: Any) -> None:
        send_blocking(self.pipe, msg)

    def on_command(self) -> None:
        global W0, W1
        cmd, *args = recv_blocking(self.pipe)
        if cmd == "connect":
            self.spawn(self.connect(*args))
        elif cmd == "measure":
            W0, W1 = args
            self.reply("measuring")
        elif cmd == "report":
            W0, W1 = float("inf"), float("-inf")
            self.reply("report", [c.summary() for c in self.clients], SAMPLES.tobytes())
        elif cmd == "exit":
            self.stop.set()

    async def open(self, c: StormClient, port: int, since: int | None) -> None:
        loop = asyncio.get_running_loop()
        c.start(self.host, port, since)
        c.subscribed = loop.create_future()
        await asyncio.wait_for(loop.create_connection(lambda: c, self.host, port), 15)
        await asyncio.wait_for(c.subscribed, 30)

    async def connect(self, host: str, port_home: int, port_stay: int, concurrency: int = 64) -> None:
        """Movers to `port_home`, stayers to `port_stay`; movers fail over to `port_stay`."""
        self.host, self.port_other = host, port_stay
        t0 = time.monotonic()
        sem = asyncio.Semaphore(concurrency)
        errors: dict[str, int] = {}
        ok = 0

        async def one(c: StormClient) -> None:
            nonlocal ok
            async with sem:
                try:
                    await self.open(c, port_stay if c.stays else port_home, None)
                    ok += 1
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"[:160]
                    errors[reason] = errors.get(reason, 0) + 1

        await asyncio.gather(*(one(c) for c in self.clients))
        self.failover = True
        self.reply("connected", ok, errors, time.monotonic() - t0)

    async def resume(self, c: StormClient) -> None:
        await asyncio.sleep(random.uniform(0, self.jitter))
        since = c.last if c.last else max(c.first, 0)
        while True:
            c.attempts += 1
            try:
                await self.open(c, self.port_other, since)
                return
            except Exception:
                if c.transport is not None:
                    c.transport.abort()
                if c.attempts >= 50:
                    return
                await asyncio.sleep(0.2)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        self.reply("ready", os.getpid())
        await self.stop.wait()
        loop.remove_reader(self.pipe.fileno())
        for c in self.clients:
            if c.transport is not None:
                c.transport.abort()


def main(pipe: Connection, tokens: list[str], plan: list[tuple[int, bool]], jitter: float) -> None:
    """Entry point of a storm-client process (multiprocessing target)."""
    die_with_parent()
    raise_nofile()
    import uvloop

    try:
        uvloop.run(StormProcess(pipe, tokens, plan, jitter).run())
    except KeyboardInterrupt:
        pass
