"""Calibration: the CPU cost of one small loopback TCP send() on this machine, the floor of any fan-out.

    .venv/bin/python bench/sendcost.py [sockets ...]     # default: 1 1000 5000

The parent opens K connections to a child process that drains them with epoll, then sends 100,000
frames of 340 bytes round-robin with `socket.send` and reports wall time and its own user/system CPU
per send. A WebSocket fan-out that writes each delivery separately cannot do better than this per
delivery (docs/performance.md). Bounded: 100,000 sends per K; the child exits when drained or after 60 s.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import sys
import time

from benchutil import die_with_parent, raise_nofile

SENDS = 100_000
FRAME = b"x" * 340


def drain(listener: socket.socket, k: int, total: int) -> None:
    die_with_parent()
    ep = select.epoll()
    conns: dict[int, socket.socket] = {}
    for _ in range(k):
        c, _ = listener.accept()
        c.setblocking(False)
        ep.register(c.fileno(), select.EPOLLIN)
        conns[c.fileno()] = c
    got = 0
    deadline = time.monotonic() + 60
    while got < total and time.monotonic() < deadline:
        for fd, _ in ep.poll(1):
            try:
                got += len(conns[fd].recv(262144))
            except BlockingIOError:
                pass
    os._exit(0)


def measure(k: int) -> str:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    pid = os.fork()
    if pid == 0:
        drain(listener, k, SENDS * len(FRAME))
    socks = [socket.create_connection(listener.getsockname()) for _ in range(k)]
    try:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for i in range(SENDS):
            socks[i % k].send(FRAME)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.waitpid(pid, 0)
        for s in socks:
            s.close()
        listener.close()
    us = 1e6 / SENDS
    return (f"{k:>6} sockets: {wall * us:5.1f} us wall, {(r1.ru_utime - r0.ru_utime) * us:4.1f} us user, "
            f"{(r1.ru_stime - r0.ru_stime) * us:4.1f} us system per send() of {len(FRAME)} bytes")


if __name__ == "__main__":
    raise_nofile()
    for k in [int(a) for a in sys.argv[1:]] or [1, 1000, 5000]:
        print(measure(k), flush=True)
