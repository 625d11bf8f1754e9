"""Publisher process: publishes `bench.tick` events through JetStream on a fixed schedule.

Event k of a step goes to `conversation:c<k mod S>` (subject `events.bench.conversation.c<k mod S>`),
so every scope gets the same share. The schedule is fixed: by wall-clock time `t` the publisher has
started `floor((t - t_start) * rate)` publishes; each is a `js.publish` with its JetStream ack awaited
(pipelined: up to `inflight` acks outstanding). The publish wall-clock time goes into the envelope as
`data.t` (first key, so clients find it in the first bytes) and as the RFC 3339 `time`.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from benchutil import die_with_parent, recv_blocking, send_blocking

ENVELOPE_BYTES = 300  # target size of the published JSON envelope


def make_event(t: float, ident: str, scope_n: int, size: int = ENVELOPE_BYTES) -> tuple[str, bytes]:
    """(subject, body) of one valid `bench.tick` event of about `size` bytes."""
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    head = b'{"data":{"t":%.6f,"pad":"' % t
    tail = b'"},"id":"%s","type":"bench.tick","tenant":"bench","scope":"conversation:c%d","time":"%s"}' % (
        ident.encode(), scope_n, stamp.encode(),
    )
    pad = max(0, size - len(head) - len(tail))
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
        self, rate: float, t_start: float, t_end: float, nscopes: int, w0: float, w1: float, inflight: int
    ) -> None:
        self.step += 1
        js, stream = self.js, self.stream
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
                subject, body = make_event(t, ident, sent % nscopes)
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
        send_blocking(self.pipe, ("published", sent, acked, in_window, errors, max_behind))


def main(pipe: Connection, nats_url: str, stream: str) -> None:
    """Entry point of the publisher process (multiprocessing target)."""
    die_with_parent()
    import uvloop

    try:
        uvloop.run(PublisherProcess(pipe, nats_url, stream).run())
    except KeyboardInterrupt:
        pass
