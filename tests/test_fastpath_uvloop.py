"""The fast path on uvloop, the loop `wsgateway serve` runs (uvicorn's choice when uvloop is installed): the
gateway's connections write through the direct `Sink` (gateway/core/fastpath.py), and delivery is what it
is on any loop: complete and in order for a client that reads, 4429 for one that does not. Under both
loops (the `fast_path` fixture): the Python fallback keeps the transport's own write.

The other delivery tests run on pytest's default asyncio loop, whose transports the Sink leaves alone.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import STALLED_HEARTBEAT_S, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wsclient import closed, events, slow_and_fast

pytestmark = pytest.mark.usefixtures("fast_path")

ADMIN = {"admins": ["user:alice"]}


def test_on_uvloop_a_reading_client_gets_everything_in_order_and_a_stalled_one_4429(
    fast_path: str, nats_server: NatsProcess, idp: TestIdP
) -> None:
    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        platform = await Platform.connect(nats_server.url)
        try:
            await platform.grant("acme.org", ADMIN)
            async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, queue_max_messages=50,
                                   heartbeat_s=STALLED_HEARTBEAT_S) as g:
                slow, fast = await slow_and_fast(g.ws, idp.mint("alice"), "conversation:c1")
                writes = {type(c.write).__name__ for c in g.gateway.hub.connections.values()}
                assert writes == ({"Sink"} if fast_path == "c" else {"method"}), writes
                slow.transport.pause_reading()  # the kernel's buffers fill up, then the transport's, then the queue
                n = 600
                reader = asyncio.create_task(events(fast, n, timeout=60))
                for _ in range(n):
                    await platform.publish("acme", "conversation:c1", type="custom.blob", data={"blob": "x" * 32_000})
                got = await reader
                seqs = [e["seq"] for e in got]
                assert len(seqs) == n and seqs == sorted(set(seqs))
                assert await g.metric("wsgateway_slow_client_disconnects_total") == 1
                slow.transport.resume_reading()
                code, reason = await closed(slow)
                assert code == 4429 and "resume" in reason
                await fast.close()
        finally:
            await platform.close()

    uvloop.run(scenario())
