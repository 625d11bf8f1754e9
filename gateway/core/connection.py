"""One client connection's state, and the states it moves through.

Only the hub and its parts (index, writer, expiry) write a `Connection`; sessions, the SSE endpoint and
the replayer read it and ask the hub for changes. The state is explicit, with checked transitions (in
the manner of Starlette's `WebSocketState`):

    HANDSHAKING --> LIVE <--> REPLAYING
        |            |            |
        |            +--> DRAINING <+
        v            v        |
      CLOSED <-------+--------+

- HANDSHAKING: authenticated, not yet in the hub.
- LIVE: frames are written as they are queued.
- REPLAYING: a resume is reading the stream back; live frames are *held* in `frames` while the replay's
  own frames go out through `replay_queue`; `end_replay` releases the held frames (an exact seam).
- DRAINING: closing gracefully: what may be written is written, then the close frame.
- CLOSED: gone from the hub; nothing is queued or written any more.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.core.channel import Channel, WritableFlag
from gateway.core.queue import SendQueue
from gateway.principal import Principal

if TYPE_CHECKING:
    from gateway.core.index import Subscription, WildSubscription
    from gateway.core.queue import OutFrame


class ConnState(enum.Enum):
    HANDSHAKING = 0
    LIVE = 1
    REPLAYING = 2
    DRAINING = 3
    CLOSED = 4


_TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.HANDSHAKING: frozenset({ConnState.LIVE, ConnState.CLOSED}),
    ConnState.LIVE: frozenset({ConnState.REPLAYING, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.REPLAYING: frozenset({ConnState.LIVE, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.DRAINING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}


class Owner(Protocol):
    """What a connection tells its owner (the hub) when its channel reports something."""

    def resume(self, conn: Connection) -> None: ...
    def remove(self, conn: Connection) -> None: ...
    def go_away(self, conn: Connection) -> None: ...


class StateError(RuntimeError):
    """A transition the state machine does not allow: a bug in the hub, never a client's doing."""


class Connection(SendQueue):
    """Gateway-side state of one authenticated WebSocket or SSE stream.

    A connection is itself the queue of its live frames (`frames`, `nbytes`, held while REPLAYING): fan-out
    and the writer touch one object per connection, not two (docs/performance.md, issue 10)."""

    __slots__ = (
        "channel", "cursor", "dirty", "encode", "expires", "flag", "id", "last_seq", "native", "owner", "principal",
        "replay_queue", "state", "subs", "waiter", "wild", "write", "written",
    )

    def __init__(
        self, channel: Channel, principal: Principal, conn_id: str, *, cursor: int | None = None,
        owner: Owner | None = None,
    ) -> None:
        super().__init__()  # the live queue: empty
        self.owner = owner  # the hub; the channel's callbacks are this connection's bound methods (small)
        self.channel = channel
        self.principal = principal
        self.id = conn_id
        self.state = ConnState.HANDSHAKING
        self.replay_queue: SendQueue | None = None  # the replay's frames, only while REPLAYING
        self.waiter: Callable[[], None] | None = None  # a replay waiting for its frames to be written
        self.last_seq = 0  # highest event sequence queued for this client: never send one twice
        self.written = 0  # highest event sequence handed to the channel (the client's cursor at a close)
        self.cursor = cursor  # connected with ?since=N: every subscription resumes from a cursor
        self.subs: dict[str, Subscription] = {}
        self.wild: WildSubscription | None = None
        self.dirty = False  # in the writer's list for the next flush
        self.expires = 0.0  # wall-clock time at which the session ends with 4408 (0: not armed)
        self.encode: Callable[[list[OutFrame]], bytes] = channel.encode  # the channel's wire encoding, bound once
        self.native = channel.frames_are_wire  # the frames' own bytes are the wire form (WebSocket)
        # the channel's fast path (write without checks, writable flag), used by the writer only
        self.write: Callable[[bytes], object]
        self.flag: WritableFlag
        self.write, self.flag = channel.fast_path()

    # the channel's callbacks: bound methods (64 bytes each), not closures (about 300 bytes each), since a
    # gateway holds tens of thousands of idle connections
    def channel_writable(self) -> None:
        if self.owner is not None:
            self.owner.resume(self)

    def channel_lost(self) -> None:
        if self.owner is not None:
            self.owner.remove(self)

    def channel_shutdown(self) -> None:
        if self.owner is not None:
            self.owner.go_away(self)

    def __bool__(self) -> bool:
        return True  # a connection, not its queue: never falsy because nothing is queued

    @property
    def queue(self) -> SendQueue:
        """The queue of live frames: the connection itself (for readers; the hot paths use `frames`)."""
        return self

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED or self.state is ConnState.DRAINING

    def move(self, to: ConnState) -> None:
        """Change state; raises StateError for a transition the diagram above does not have."""
        if to not in _TRANSITIONS[self.state]:
            raise StateError(f"connection {self.id}: {self.state.name} -> {to.name} is not allowed")
        self.state = to


__all__ = ["ConnState", "Connection", "StateError"]
