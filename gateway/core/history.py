"""Reading retained events back from JetStream: the source of resume, the history API and SSE resume.

A read is an ephemeral pull consumer filtered to one subject (a scope, or a whole tenant), starting at
a stream sequence. Pulling in batches gives natural back-pressure: the next batch is only fetched
once the previous one was written. The consumer is deleted when the read ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamBounds:
    earliest: int  # first sequence still held (0 when the stream is empty)
    latest: int  # last sequence written

    def complete_after(self, after: int) -> bool:
        """The stream still holds every event after `after`: the `recovered` flag of a resume and of a
        history page (false once retention removed part of the range)."""
        return not (self.earliest and after + 1 < self.earliest and self.latest > after)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    subject: str
    data: bytes


class StreamReader:
    def __init__(self, js: JetStreamContext, stream: str) -> None:
        self.js = js
        self.stream = stream

    async def bounds(self) -> StreamBounds:
        info = await self.js.stream_info(self.stream)
        st = info.state
        earliest = int(st.first_seq) if st.messages else 0
        return StreamBounds(earliest=earliest, latest=int(st.last_seq))

    async def read(
        self, subject: str, after: int, *, upto: int | None = None, batch: int = 256, limit: int | None = None
    ) -> AsyncIterator[list[StoredEvent]]:
        """Batches of stored events on `subject` with sequence > after (and <= upto), in order."""
        if upto is not None and upto <= after:
            return
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=AckPolicy.ALL,  # one ack per batch keeps max_ack_pending from stalling the read
            ack_wait=60.0,
            max_ack_pending=-1,
            inactive_threshold=30.0,
            num_replicas=1,
            mem_storage=True,
            filter_subject=subject,
        )
        # Created here, not by pull_subscribe, so its name (given by the server) is known before anything
        # can fail, and the `finally` below deletes exactly this consumer.
        consumer = (await self.js.add_consumer(self.stream, config)).name
        psub: JetStreamContext.PullSubscription | None = None
        returned = 0
        try:
            psub = await self.js.pull_subscribe_bind(consumer, stream=self.stream)
            info = await psub.consumer_info()
            if info.num_pending is None:  # the server always sends it; without it the read has no end
                raise RuntimeError(f"JetStream gave no num_pending for consumer {consumer} on {self.stream}")
            pending = info.num_pending
            while pending > 0:
                want = batch if limit is None else min(batch, limit - returned)
                if want <= 0:
                    return
                msgs: list[Msg] = await psub.fetch(want, timeout=5)
                out: list[StoredEvent] = []
                done = False
                for m in msgs:
                    meta = m.metadata
                    seq = int(meta.sequence.stream)
                    pending = int(meta.num_pending)
                    if upto is not None and seq > upto:
                        done = True
                        break
                    out.append(StoredEvent(seq, m.subject, m.data))
                if msgs:
                    with contextlib.suppress(Exception):
                        await msgs[-1].ack()
                if out:
                    returned += len(out)
                    yield out
                if done or (upto is not None and out and out[-1].seq >= upto):
                    return
        finally:
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.stream, consumer)

    async def scan(
        self, subject: str, upto: int, on_event: Callable[[StoredEvent], None], *, stall_s: float = 30.0,
    ) -> int:
        """Every stored event on `subject` with sequence <= upto, in order, to `on_event`; returns how many.

        For reading a large part of the stream at once (the inbox's start-up load): an ordered push consumer
        from the first sequence, about three times faster than `StreamReader.read`'s pulls in nats-py (no
        round trip and no timed wait per message). Ends at `upto`, or when the consumer has nothing more
        pending; raises TimeoutError when nothing arrives for `stall_s` before that."""
        if upto <= 0:
            return 0
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        count = 0

        async def on_msg(msg: Msg) -> None:
            nonlocal count
            if done.done():
                return
            meta = msg.metadata
            seq = int(meta.sequence.stream)
            if seq <= upto:
                on_event(StoredEvent(seq, msg.subject, msg.data))
                count += 1
            if seq >= upto or not meta.num_pending:
                done.set_result(None)

        sub = await self.js.subscribe(subject, stream=self.stream, cb=on_msg, ordered_consumer=True, idle_heartbeat=2.0,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
                                 pending_msgs_limit=65536)
        try:
            info = await sub.consumer_info()
            # Nothing at all: none pending and none delivered by this consumer. (Its delivered *stream*
            # sequence is no test: on a stream whose head was purged or expired it starts just below the
            # first sequence held, with nothing delivered.)
            if not info.num_pending and (info.delivered is None or not info.delivered.consumer_seq):
                return 0
            seen = -1
            while not done.done():
                if count == seen:
                    raise TimeoutError(f"no event of {subject} for {stall_s:g}s after {count} (reading up to {upto})")
                seen = count
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), stall_s)
            return count
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
