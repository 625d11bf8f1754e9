"""uvicorn's HTTP protocols with a deadline for the request headers (slow or half-open requests).

uvicorn's HTTP protocols (httptools and h11) wait for a request's headers for as long as the client
likes: `timeout_keep_alive` only covers an idle connection between two requests. A client that opens
a connection and sends part of a request, or nothing, holds a socket and its buffers until it goes
away, and such connections are no WebSocket or SSE stream, so WSGATEWAY_MAX_CONNECTIONS never
counts them (a slowloris attack needs a few hundred of them per process).

`HeaderDeadline` is what `gateway.app.uvicorn_options` passes as uvicorn's `http=` (uvicorn calls it
like a protocol class): each connection it makes arms a timer when it is made, and again when the
first byte of a later request on a keep-alive connection arrives, and disarms it when the request's
headers are complete (httptools' `on_headers_complete`; h11 leaving its IDLE state). A WebSocket
upgrade is handed to the WebSocket protocol only after its headers are complete, so an open
WebSocket, an SSE stream or a slow response never meets the deadline. When the timer fires the
connection is closed, as nginx's `client_header_timeout` does. At most `max_pending` connections per
process wait for their headers at once (WSGATEWAY_MAX_CONNECTIONS): one more closes the one that has
waited longest, which favours clients that finish their request quickly over ones that dribble.

uvicorn's HTTP protocols are not a public API: what this module overrides and reads is pinned with
uvicorn's minor version (pyproject.toml) and checked by tests/test_uvicorn_seam.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

log = logging.getLogger(__name__)

Implementation = Literal["auto", "httptools", "h11"]


class _Waiting(Protocol):
    """What the deadline needs of a connection (both protocol classes below)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timer: asyncio.TimerHandle | None


class HeaderDeadline:
    """uvicorn's `http=` protocol factory: uvicorn's own HTTP protocol, with a request-header deadline.

    One per server (uvicorn.Config); it counts that server's connections still waiting for headers.
    It pickles to its settings alone, so `wsgateway serve --workers N` hands it to each worker process,
    which then counts its own connections.
    """

    def __init__(self, timeout_s: float, max_pending: int, implementation: Implementation = "auto") -> None:
        if timeout_s <= 0 or max_pending < 1:
            raise ValueError(f"a header deadline needs timeout_s > 0 and max_pending >= 1, got {timeout_s}, "
                             f"{max_pending}")
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.implementation: Literal["httptools", "h11"] = (
            implementation if implementation != "auto"
            else "httptools" if importlib.util.find_spec("httptools") is not None else "h11"  # uvicorn's "auto"
        )
        # connections waiting for their request headers, oldest first (a dict keeps insertion order), by transport:
        # a protocol that takes a connection over (hand_over) keeps its place
        self._waiting: dict[asyncio.Transport, _Waiting] = {}
        self.expired_total = 0  # closed by the deadline or because too many were waiting

    def __reduce__(self) -> tuple[type[HeaderDeadline], tuple[float, int, str]]:
        return (HeaderDeadline, (self.timeout_s, self.max_pending, self.implementation))

    def __repr__(self) -> str:
        return f"HeaderDeadline({self.timeout_s!r}, {self.max_pending!r}, {self.implementation!r})"

    @property
    def waiting(self) -> int:
        """Connections of this server whose request headers are not complete yet."""
        return len(self._waiting)

    def __call__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Protocol:
        """What uvicorn calls for each new connection (uvicorn.Server.startup's `create_protocol`)."""
        if self.implementation == "httptools":
            return UpgradeFirst(config, server_state, app_state, _loop, deadline=self)
        return H11HeaderDeadline(config, server_state, app_state, _loop, deadline=self)

    def arm(self, conn: _Waiting) -> None:
        """`conn` waits for a request's headers from now (no-op while it already does)."""
        if conn.header_timer is not None or conn.transport.is_closing():
            return
        conn.header_timer = conn.loop.call_later(self.timeout_s, self._expire, conn)
        self._waiting[conn.transport] = conn
        while len(self._waiting) > self.max_pending:
            self._expire(next(iter(self._waiting.values())))  # never `conn` itself: max_pending >= 1

    def disarm(self, conn: _Waiting) -> None:
        """`conn`'s request headers are complete, or it is gone."""
        timer = conn.header_timer
        if timer is not None:
            timer.cancel()
            conn.header_timer = None
        if self._waiting.get(conn.transport) is conn:
            del self._waiting[conn.transport]

    def hand_over(self, old: _Waiting, new: _Waiting) -> None:
        """`new` (armed by its connection_made) takes over `old`'s connection, and its deadline with it: the
        headers are due when they were due, and the connection keeps its place among the waiting."""
        timer, new_timer = old.header_timer, new.header_timer
        if timer is None or new_timer is None:
            self.disarm(old)
            return
        timer.cancel()
        old.header_timer = None
        new_timer.cancel()
        new.header_timer = new.loop.call_at(timer.when(), self._expire, new)
        self._waiting[old.transport] = new  # the same key (new's arm used it too): the same place

    def _expire(self, conn: _Waiting) -> None:
        self.disarm(conn)
        self.expired_total += 1
        if not conn.transport.is_closing():
            log.debug("closing a connection whose request headers were not complete in time (%gs or %d waiting)",
                      self.timeout_s, self.max_pending)
            conn.transport.close()


class H11HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a `HeaderDeadline`."""

    header_timer: asyncio.TimerHandle | None = None

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None, *, deadline: HeaderDeadline,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.deadline = deadline

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.deadline.arm(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next cycle with pipelined bytes already received
        if self.conn.trailing_data[0]:
            self._check()

    def _check(self) -> None:
        # h11 stays IDLE until a request's headers are complete (then SEND_BODY, DONE, or the upgrade's
        # hand-over to the WebSocket protocol); IDLE after receiving bytes: a request has begun
        if self.conn.their_state is h11.IDLE and self.transport.get_protocol() is self:
            self.deadline.arm(self)
        else:
            self.deadline.disarm(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.deadline.disarm(self)


if importlib.util.find_spec("httptools") is not None:  # uvicorn[standard] brings it; h11 is the fallback
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.utils import is_ssl

    from gateway.edge.transport import GatewayWSProtocol, endpoints, request_bytes, upgrade_request

    class HttpToolsHeaderDeadline(HttpToolsProtocol):
        """uvicorn's httptools protocol with a `HeaderDeadline`."""

        header_timer: asyncio.TimerHandle | None = None

        def __init__(
            self, config: Config, server_state: ServerState, app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None, *, deadline: HeaderDeadline,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self.deadline = deadline

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.deadline.arm(self)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.deadline.arm(self)  # a later request on a keep-alive connection: its own deadline

        def on_headers_complete(self) -> None:
            # before uvicorn's: for a WebSocket upgrade the transport moves to the WebSocket protocol
            # right after this callback, and this object hears of the connection no more
            self.deadline.disarm(self)
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.deadline.disarm(self)

        def handle_websocket_upgrade(self) -> None:
            """uvicorn's hand-over to the WebSocket protocol, without having wsproto parse the request again:
            a valid upgrade request goes to the gateway's protocol as httptools parsed it
            (transport.upgrade_request); anything else takes uvicorn's way, and is answered as there.

            Then this object is done with, and its parser (which holds its callbacks, a reference cycle)
            goes: the object is freed at once instead of waiting, with 20-odd others, for the cyclic
            garbage collector (uvicorn breaks the same cycle in connection_lost, which is never called
            on a protocol that handed its connection over)."""
            ws, method = self.ws_protocol_class, self.scope["method"]
            try:
                if (not isinstance(ws, type) or not issubclass(ws, GatewayWSProtocol)
                        or (request := upgrade_request(method, self.url, self.headers)) is None):
                    super().handle_websocket_upgrade()
                    return
                self.connections.discard(self)
                protocol = ws(config=self.config, server_state=self.server_state, app_state=self.app_state)
                protocol.connection_made_from(self)
                url, headers = self.url, self.headers
                protocol.upgrade(request, lambda: request_bytes(method, url, headers))
                self.transport.set_protocol(protocol)
            finally:
                self.parser = None  # type: ignore[assignment]


    class UpgradeFirst(asyncio.Protocol):
        """What uvicorn's `http=` factory makes for each new connection (with httptools): a connection whose
        first read is a plain WebSocket upgrade request, whole, goes to the gateway's WebSocket protocol
        (`plain_upgrade`, then `transport.upgrade_request`, the checks httptools, h11 and wsproto make);
        any other connection is handed, with that first read, to uvicorn's own httptools protocol
        (HttpToolsHeaderDeadline), which serves it as always: HTTP requests, keep-alive, an upgrade that
        came in pieces, or after another request, every rejection.

        A WebSocket client then costs no HTTP protocol object, parser, parser callbacks or HTTP scope
        (a fifth of a handshake's CPU). The header deadline holds from the connection's start, through the
        hand-over. What uvicorn asks of a connection before its first request is here: it is counted among
        the server's connections, and closed on shutdown."""

        header_timer: asyncio.TimerHandle | None = None
        fd = -1
        server: tuple[str, int | None] | None = None
        client: tuple[str, int] | None = None
        scheme: str = "http"

        def __init__(
            self, config: Config, server_state: ServerState, app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None, *, deadline: HeaderDeadline,
        ) -> None:
            if not config.loaded:
                config.load()
            self.config = config
            self.server_state = server_state
            self.app_state = app_state
            self.loop = _loop or asyncio.get_event_loop()
            self.deadline = deadline
            self.connections = cast("set[Any]", server_state.connections)  # typed as uvicorn's protocols only
            self.transport: asyncio.Transport = None  # type: ignore[assignment]

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.connections.add(self)
            self.transport = transport
            self.deadline.arm(self)

        def data_received(self, data: bytes) -> None:
            ws = self.config.ws_protocol_class
            parsed = plain_upgrade(data) if isinstance(ws, type) and issubclass(ws, GatewayWSProtocol) else None
            request = None if parsed is None else upgrade_request("GET", *parsed, checked=True)
            if parsed is None or request is None:
                self._to_uvicorn(data)
                return
            target, headers = parsed
            transport = self.transport
            self.deadline.disarm(self)
            self.connections.discard(self)
            self.fd, self.server, self.client = endpoints(transport)
            self.scheme = "https" if is_ssl(transport) else "http"
            protocol = cast("type[GatewayWSProtocol]", ws)(
                config=self.config, server_state=self.server_state, app_state=self.app_state)
            protocol.connection_made_from(self)
            protocol.upgrade(request, lambda: request_bytes("GET", target, headers))
            transport.set_protocol(protocol)

        def _to_uvicorn(self, data: bytes) -> None:
            http = HttpToolsHeaderDeadline(self.config, self.server_state, self.app_state, self.loop,
                                           deadline=self.deadline)
            self.connections.discard(self)
            http.connection_made(self.transport)
            self.deadline.hand_over(self, http)
            self.transport.set_protocol(http)
            http.data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.connections.discard(self)
            self.deadline.disarm(self)
            if exc is None:
                self.transport.close()

        def eof_received(self) -> None:
            pass  # as uvicorn's: the transport closes

        def shutdown(self) -> None:
            """uvicorn's server shutdown: a connection with no request yet is closed (as uvicorn's are)."""
            self.transport.close()

    # A whole plain upgrade request head: origin-form target of RFC 3986 characters; header names are RFC 9110
    # tokens; values start and end with a visible character or obs-text, with blanks only inside (stricter than
    # h11's field-value, which also takes control characters, and than what httptools reads); CRLF line ends.
    _PLAIN_HEAD = re.compile(
        rb"GET (/[A-Za-z0-9._~:/?\[\]@!$&'()*+,;=%-]*) HTTP/1\.1\r\n"
        rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*"
        rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\r\n)*)\r\n"
    )
    _HEADER_LINE = re.compile(rb"([^:]+):[ \t]*([^\r]*)\r\n")

    def plain_upgrade(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        """(request-target, headers with lower-case names) of `data` when it is exactly one whole
        `GET <origin-form target> HTTP/1.1` request head in the plain form browsers and WebSocket libraries
        send (`_PLAIN_HEAD`), with nothing after it; else None (uvicorn's httptools protocol reads it). Where
        this returns a request, httptools reads the same (tests/test_uvicorn_seam.py compares them), and
        `upgrade_request` needs no second look at the names and values (`checked`)."""
        head = _PLAIN_HEAD.fullmatch(data)
        if head is None:
            return None
        return head[1], [(name.lower(), value) for name, value in _HEADER_LINE.findall(head[2])]
