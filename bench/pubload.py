"""Publisher process: publishes `bench.tick` events through JetStream on a fixed schedule.

Event k of a step goes to `conversation:c<k mod S>` (subject `events.bench.conversation.c<k mod S>`),
so every scope gets the same share. The schedule is fixed: by wall-clock time `t` the publisher has
started `floor((t - t_start) * rate)` publishes; each is a `js.publish` with its JetStream ack awaited
(pipelined: up to `inflight` acks outstanding). The publish wall-clock time goes into the envelope as
`data.t` (first key, so clients find it in the first bytes) and as the RFC 3339 `time`.

The peer servers of the benchmark take the same events, on the same schedule, over their own HTTP
publish API instead (`sink` of the `run` command; HttpSink): Nchan `POST /pub/c<k>` with the envelope as
the body, Centrifugo `POST /api/publish` with `{"channel": "c<k>", "data": <envelope>}`. Up to
`inflight` requests are outstanding, pipelined over 16 keep-alive connections; a request counts as
acked at its 2xx response.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from benchutil import die_with_parent, recv_blocking, send_blocking

ENVELOPE_BYTES = 300  # target size of the published JSON envelope
# The padding of a `text` event (make_event): an agent's message in words, compressible like prose.
WORDS = ("the agent reads the ticket then calls search with the customer id and summarises what it found "
         "about billing refunds invoices plans limits errors retries and next steps for the support team").split()
PAYLOADS = ("padded", "text")


def make_event(t: float, ident: str, scope_n: int, size: int = ENVELOPE_BYTES,
               payload: str = "padded") -> tuple[str, bytes]:
    """(subject, body) of one valid `bench.tick` event of about `size` bytes: `data.pad` is "x" repeated
    (`padded`, the benchmark's default) or words drawn from WORDS, a different draw per event (`text`)."""
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    head = b'{"data":{"t":%.6f,"pad":"' % t
    tail = b'"},"id":"%s","type":"bench.tick","tenant":"bench","scope":"conversation:c%d","time":"%s"}' % (
        ident.encode(), scope_n, stamp.encode(),
    )
    pad = max(0, size - len(head) - len(tail))
    if payload == "text":
        rnd = random.Random(ident)
        words = " ".join(rnd.choice(WORDS) for _ in range(pad // 2 + 1)).encode()
        return f"events.bench.conversation.c{scope_n}", head + words[:pad] + tail
    return f"events.bench.conversation.c{scope_n}", head + b"x" * pad + tail


class PublisherProcess:
    def __init__(self, pipe: Connection, nats_url: str, stream: str) -> None:
        self.pipe = pipe
        self.nats_url = nats_url
        self.stream = stream
        self.prefix = os.urandom(4).hex()
        self.step = 0
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Future[None]] = set()

    async def run(self) -> None:
        import nats

        nc = await nats.connect(self.nats_url, name="bench-publisher", max_reconnect_attempts=3)
        self.js = nc.jetstream()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        send_blocking(self.pipe, ("ready", os.getpid()))
        await self.stop.wait()
        loop.remove_reader(self.pipe.fileno())
        await nc.drain()

    def on_command(self) -> None:
        cmd, *args = recv_blocking(self.pipe)
        if cmd == "run":
            task = asyncio.ensure_future(self.publish(*args))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif cmd == "exit":
            self.stop.set()

    async def publish(
        self, rate: float, t_start: float, t_end: float, nscopes: int, w0: float, w1: float, inflight: int,
        sink: tuple[Any, ...] | None = None, payload: str = "padded",
    ) -> None:
        self.step += 1
        js, stream = self.js, self.stream
        http = HttpSink(*sink) if sink else None
        sem = asyncio.Semaphore(inflight)
        acked = 0
        errors: dict[str, int] = {}
        in_window = 0
        sent = 0
        max_behind = 0
        tasks: set[asyncio.Task[Any]] = set()

        async def one(subject: str, body: bytes, msg_id: str) -> None:
            nonlocal acked
            try:
                if http is not None:
                    await http.publish(subject.rsplit(".", 1)[1], body)
                else:
                    await js.publish(subject, body, stream=stream, timeout=10, headers={"Nats-Msg-Id": msg_id})
                acked += 1
            except Exception as exc:
                reason = type(exc).__name__
                errors[reason] = errors.get(reason, 0) + 1
            finally:
                sem.release()

        delay = t_start - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while True:
            now = time.time()
            if now >= t_end:
                break
            due = int((now - t_start) * rate)
            max_behind = max(max_behind, due - sent)
            while sent < due:
                await sem.acquire()
                t = time.time()
                if t >= t_end:
                    sem.release()
                    break
                ident = f"{self.prefix}-{self.step}-{sent}"
                subject, body = make_event(t, ident, sent % nscopes, payload=payload)
                if w0 <= t < w1:
                    in_window += 1
                task = asyncio.ensure_future(one(subject, body, ident))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            # Sleep until the next publish is due (at least 1 ms: the loop's timer resolution).
            next_due = t_start + (sent + 1) / rate
            await asyncio.sleep(min(0.01, max(0.001, next_due - time.time())))
        if tasks:
            await asyncio.wait(list(tasks), timeout=15)
        if http is not None:
            http.close()
        send_blocking(self.pipe, ("published", sent, acked, in_window, errors, max_behind))


class HttpSink:
    """HTTP/1.1 publishing to a peer server: a few keep-alive connections, requests pipelined on each.

    Like `js.publish` with acks in flight, a publish does not wait for the previous one's response: its
    request is written at once on the next connection (round robin) and its response is read in order by
    that connection's reader. The caller's semaphore bounds the requests in flight (1,024 by default).
    """

    CONNECTIONS = 16

    def __init__(self, kind: str, port: int, api_key: str = "") -> None:
        if kind not in ("nchan", "centrifugo"):
            raise ValueError(f"unknown HTTP sink {kind!r}")
        self.kind, self.port, self.api_key = kind, port, api_key
        self.conns: list[tuple[asyncio.StreamWriter, deque[asyncio.Future[int]]]] = []
        self.readers: list[asyncio.Task[None]] = []
        self.next = 0
        self.lock = asyncio.Lock()

    def request(self, channel: str, event: bytes) -> bytes:
        if self.kind == "nchan":
            path, body, extra = f"/pub/{channel}", event, b""
        else:
            path = "/api/publish"
            body = b'{"channel":"%s","data":%s}' % (channel.encode(), event)
            extra = b"X-API-Key: %s\r\n" % self.api_key.encode()
        return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n%s\r\n" % (path.encode(), self.port, len(body), extra)) + body

    async def open(self) -> None:
        async with self.lock:
            while len(self.conns) < self.CONNECTIONS:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                waiting: deque[asyncio.Future[int]] = deque()
                self.conns.append((writer, waiting))
                self.readers.append(asyncio.ensure_future(self.read_loop(reader, waiting)))

    @staticmethod
    async def read_loop(reader: asyncio.StreamReader, waiting: deque[asyncio.Future[int]]) -> None:
        try:
            while True:
                status = await read_response(reader)
                fut = waiting.popleft()
                if not fut.done():
                    fut.set_result(status)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError, ValueError) as exc:
            while waiting:
                fut = waiting.popleft()
                if not fut.done():
                    fut.set_exception(ConnectionError(f"publish connection lost: {exc!r}"))

    async def publish(self, channel: str, event: bytes) -> None:
        if len(self.conns) < self.CONNECTIONS:
            await self.open()
        writer, waiting = self.conns[self.next % len(self.conns)]
        self.next += 1
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting.append(fut)
        writer.write(self.request(channel, event))
        status = await fut
        if not 200 <= status < 300:
            raise RuntimeError(f"HTTP {status}")

    def close(self) -> None:
        for writer, _ in self.conns:
            writer.close()
        for task in self.readers:
            task.cancel()
        self.conns.clear()
        self.readers.clear()


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked body); returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


def main(pipe: Connection, nats_url: str, stream: str) -> None:
    """Entry point of the publisher process (multiprocessing target)."""
    die_with_parent()
    import uvloop

    try:
        uvloop.run(PublisherProcess(pipe, nats_url, stream).run())
    except KeyboardInterrupt:
        pass
