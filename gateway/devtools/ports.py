"""Free TCP ports on the loopback interface, for servers started here (dev mode's nats-server, the tests', the
benchmarks').

They come from below the kernel's ephemeral range: a port that bind(("127.0.0.1", 0)) hands out is an
ephemeral one, and between its release here and the server's own bind any outgoing connection on the
machine (the tests' own clients, other processes) may be given it, so the server fails with EADDRINUSE
(seen with the tests' OpenID provider on a busy machine). Below the range only another server can take it.
"""

from __future__ import annotations

import contextlib
import random
import socket

_LOWEST = 10_000
_RANDOM = random.SystemRandom()  # not the `random` module's state, which pytest-randomly seeds per test


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default if it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bind_one(stack: contextlib.ExitStack, taken: set[int]) -> int:
    top = max(_LOWEST + 1000, _ephemeral_start())
    for _ in range(500):
        port = _RANDOM.randrange(_LOWEST, top)
        if port in taken:
            continue
        s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {_LOWEST} and {top}")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, so none is handed out twice)."""
    taken: set[int] = set()
    with contextlib.ExitStack() as stack:
        return [_bind_one(stack, taken) for _ in range(n)]


def free_port() -> int:
    return free_ports(1)[0]
