"""Load-client process: many WebSocket connections on one uvloop loop, a lean raw RFC 6455 client.

Each connection does a real client handshake (random Sec-WebSocket-Key, checks Sec-WebSocket-Accept,
`Authorization: Bearer <its own token>`), sends one masked `subscribe` text frame and then parses the
server's unmasked frames straight out of the bytes `data_received` gets: length header, opcode, and
for event frames one `bytes.find` of `"t":` (the publisher's wall-clock time, first key of the
envelope's `data`) and one `float()`. No JSON parsing per frame. Pings are answered with masked pongs.

The parent drives the process through a `multiprocessing` pipe (commands below). Latency samples are
the receive time of the TCP chunk minus the event's publish time, in ms, one per delivered event
frame whose receive time falls inside the measurement window.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

from benchutil import die_with_parent, raise_nofile, recv_blocking, send_blocking

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
T_KEY = b'"t":'

# Process-wide counters (module globals: the cheapest lookups in the hot parser).
W0 = float("inf")  # measurement window [W0, W1) in wall-clock seconds (receive time)
W1 = float("-inf")
SAMPLES = array("f")  # latency in ms of every event frame received inside the window
total_events = 0  # event frames ever received (drain detection)
window_events = 0
bad_frames = 0
closes: dict[int, int] = {}  # close code from the server -> count
lost = 0  # connections lost after they were established


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """One complete client frame (FIN set), masked with a random key as RFC 6455 requires."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if not n:
        return head + key
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


class WSClient(asyncio.Protocol):
    __slots__ = ("accept", "buf", "done", "open", "request", "subscribe", "transport")

    def __init__(self, request: bytes, accept: bytes, subscribe: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.accept = accept
        self.subscribe = subscribe
        self.done = done  # resolved once the server confirmed the subscription
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        global lost
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost before subscribed: {exc}"))
        elif self.open:
            lost += 1
        self.open = False
        self.transport = None

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        global total_events, window_events, bad_frames
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 16384:
                    self.fail("oversized handshake response")
                else:
                    self.buf = data
                return
            head = data[:end].lower()
            if not head.startswith(b"http/1.1 101") or (b"sec-websocket-accept: " + self.accept) not in head:
                self.fail("handshake refused: " + data[: data.find(b"\r\n")].decode("latin-1"))
                return
            self.open = True
            self.transport.write(self.subscribe)  # type: ignore[union-attr]
            data = data[end + 4 :]
            if not data:
                return
        now = time.time()
        rec = W0 <= now < W1
        n = len(data)
        pos = 0
        events = 0
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
            else:  # 127 (a set mask bit would be a protocol error; the gateway never sends one)
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
                    events += 1
                    if rec:
                        i += 4
                        SAMPLES.append((now - float(data[i : find(b",", i, end)])) * 1000.0)
                    continue
                self.control(data[start:end])
            elif op == 9:  # ping: answer with a masked pong carrying the same payload
                self.transport.write(mask_frame(0xA, data[start:end]))  # type: ignore[union-attr]
            elif op == 8:
                code = int.from_bytes(data[start : start + 2], "big") if ln >= 2 else 1005
                closes[code] = closes.get(code, 0) + 1
                self.fail(f"closed by server: {code} {data[start + 2:end][:120]!r}")
                return
            elif op != 0xA:
                bad_frames += 1
        if pos < n:
            self.buf = data[pos:]
        if events:
            total_events += events
            if rec:
                window_events += events

    def control(self, payload: bytes) -> None:
        if b'"subscribed"' in payload:
            if not self.done.done():
                self.done.set_result(None)
        elif b'"error"' in payload:
            self.fail("error frame: " + payload[:200].decode("utf-8", "replace"))


class LoadProcess:
    """The connections of one load process and the command loop that drives them."""

    def __init__(self, pipe: Connection, index: int, nprocs: int, tokens: list[str]) -> None:
        self.pipe = pipe
        self.index = index
        self.nprocs = nprocs
        self.tokens = tokens  # tokens[l] belongs to global connection l * nprocs + index
        self.clients: list[WSClient] = []
        self.next_local = 0  # next local connection index (a failed slot is skipped, never retried)
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Future[None]] = set()

    def reply(self, *msg: Any) -> None:
        send_blocking(self.pipe, msg)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_command(self) -> None:
        cmd, *args = recv_blocking(self.pipe)
        if cmd == "connect":
            self.spawn(self.connect(*args))
        elif cmd == "measure":
            self.measure(*args)
        elif cmd == "report":
            self.report()
        elif cmd == "count":
            self.reply("count", total_events, lost, dict(closes))
        elif cmd == "disconnect":
            self.spawn(self.disconnect())
        elif cmd == "exit":
            self.stop.set()

    async def connect(self, host: str, port: int, path: str, upto: int, nscopes: int, concurrency: int) -> None:
        """Open this process's connections up to local index `upto`; reply with the outcome."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        errors: dict[str, int] = {}
        first = self.next_local
        self.next_local = max(first, upto)
        new: list[WSClient | None] = [None] * max(0, upto - first)

        async def one(local: int) -> None:
            g = local * self.nprocs + self.index
            key = base64.b64encode(os.urandom(16))
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {self.tokens[local]}\r\n\r\n"
            ).encode()
            sub = mask_frame(1, b'{"op":"subscribe","id":1,"scope":"conversation:c%d"}' % (g % nscopes))
            async with sem:
                done: asyncio.Future[None] = loop.create_future()
                client = WSClient(request, accept.lower(), sub, done)
                try:
                    await asyncio.wait_for(loop.create_connection(lambda: client, host, port), 15)
                    await asyncio.wait_for(done, 30)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"[:160]
                    errors[reason] = errors.get(reason, 0) + 1
                    if client.transport is not None:
                        client.transport.abort()
                    return
                new[local - first] = client

        await asyncio.gather(*(one(i) for i in range(first, upto)))
        self.clients.extend(c for c in new if c is not None)
        self.reply("connected", sum(1 for c in new if c is not None), errors, time.monotonic() - t0)

    def measure(self, w0: float, w1: float) -> None:
        global W0, W1, window_events
        del SAMPLES[:]
        window_events = 0
        W0, W1 = w0, w1
        self.reply("measuring")

    def report(self) -> None:
        global W0, W1
        W0, W1 = float("inf"), float("-inf")
        self.reply("report", window_events, SAMPLES.tobytes(), total_events, lost, dict(closes), bad_frames)
        del SAMPLES[:]

    async def disconnect(self) -> None:
        global lost
        close = mask_frame(8, (1000).to_bytes(2, "big"))
        for c in self.clients:
            if c.transport is not None:
                c.open = False  # a deliberate close: not counted as lost
                c.transport.write(close)
                c.transport.close()
        self.clients = []
        self.next_local = 0
        await asyncio.sleep(0.5)
        lost = 0
        closes.clear()
        self.reply("disconnected")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        self.reply("ready", os.getpid())
        await self.stop.wait()
        loop.remove_reader(self.pipe.fileno())
        for c in self.clients:
            if c.transport is not None:
                c.transport.abort()


def main(pipe: Connection, index: int, nprocs: int, tokens: list[str]) -> None:
    """Entry point of a load process (multiprocessing target)."""
    die_with_parent()
    raise_nofile()
    import uvloop

    try:
        uvloop.run(LoadProcess(pipe, index, nprocs, tokens).run())
    except KeyboardInterrupt:
        pass
