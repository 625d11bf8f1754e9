"""The seam between uvicorn and the fan-out path: a WebSocket protocol class with a raw-write extension.

uvicorn lets an application choose its WebSocket protocol class (`ws=`). Ours is uvicorn's own
wsproto implementation plus one ASGI scope extension, `wsgateway.raw`: a `RawChannel` through which
the gateway writes pre-encoded WebSocket frames straight to the connection's transport. The request
parsing, pings, size limits and the close handshake stay uvicorn's; the hot path (one
`transport.write` of many frames, no await per client) bypasses the ASGI send queue. Added rules:

- a frame that breaks RFC 6455 gets its close frame (1002, 1007 for bad UTF-8) before the connection
  ends, where uvicorn would drop it without one (`handle_close`);
- permessage-deflate is negotiated here (edge/deflate.py), and the 101 is written here (`accept_now`);
- a valid upgrade request that uvicorn's httptools protocol parsed is taken over as it is
  (`upgrade_request`, `GatewayWSProtocol.upgrade`, called by edge/http_protocol.py), not parsed a second
  time by wsproto's handshake (h11); anything unusual, and every rejection, stays wsproto's;
- after the handshake the session may take client events through a callback (`receive_with`), so an
  idle connection keeps no ASGI task or coroutine frames alive.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import contextvars
import logging
import re
import socket
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from hashlib import sha1
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import wsproto.events
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
)
from uvicorn.protocols.websockets.wsproto_impl import WebsocketBuffer, WSProtocol
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ACCEPT_GUID, LocalProtocolError, split_comma_header

from gateway.core import fastpath
from gateway.core.channel import websocket_encode
from gateway.edge.deflate import NAME, Inflate, negotiate

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.core.queue import OutFrame
    from gateway.edge.deflate import Deflater

EXTENSION = "wsgateway.raw"
_UVICORN_ERROR = logging.getLogger("uvicorn.error")  # uvicorn's protocols log there


class RawChannel:
    """Direct, synchronous access to one WebSocket connection's byte stream (a `gateway.core.channel.Channel`)."""

    __slots__ = ("_deflater", "_proto", "on_lost", "on_shutdown", "on_writable")

    kind = "websocket"

    def __init__(self, proto: GatewayWSProtocol) -> None:
        self._proto = proto
        self._deflater: Deflater | None = None
        self.on_writable: Callable[[], None] | None = None
        self.on_shutdown: Callable[[], None] | None = None
        self.on_lost: Callable[[], None] | None = None

    @property
    def compresses(self) -> bool:
        """The client negotiated permessage-deflate (gateway/edge/deflate.py)."""
        return self._proto.inflate is not None

    def compress_with(self, deflater: Deflater) -> None:
        """Write compressed frames from now on (only after `compresses`; before the connection joins the hub,
        which reads `encode` and `frames_are_wire` once)."""
        assert self.compresses
        self._deflater = deflater

    @property
    def frames_are_wire(self) -> bool:
        return self._deflater is None

    @property
    def encode(self) -> Callable[[Sequence[OutFrame]], bytes]:
        return websocket_encode if self._deflater is None else self._deflater.encode

    def fast_path(self) -> tuple[Callable[[bytes], object], _Flag]:
        """The transport's write and the writable flag, for the writer's flush loop (its hottest code).

        Valid until `on_lost` fires or the channel is closed; the hub stops using them at either.
        """
        return self._proto.transport.write, self._proto.flag

    @property
    def open(self) -> bool:
        p = self._proto
        return not p.close_sent and not p.disconnected and not p.transport.is_closing()

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is above its high-water mark (the peer reads slowly)."""
        return self._proto.flag.on

    def write(self, data: bytes) -> bool:
        """Write complete WebSocket frames; False if the connection is no longer open."""
        if not self.open:
            return False
        self._proto.transport.write(data)
        return True

    def limit_kernel_buffer(self, size: int) -> None:
        """Bound the socket's kernel send buffer (SO_SNDBUF); 0 leaves the OS default."""
        if not size:
            return
        fd = self._proto.fd
        if _SOCKETS is not None and fd >= 0:
            _SOCKETS.sndbuf(fd, size)
            return
        sock = self._proto.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake now, even when the transport is paused (a slow client)."""
        self._proto.close_now(code, reason)

    async def accept(self, subprotocol: str | None, *, hold: bool = False) -> bytes:
        """Send the 101 (the ASGI `websocket.accept` without its message, its Starlette wrapper and its
        ASGI send): the session's handshake. The `websocket.connect` event uvicorn queued, which the
        session never reads, is dropped.

        `hold`: the handshake is complete but its 101 is returned, not written: the caller writes it (with
        the connection's first frames) before anything else can be (in the same turn of the loop). b"" when
        the transport is closing (as uvicorn's: nothing is sent)."""
        proto = self._proto
        inbox = proto.queue
        if isinstance(inbox, _Inbox) and inbox._items and inbox._items[0].get("type") == "websocket.connect":
            del inbox._items[0]
        if not proto.flag.on:  # (uvicorn's first step; nothing has been written yet, so never in practice)
            await proto.flag.wait()
        return proto.accept_now(subprotocol, write=not hold)

    def receive_with(self, handler: Callable[[dict[str, Any]], None]) -> None:
        """Client events go to `handler` from now on, not to the ASGI `receive` (see GatewayWSProtocol)."""
        self._proto.receive_with(handler)

    def hold_reading(self) -> None:
        self._proto.hold_reading()

    def release_reading(self) -> None:
        self._proto.release_reading()


class _Inbox:
    """What uvicorn's protocol uses of its per-connection asyncio.Queue (put_nowait, get, empty).

    An asyncio.Queue carries three deques and an Event (~2.4 KiB); a gateway holds tens of thousands of
    mostly idle connections whose inbox is almost always empty, so a list and one waiter do.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class _Direct:
    """The inbox once the session receives through a callback (`GatewayWSProtocol.receive_with`): each event
    uvicorn would queue (`websocket.receive`, `websocket.disconnect`) goes straight to the session's
    handler, synchronously, as it is parsed. Nothing waits for it: no task, no coroutine frames per idle
    connection. A handler that raises is logged and its connection closed (uvicorn's verdict on an app
    that raises)."""

    __slots__ = ("_handler", "_proto")

    def __init__(self, proto: GatewayWSProtocol, handler: Callable[[dict[str, Any]], None]) -> None:
        self._proto = proto
        self._handler = handler

    def put_nowait(self, item: Any) -> None:
        try:
            self._handler(item)
        except Exception:
            self._proto.logger.exception("Exception in ASGI application\n")
            self._proto.transport.close()

    def empty(self) -> bool:
        return True

    async def get(self) -> Any:
        raise RuntimeError("this connection's events go to its handler (receive_with), not to receive()")


# What a connection's scope becomes once its session receives through a callback: the handshake's headers,
# query, path and app state copy are of no use any more (uvicorn reads the scope only while handshaking).
# One dict shared by all such connections: nothing writes a scope after the handshake.
_SPENT_SCOPE: Any = {"type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"}, "path": "",
                     "query_string": b"", "headers": [], "client": None, "server": None, "extensions": {}}


class _Flag:
    """What uvicorn's protocol uses of its `writable` asyncio.Event (set, clear, is_set, wait), lighter.

    `on` is read directly by the hub's flush loop.
    """

    __slots__ = ("_waiters", "on")

    def __init__(self) -> None:
        self.on = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.on

    def set(self) -> None:
        self.on = True
        waiters, self._waiters = self._waiters, None
        for w in waiters or ():
            if not w.done():
                w.set_result(None)

    def clear(self) -> None:
        self.on = False

    async def wait(self) -> None:
        while not self.on:
            w = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(w)
            await w


class _EventList(list[wsproto.events.Event]):
    """What wsproto's Connection does with its `_events` deque (append, popleft, truth), as a list."""

    __slots__ = ()

    def popleft(self) -> wsproto.events.Event:
        return self.pop(0)


_CONTROL_OPCODES: dict[type, int] = {wsproto.events.Ping: 0x89, wsproto.events.Pong: 0x8A}  # FIN + opcode


class _Established:
    """What uvicorn calls on its WSConnection (send, receive_data, events, state) once the upgrade is
    done, served by wsproto's public post-handshake `Connection` alone, made when first used.

    WSConnection keeps the spent HTTP handshake (an H11Handshake and its h11 connection, ~3.4 KiB) for
    the connection's whole life; an idle gateway connection has no use for it. Nor, mostly, for the
    Connection: the session's text frames and the keepalive's pongs are read without it (`client_frames`),
    and the keepalive's pings written without it (`send`), so it is made for the first frame that is none
    of these (a close, a binary frame, a violation), and an idle connection holds none (its making was a
    tenth of a handshake's Python, and it is ~1.5 KiB).
    """

    __slots__ = ("_connection", "_extensions")

    def __init__(self, extensions: list[Extension]) -> None:
        self._extensions = extensions
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        conn = self._connection
        if conn is None:
            conn = self._connection = Connection(ConnectionType.SERVER, self._extensions)
            # wsproto's pending-events deque allocates a 64-slot block (~700 bytes) up front; a list does here
            # (almost always empty; tests/test_uvicorn_seam.py checks what wsproto does with it)
            conn._events = _EventList()  # type: ignore[assignment]
        return conn

    @property
    def state(self) -> ConnectionState:
        conn = self._connection
        return ConnectionState.OPEN if conn is None else conn.state  # a Connection starts OPEN

    def send(self, event: wsproto.events.Event) -> bytes:
        """wsproto's bytes for `event`; a ping or a pong (the keepalive's) written here while no Connection is
        made: an unmasked final control frame, the same bytes wsproto writes (tests/test_uvicorn_seam.py;
        the extension, Inflate, leaves control frames as they are)."""
        if self._connection is None:
            opcode = _CONTROL_OPCODES.get(type(event))
            if opcode is not None:
                payload = bytes(cast("wsproto.events.Ping", event).payload)
                if len(payload) <= 125:
                    return bytes((opcode, len(payload))) + payload
        return self.connection.send(event)

    def receive_data(self, data: bytes | None) -> None:
        self.connection.receive_data(data)

    def events(self) -> Iterator[wsproto.events.Event]:
        yield from self.connection.events()


class _Handshake:
    """The connection's WSConnection until the 101, for an upgrade request that `upgrade_request` already
    read from what uvicorn's httptools protocol parsed: wsproto's handshake (which parses the request again,
    through h11: a tenth of a handshake's CPU) never sees it, unless the app answers with anything but the
    101 (a rejection, uvicorn's 500): then the WSConnection is fed the request as uvicorn would have fed it
    and answers, byte for byte as it does. The 101 itself is written by `GatewayWSProtocol.accept_now`.

    Bytes the client sends before the 101 are dropped, as wsproto's handshake drops them (h11 holds what
    follows an upgrade request, and wsproto never passes it on)."""

    __slots__ = ("_conn", "_raw", "_wsconn")

    def __init__(self, conn: WSConnection | None, raw: Callable[[], bytes]) -> None:
        self._wsconn = conn  # the protocol's fresh WSConnection, fed nothing yet; None: made when needed
        self._raw = raw  # the request as uvicorn re-serializes it for wsproto
        self._conn: WSConnection | None = None

    def _wire(self) -> WSConnection:
        if self._conn is None:
            conn = self._wsconn or WSConnection(connection_type=ConnectionType.SERVER)
            conn.receive_data(self._raw())
            for _ in conn.events():  # the Request event, already handled
                pass
            self._conn = conn
        return self._conn

    @property
    def state(self) -> ConnectionState:
        return ConnectionState.CONNECTING if self._conn is None else self._conn.state

    def send(self, event: wsproto.events.Event) -> bytes:
        return self._wire().send(event)

    def receive_data(self, data: bytes | None) -> None:
        if self._conn is not None:
            self._conn.receive_data(data)

    def events(self) -> Iterator[wsproto.events.Event]:
        if self._conn is not None:
            yield from self._conn.events()


_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")  # h11's field-value (h11/_abnf.py)
_REQUEST_TARGET = re.compile(rb"[\x21-\x7e]+")  # h11's request-target
_BODY_HEADERS = (b"content-length", b"transfer-encoding")


def upgrade_request(
    method: str, target: bytes, headers: Sequence[tuple[bytes, bytes]], *, checked: bool = False
) -> wsproto.events.Request | None:
    """The `Request` event wsproto's server handshake would make of this upgrade request, from what
    uvicorn's httptools protocol parsed (`headers`: lower-case names, in order), or None when wsproto
    would refuse it or any part of it is unusual (a header h11 would not read, a second Host, a body):
    such a request takes uvicorn's own path through wsproto and is answered exactly as before.

    The checks are h11's (on the request uvicorn re-serializes) and wsproto's
    (`H11Handshake._process_connection_request`, the same loop: a later header wins, as there);
    tests/test_uvicorn_seam.py compares the outcome with wsproto's for valid and invalid requests.

    `checked`: the target, names and values already matched a stricter grammar than h11's (the caller's,
    `http_protocol.plain_upgrade`), and are not matched again."""
    if method != "GET" or not (checked or _REQUEST_TARGET.fullmatch(target)):
        return None
    connection: list[str] | None = None
    extensions: list[str] = []
    subprotocols: list[str] = []
    extra: list[tuple[bytes, bytes]] = []
    host: str | None = None
    hosts = 0
    key = version = None
    upgrade = b""
    try:
        for name, value in headers:
            if not checked and (not _HEADER_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value)):
                return None
            if name in _BODY_HEADERS:
                return None
            if name == b"connection":
                connection = split_comma_header(value)
            elif name == b"host":
                hosts += 1
                # an ASCII name without an A-label decodes to itself: the idna codec's work only for the rest
                plain = value.isascii() and b"xn--" not in value.lower()
                host = value.decode("ascii") if plain else value.decode("idna")
                continue
            elif name == b"sec-websocket-extensions":
                extensions.extend(split_comma_header(value))
                continue
            elif name == b"sec-websocket-key":
                key = value
            elif name == b"sec-websocket-protocol":
                subprotocols.extend(split_comma_header(value))
                continue
            elif name == b"sec-websocket-version":
                version = value
            elif name == b"upgrade":
                upgrade = value
            extra.append((name, value))
        path = target.decode("ascii")
    except UnicodeError:
        return None
    if (hosts != 1 or host is None or connection is None or not any(t.lower() == "upgrade" for t in connection)
            or version != b"13" or key is None or upgrade.lower() != b"websocket"):
        return None
    return wsproto.events.Request(host=host, target=path, extensions=extensions, extra_headers=extra,
                                  subprotocols=subprotocols)


def request_bytes(method: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The request as uvicorn's httptools protocol re-serializes it for wsproto (`handle_websocket_upgrade`)."""
    output = [method.encode(), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        output += [name, b": ", value, b"\r\n"]
    output.append(b"\r\n")
    return b"".join(output)


_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HEADER_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]([\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?|")  # no CR/LF
_BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: 40\r\n\r\nupgrade header values must be ASCII text"
)
_CHECKED_DEFAULTS: list[object] = [None]  # the last list of uvicorn's default headers found well-formed


def _check_headers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise LocalProtocolError(f"illegal header {name!r}")  # as h11 would refuse to write it


_INFLATE_CODES = (CloseReason.MESSAGE_TOO_BIG, CloseReason.INVALID_FRAME_PAYLOAD_DATA)


_SOCKETS: Any = fastpath.MODULE  # the compiled helpers (gateway/core/_fastpath.c), None when not built


def endpoints(transport: asyncio.BaseTransport) -> tuple[int, tuple[str, int | None] | None, tuple[str, int] | None]:
    """(file descriptor or -1, local address, peer address) of a new connection, the addresses as uvicorn's
    get_local_addr and get_remote_addr read them; compiled, without a Python socket object per question
    (`_fastpath.endpoints`: IPv4 and IPv6 without a scope id, else uvicorn's way)."""
    fd = -1
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = sock.fileno()
    if _SOCKETS is not None and fd >= 0:
        got = _SOCKETS.endpoints(fd)
        if got is not None:
            return fd, got[0], got[1]
    t = cast("asyncio.Transport", transport)
    return fd, get_local_addr(t), get_remote_addr(t)


def client_frames(data: bytes, limit: int) -> list[str | bytes] | None:
    """What `data` holds when it is nothing but whole, final, masked client frames with no RSV bit that are
    text (minimally encoded lengths up to 65,535 bytes and `limit`, valid UTF-8: a `str` each) or pong
    (at most 125 bytes: the payload, `bytes`): what a client sends (subscribe and ping frames, the
    keepalive's answers); else None, for wsproto to parse (another frame, a fragment, a frame split over
    two reads, a violation). Where it returns frames, wsproto reads the same TextMessage and Pong events
    (tests/test_uvicorn_seam.py compares them)."""
    frames: list[str | bytes] = []
    at, end = 0, len(data)
    while at < end:
        if end - at < 6 or data[at + 1] < 0x80:  # MASK
            return None
        first, size = data[at], data[at + 1] & 0x7F
        at += 2
        if first == 0x8A:  # FIN + pong
            if size > 125:
                return None
        elif first != 0x81:  # FIN + text
            return None
        elif size == 126:
            size = int.from_bytes(data[at:at + 2], "big")
            at += 2
            if size < 126:
                return None  # not minimal: wsproto's 1002
        elif size == 127:
            return None
        if size > limit or at + 4 + size > end:
            return None
        mask = int.from_bytes(data[at:at + 4] * (size // 4 + 1), "little") & ((1 << (8 * size)) - 1)
        at += 4
        payload = (int.from_bytes(data[at:at + size], "little") ^ mask).to_bytes(size, "little")
        at += size
        if first == 0x8A:
            frames.append(payload)
            continue
        try:
            frames.append(payload.decode("utf-8"))  # strict, as wsproto's (no surrogates, no overlong forms)
        except UnicodeDecodeError:
            return None  # wsproto's 1007
    return frames


class _Continued:
    """The rest of a coroutine that `GatewayWSProtocol._start_eagerly` ran up to its first wait: awaited by a
    task, it hands that wait (`first`) to the task, then relays what the task sends or throws (a result, a
    cancellation) to the coroutine until it returns."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, waiting = self.coro, self.first
        self.first = None
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # the task's cancellation, thrown in where the coroutine waits
                try:
                    waiting = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Continued(coro, first)


class GatewayWSProtocol(WSProtocol):
    """uvicorn's wsproto protocol, exposing a RawChannel in the scope's extensions."""

    channel: RawChannel | None = None
    failed = False  # the peer broke the protocol and was answered with a close frame (`fail`)
    inflate: Inflate | None = None  # permessage-deflate, when the client offered it acceptably
    detached = False  # the session receives through a callback (`receive_with`); its ASGI task has ended
    holding = False  # the session asked for no more client frames for now (`hold_reading`)
    fd = -1  # the socket's file descriptor, when the protocol that handed the connection over read it
    plain_reads = True  # every read so far was whole text or pong frames (`_client_frames`); wsproto saw none

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        """uvicorn's `WSProtocol.__init__` (mirrored statement by statement, tests/test_uvicorn_seam.py), with
        the lighter inbox and flag made instead of the asyncio.Queue and Event it would replace at once, and
        the WSConnection (an h11 connection inside: a twentieth of a handshake) made only when used (`conn`):
        a request taken over by `upgrade` is never parsed by it, and the 101 never written by it."""
        if not config.loaded:
            config.load()
        self.config = config
        self.app = cast("ASGI3Application", config.loaded_app)
        self.loop = _loop or asyncio.get_event_loop()
        self.logger = _UVICORN_ERROR
        self.root_path = config.root_path
        self.asgi_version = config.asgi_version
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.transport = None  # type: ignore[assignment]
        self.server = None
        self.client = None
        self.scheme = None  # type: ignore[assignment]
        self.queue = _Inbox()  # type: ignore[assignment]
        self.handshake_complete = False
        self.close_sent = False
        self.disconnected = False
        self.close_timer = None
        self.close_timeout = 10.0
        self.response_started = False
        self._conn: Any = None
        self.read_paused = False
        self.flag = _Flag()
        self.writable = self.flag  # type: ignore[assignment]  # duck-typed asyncio.Event (see _Flag)
        self.ping_interval = config.ws_ping_interval
        self.ping_timeout = config.ws_ping_timeout
        self.ping_timer = None
        self.pong_timer = None
        self.pending_ping_payload = None
        self.ping_sent_at = 0.0
        self.last_ping_rtt = 0.0
        self.buffer = WebsocketBuffer(self.config.ws_max_size)

    @property
    def conn(self) -> Any:
        """uvicorn's `self.conn`: a WSConnection (made on first use), a `_Handshake` or an `_Established`."""
        if self._conn is None:
            self._conn = WSConnection(connection_type=ConnectionType.SERVER)
        return self._conn

    @conn.setter
    def conn(self, value: Any) -> None:
        self._conn = value

    def handle_connect(self, event: wsproto.events.Request) -> None:
        """uvicorn's (its scope, then the app's call), with the RawChannel in the scope and the call started
        at once (`_start_eagerly`) instead of in a task that runs in a later turn of the loop."""
        if self.config.ws_per_message_deflate:  # WSGATEWAY_WS_COMPRESSION (uvicorn's own deflate is never used)
            answer = negotiate(cast("list[str]", event.extensions))  # a server's Request: the header's offers
            if answer is not None:
                self.inflate = Inflate(answer, self.config.ws_max_size)
        headers = [(b"host", event.host.encode())]
        headers += [(key.lower(), value) for key, value in event.extra_headers]
        raw_path, _, query_string = event.target.partition("?")
        self.channel = RawChannel(self)
        # uvicorn types extension values as dicts; ours is an object the session reads back (session.py)
        extensions: dict[str, Any] = {"websocket.http.response": {}, EXTENSION: self.channel}
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.root_path + unquote(raw_path),
            "raw_path": self.root_path.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query_string.encode("ascii"),
            "headers": headers,
            "subprotocols": event.subprotocols,
            "state": self.app_state.copy(),
            "extensions": extensions,
        }
        self.queue.put_nowait({"type": "websocket.connect"})
        self._start_eagerly(self.run_asgi())

    def _start_eagerly(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the app's call now, up to its first real wait, as a task's first step would (in a copy of the
        context); only if it waits does it become a task, which continues it. A handshake whose token key
        is known never waits: it is done in the callback that read the request, with no task, no scheduling
        and no loop turn of its own (Python 3.12's eager tasks; this is 3.11)."""
        ctx = contextvars.copy_context()
        try:
            waiting = ctx.run(coro.send, None)
        except StopIteration:
            return
        task = self.loop.create_task(_resume(coro, waiting), context=ctx)
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)

    def connection_made_from(self, http: Any) -> None:
        """uvicorn's `connection_made` for a connection that `http` (its HTTP protocol) hands over, with the
        addresses and scheme that protocol already read from the socket instead of asking it again."""
        self.connections.add(self)
        self.transport = http.transport
        self.server, self.client = http.server, http.client
        self.fd = getattr(http, "fd", -1)
        self.scheme = "wss" if http.scheme == "https" else "ws"
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sWebSocket connection made", prefix)

    def upgrade(self, request: wsproto.events.Request, raw: Callable[[], bytes]) -> None:
        """Take over an upgrade request that `upgrade_request` read (instead of `data_received` with the
        re-serialized request, uvicorn's way): the WSConnection waits in a `_Handshake`, and the request is
        handled as wsproto's event for it is."""
        self.conn = _Handshake(self._conn, raw)
        self.handle_connect(request)

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.accept" and not self.handshake_complete:
            await self.writable.wait()
            self.accept_now(message.get("subprotocol"), list(message.get("headers", [])))
            return
        await super().send(message)

    def accept_now(self, subprotocol: str | None, headers: Sequence[tuple[bytes, bytes]] = (), *,
                   write: bool = True) -> bytes:
        """uvicorn's `websocket.accept` (the 101), now: its checks, log line and keepalive, and the 101 as
        wsproto's handshake writes it (RFC 6455 4.2.2: Upgrade, Connection, Sec-WebSocket-Accept, the
        selected subprotocol, our permessage-deflate answer when one was negotiated, then uvicorn's
        headers), without building it as an h11 response. The session's handshake calls it through
        `RawChannel.accept` (no ASGI send, no Starlette; `write=False`: the 101 is returned for the caller
        to write at once, with more), `send` for the ASGI message.

        The post-handshake wsproto `Connection` is made here, with our extension (never uvicorn's own
        unbounded one), held by a lighter `_Established`."""
        if self.disconnected:
            raise ClientDisconnected()
        if self.handshake_complete:
            raise RuntimeError("the WebSocket handshake is complete already")
        scope = self.scope
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info('%s - "WebSocket %s" [accepted]', get_client_addr(scope),
                             get_path_with_query_string(scope))
        key = next((v for k, v in scope["headers"] if k == b"sec-websocket-key"), b"")  # wsproto: there is one
        lines = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: %s\r\n" % binascii.b2a_base64(sha1(key + ACCEPT_GUID).digest(), newline=False)]
        if subprotocol is not None:
            if subprotocol not in scope["subprotocols"]:
                raise LocalProtocolError(f"unexpected subprotocol {subprotocol}")
            lines.append(b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol.encode("ascii"))
        extensions: list[Extension] = []
        if self.inflate is not None:
            extensions.append(self.inflate)
            lines.append(f"Sec-WebSocket-Extensions: {NAME}; {self.inflate.answer}\r\n".encode("ascii"))
        defaults = self.default_headers  # uvicorn's (server, date, --header): a new list each second
        if defaults is not _CHECKED_DEFAULTS[0]:
            _check_headers(defaults)
            _CHECKED_DEFAULTS[0] = defaults
        _check_headers(headers)  # the app's
        for name, value in (*defaults, *headers):
            lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        if self.transport.is_closing():
            return b""  # as uvicorn's: nothing is sent, and the handshake is not complete
        self.handshake_complete = True
        self.conn = _Established(extensions)
        head = b"".join(lines)
        if write:
            self.transport.write(head)
        self.start_keepalive()
        return head

    def receive_with(self, handler: Callable[[dict[str, Any]], None]) -> None:
        """Hand every later client event (`websocket.receive`, `websocket.disconnect`) to `handler` as it is
        parsed, instead of queueing it for the ASGI `receive`: the app may then return, and its task end,
        while the connection stays open. Events already queued go to the handler first, in order."""
        inbox = self.queue
        self.queue = _Direct(self, handler)  # type: ignore[assignment]
        self.detached = True
        self.scope = _SPENT_SCOPE
        items = inbox._items if isinstance(inbox, _Inbox) else []
        for item in items:
            self.queue.put_nowait(item)
        self._read_on()

    def hold_reading(self) -> None:
        """No more client frames until `release_reading` (the session is busy with one, e.g. a refresh)."""
        self.holding = True
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def release_reading(self) -> None:
        self.holding = False
        self._read_on()

    def _read_on(self) -> None:
        if self.read_paused and not self.holding and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    def handle_message(self, event: wsproto.events.TextMessage | wsproto.events.BytesMessage) -> None:
        super().handle_message(event)  # queues it (to the handler, when detached), then pauses reading ...
        if self.detached:
            self._read_on()  # ... which a handler that already has it does not need

    async def run_asgi(self) -> None:
        """uvicorn's, except that an app whose session went callback-based (`receive_with`) returns without
        the connection being closed."""
        try:
            result = await self.app(self.scope, self.receive, self.send)  # type: ignore[func-returns-value]
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.close_timer is None and not self.detached:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return  # answered with a close frame (fail): nothing more from this peer is parsed, or buffered
        if self.handshake_complete:
            if self.plain_reads and self.detached and self.inflate is None and self._client_frames(data):
                return
            self.plain_reads = False  # wsproto has seen this connection's bytes: from now on it parses them all
            super().data_received(data)
            return
        try:
            super().data_received(data)
        except UnicodeDecodeError:  # wsproto decodes a few upgrade headers (e.g. Sec-WebSocket-Extensions) as ASCII
            self.transport.write(_BAD_UPGRADE)
            self.transport.close()

    def _client_frames(self, data: bytes) -> bool:
        """Client frames without wsproto (`client_frames`): a text frame goes to the session as wsproto's
        TextMessage would (uvicorn's `handle_message`), a pong to uvicorn's `handle_pong`; the subscribe
        frame's parse through wsproto's generators was a tenth of a handshake. Anything else returns False
        with nothing consumed, and wsproto parses it, as every later read of the connection (`plain_reads`):
        wsproto never holds part of a stream it did not see."""
        frames = client_frames(data, self.config.ws_max_size)
        if frames is None:
            return False
        queue = self.queue
        for frame in frames:
            if self.close_sent:
                break  # as uvicorn's handle_events: after our close frame, only the peer's close counts
            if isinstance(frame, str):
                queue.put_nowait({"type": "websocket.receive", "text": frame})
            else:
                self.handle_pong(wsproto.events.Pong(payload=frame))
        return True

    def handle_close(self, event: wsproto.events.CloseConnection) -> None:
        """A close event while wsproto's connection is still OPEN was not sent by the peer: it is
        wsproto's verdict on a frame that breaks RFC 6455 (its ParseFailed: 1002, or 1007 for invalid
        UTF-8). uvicorn answers only a peer's close frame (REMOTE_CLOSING) and would drop the TCP
        connection without one, so the client saw 1006; the peer gets the close frame here."""
        if not self.close_sent and self.conn.state is ConnectionState.OPEN:
            reason = event.reason or ""
            if self.inflate is not None and self.inflate.failure is not None and event.code in _INFLATE_CODES:
                reason = self.inflate.failure  # instead of wsproto's "error in extension"
            self.fail(event.code, reason)
            return
        super().handle_close(event)

    def fail(self, code: int, reason: str) -> None:
        """_Fail the WebSocket Connection_ (RFC 6455 7.1.7): send a close frame with `code`, then end
        the connection without waiting for the peer's (it may never parse again).

        The TCP connection is half-closed (FIN after the close frame) and what the peer still sends is
        discarded, so the close frame is not lost to a reset; the peer's EOF, or the close timer,
        closes the socket."""
        self.failed = True
        self.stop_keepalive()
        self.close_sent = True
        disconnect: Any = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self.queue.put_nowait(disconnect)
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(self.conn.send(wsproto.events.CloseConnection(code=code, reason=reason)))
        if not transport.can_write_eof():  # TLS: no half-close
            transport.close()
            return
        transport.write_eof()
        if self.read_paused:  # to see the peer's EOF
            self.read_paused = False
            transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.channel is not None and self.channel.on_lost is not None:
            self.channel.on_lost()  # the hub forgets the connection now, not when its task next runs

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.channel is not None and self.channel.on_writable is not None:
            self.channel.on_writable()

    def shutdown(self) -> None:
        """Server shutdown: let the gateway drain queued frames and close with 1001, else uvicorn's way."""
        ch = self.channel
        if ch is not None and ch.on_shutdown is not None and self.handshake_complete and not self.close_sent:
            ch.on_shutdown()
            return
        super().shutdown()

    def close_now(self, code: int, reason: str) -> None:
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.stop_keepalive()
        self.close_sent = True
        disconnect: Any = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self.queue.put_nowait(disconnect)
        self.transport.write(self.conn.send(wsproto.events.CloseConnection(code=code, reason=reason)))
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
