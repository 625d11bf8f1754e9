"""The uvicorn internals gateway/edge/transport.py (and http_protocol.py) build on are still there and
still behave as they expect.

`GatewayWSProtocol` subclasses uvicorn's wsproto `WSProtocol` and uses its private attributes and
methods (there is no public API for a raw write path). pyproject pins uvicorn to the tested minor
version; when that pin is raised, this test names each private attribute or method that disappeared
or changed, instead of the gateway failing somewhere in the fan-out path.

The lists below are what transport.py relies on; keep them in step with it (the seam's code stays in
transport.py, its inventory lives here). The HTTP protocols' part (`HeaderDeadline`, uvicorn's `http=`:
its httptools and h11 subclasses) is the last section.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import os
import re
import textwrap
import weakref
from collections.abc import Iterator
from typing import Any

import h11
import httptools
import pytest
import uvicorn
import websockets
import wsproto.events
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState, ConnectionType

from gateway.edge.http_protocol import (
    H11HeaderDeadline,
    HeaderDeadline,
    HttpToolsHeaderDeadline,
    Implementation,
    UpgradeFirst,
    plain_upgrade,
)
from gateway.edge.transport import (
    GatewayWSProtocol,
    _Established,
    _Handshake,
    request_bytes,
    upgrade_request,
)
from gateway.protocol import ws_text_frame
from tests.support.ports import free_port
from tests.support.wait import eventually

# Instance attributes transport.py reads or writes, and what they must be once the handshake is done.
ATTRIBUTES: dict[str, type | tuple[type, ...]] = {
    "transport": asyncio.Transport,  # RawChannel writes frames to it directly
    "loop": asyncio.AbstractEventLoop,  # close_now arms the close timer on it
    "scope": dict,  # handle_connect puts the RawChannel into scope["extensions"]
    "conn": WSConnection,  # _Handshake before the accept (see upgrade_request), then _Established
    "queue": object,  # replaced by _Inbox (see QUEUE_USES)
    "writable": object,  # replaced by _Flag (see WRITABLE_USES)
    "handshake_complete": bool,
    "close_sent": bool,
    "disconnected": bool,
    "read_paused": bool,
    "close_timer": (asyncio.TimerHandle, type(None)),
    "close_timeout": float,
}
# Methods GatewayWSProtocol overrides or calls, with their parameters after `self`.
METHODS: dict[str, tuple[str, ...]] = {
    "handle_connect": ("event",),
    "send": ("message",),
    "connection_lost": ("exc",),
    "resume_writing": (),
    "pause_writing": (),
    "shutdown": (),
    "stop_keepalive": (),
    "data_received": ("data",),
    "handle_close": ("event",),
    "handle_message": ("event",),
    "run_asgi": (),
}
# What GatewayWSProtocol adds: names uvicorn's class must not have (or an override would be silent).
ADDED = ("channel", "flag", "close_now", "fail", "failed", "inflate", "detached", "holding", "receive_with",
         "hold_reading", "release_reading", "_read_on", "upgrade", "accept_now", "connection_made_from",
         "_start_eagerly", "_client_frames", "plain_reads")
# What uvicorn may call on the objects transport.py replaces with lighter ones.
QUEUE_USES = {"put_nowait", "get", "empty"}  # _Inbox
WRITABLE_USES = {"set", "clear", "is_set", "wait"}  # _Flag
CONN_USES = {"send", "receive_data", "events", "state"}  # _Handshake (before the accept), _Established (after)
# Statements of uvicorn's own code that transport.py mirrors or depends on, by method.
MIRRORED: dict[str, list[str]] = {
    # close_now repeats the `websocket.close` branch of send, minus its awaits (it may run while paused)
    "send": [
        "self.close_sent = True",
        "self.queue.put_nowait({'type': 'websocket.disconnect', 'code': code, 'reason': reason})",
        "output = self.conn.send(wsproto.events.CloseConnection(code=code, reason=reason))",
        "self.read_paused = False",
        "self.transport.resume_reading()",
        "self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)",
        "await self.writable.wait()",
        # accept_now is the `websocket.accept` branch, the 101 written as wsproto's handshake writes it
        "raise ClientDisconnected()",
        "extra_headers = self.default_headers + list(message.get('headers', []))",
        "self.handshake_complete = True",
        "self.transport.write(output)",
        "self.start_keepalive()",
    ],
    # ... and relies on connection_lost to cancel that timer and to wake writers waiting on `writable`
    "connection_lost": ["self.close_timer.cancel()", "self.writable.set()", "self.disconnected = True"],
    # connection_made_from is connection_made with the HTTP protocol's addresses (read the same way there)
    "connection_made": ["self.connections.add(self)", "self.transport = transport",
                        "self.server = get_local_addr(transport)", "self.client = get_remote_addr(transport)",
                        "self.scheme = 'wss' if is_ssl(transport) else 'ws'",
                        "self.logger.log(TRACE_LOG_LEVEL, '%sWebSocket connection made', prefix)"],
    "pause_writing": ["self.writable.clear()"],
    "resume_writing": ["self.writable.set()"],
    # the `shutdown` override falls back to uvicorn's, which must still close with 1012 itself
    "shutdown": ["output = self.conn.send(wsproto.events.CloseConnection(code=1012))"],
    # RawChannel.close relies on the receive path resuming reading when its queue drains
    "receive": ["message = await self.queue.get()", "self.transport.resume_reading()"],
    # GatewayWSProtocol.handle_close answers protocol violations: wsproto's close events reach it, and
    # uvicorn's own version answers only a peer's close frame (REMOTE_CLOSING), then drops the connection
    "handle_events": ["self.handle_close(event)"],
    "handle_close": ["self.transport.write(self.conn.send(event.response()))", "self.transport.close()"],
    "data_received": ["self.conn.receive_data(data)", "self.handle_events()"],
    # run_asgi is repeated whole (a detached session's app returns without closing the connection) ...
    "run_asgi": [
        "result = await self.app(self.scope, self.receive, self.send)",
        "self.logger.exception('Exception in ASGI application\\n')",
        "self.send_500_response()",
        "self.logger.error('ASGI callable returned without completing handshake.')",
        "self.logger.error(\"ASGI callable should return None, but returned '%s'.\", result)",
        "self.transport.close()",
    ],
    # handle_connect is repeated whole (the RawChannel in the scope's extensions, the app's call started
    # eagerly instead of in a task): uvicorn's scope, and the task it would have made
    "handle_connect": [
        "headers = [(b'host', event.host.encode())]",
        "headers += [(key.lower(), value) for key, value in event.extra_headers]",
        "raw_path, _, query_string = event.target.partition('?')",
        "path = unquote(raw_path)",
        "full_path = self.root_path + path",
        "full_raw_path = self.root_path.encode('ascii') + raw_path.encode('ascii')",
        "self.scope: WebSocketScope = {'type': 'websocket', 'asgi': {'version': self.asgi_version, "
        "'spec_version': '2.4'}, 'http_version': '1.1', 'scheme': self.scheme, 'server': self.server, "
        "'client': self.client, 'root_path': self.root_path, 'path': full_path, 'raw_path': full_raw_path, "
        "'query_string': query_string.encode('ascii'), 'headers': headers, 'subprotocols': event.subprotocols, "
        "'state': self.app_state.copy(), 'extensions': {'websocket.http.response': {}}}",
        "self.queue.put_nowait({'type': 'websocket.connect'})",
        "task = self.loop.create_task(self.run_asgi())",
        "task.add_done_callback(self.on_task_complete)",
        "self.tasks.add(task)",
    ],
    # ... and handle_message's pause after each message is undone for a detached session
    "handle_message": ["self.queue.put_nowait(self.buffer.to_message())", "self.read_paused = True",
                       "self.transport.pause_reading()"],
}


def _class_tree() -> ast.ClassDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(WSProtocol)))
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    return node


def _uses_of(attr: str) -> set[str]:
    """Names uvicorn reads on `self.<attr>` anywhere in WSProtocol (`self.queue.get()` -> "get")."""
    found = set()
    for node in ast.walk(_class_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == attr and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            found.add(node.attr)
    return found


def _statements(method: str) -> Iterator[str]:
    for node in _class_tree().body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == method:
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.stmt) and not isinstance(stmt, ast.If | ast.Try | ast.For | ast.With):
                    yield ast.unparse(stmt)


def test_the_private_methods_exist_with_their_signatures() -> None:
    problems = []
    for name, params in METHODS.items():
        fn = getattr(WSProtocol, name, None)
        if fn is None:
            problems.append(f"WSProtocol.{name} is gone")
            continue
        got = tuple(inspect.signature(fn).parameters)[1:]
        if got != params:
            problems.append(f"WSProtocol.{name}{got} changed (transport.py expects {params})")
    assert not problems, "uvicorn changed what gateway/edge/transport.py overrides:\n" + "\n".join(problems)


def test_what_transport_adds_is_not_uvicorns() -> None:
    clash = [name for name in ADDED if hasattr(WSProtocol, name)]
    assert not clash, f"uvicorn's WSProtocol now has {clash}, which GatewayWSProtocol adds for itself"


def test_wsproto_uses_its_events_deque_as_the_list_transport_puts_there() -> None:
    """_Established swaps wsproto Connection's `_events` deque for a list with `popleft` (_EventList)."""
    source = inspect.getsource(Connection)
    uses = {m.group(1) for m in re.finditer(r"self\._events\.(\w+)", source)}
    assert uses <= {"append", "popleft"}, f"wsproto now uses self._events.{sorted(uses)}"
    assert "self._events: deque[Event] = deque()" in source
    established = _Established([])
    assert established.state is ConnectionState.OPEN is Connection(ConnectionType.SERVER).state  # before it is made
    conn = established.connection
    assert type(conn._events).__name__ == "_EventList"
    conn.receive_data(b"\x89\x80abcd")  # a masked, empty ping
    assert [type(e).__name__ for e in conn.events()] == ["Ping"]
    assert not conn._events


def test_wsproto_reports_a_violation_as_a_close_event_while_open() -> None:
    """GatewayWSProtocol.handle_close tells wsproto's verdict on a bad frame (ParseFailed) from a peer's
    close frame by the connection's state: still OPEN, and the code to send (1002, 1007 for bad UTF-8)."""
    for data, code in ((b"\x81\x01x", 1002), (b"\x81\x81abcd" + bytes([0xFF ^ ord("a")]), 1007)):
        conn = Connection(ConnectionType.SERVER)
        conn.receive_data(data)  # unmasked text frame / masked text frame of one invalid UTF-8 byte
        events = list(conn.events())
        assert len(events) == 1 and isinstance(events[0], wsproto.events.CloseConnection), events
        assert events[0].code == code, events[0]
        assert conn.state is ConnectionState.OPEN, conn.state
    conn = Connection(ConnectionType.SERVER)  # the peer's own close frame moves it to REMOTE_CLOSING
    conn.receive_data(b"\x88\x82abcd" + bytes(a ^ b for a, b in zip(b"\x03\xe8", b"ab", strict=True)))
    assert [getattr(e, "code", None) for e in conn.events()] == [1000]
    assert conn.state is ConnectionState.REMOTE_CLOSING


def test_replaced_objects_serve_every_use_uvicorn_makes() -> None:
    problems = []
    for attr, allowed, by in (("queue", QUEUE_USES, "_Inbox"), ("writable", WRITABLE_USES, "_Flag"),
                              ("conn", CONN_USES | {"connection"}, "_Established")):
        extra = _uses_of(attr) - allowed
        if extra:
            problems.append(f"WSProtocol now uses self.{attr}.{sorted(extra)}, which transport.py's {by} lacks")
    for cls in (_Handshake, _Established):
        problems += [f"transport.{cls.__name__} has no `{u}`" for u in CONN_USES if not hasattr(cls, u)]
    assert not problems, "\n".join(problems)


def test_the_code_transport_mirrors_is_unchanged() -> None:
    problems = []
    for method, wanted in MIRRORED.items():
        have = set(_statements(method))
        if not have:
            problems.append(f"WSProtocol.{method} is gone")
            continue
        problems += [f"WSProtocol.{method} no longer does `{s}`" for s in wanted
                     if ast.unparse(ast.parse(s)) not in have]
    assert not problems, "uvicorn changed code that GatewayWSProtocol mirrors or relies on:\n" + "\n".join(
        problems)


def test_server_shutdown_still_asks_each_connection() -> None:
    # GatewayWSProtocol.shutdown drains and closes with 1001; uvicorn must still call it per connection.
    assert "connection.shutdown()" in inspect.getsource(uvicorn.Server.shutdown)


def test_the_protocol_starts_with_what_uvicorns_starts_with() -> None:
    """GatewayWSProtocol.__init__ repeats uvicorn's instead of calling it (it skips objects it would replace at
    once): every attribute uvicorn's sets is set, to an equal value, or to the replacement named here."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config, state = Config(app, ws_ping_interval=7.0, ws_ping_timeout=3.0, ws_max_size=1234), ServerState()
    loop = asyncio.new_event_loop()
    try:
        theirs, ours = WSProtocol(config, state, {"k": 1}, loop), GatewayWSProtocol(config, state, {"k": 1}, loop)
    finally:
        loop.close()
    replaced = {"queue": "_Inbox", "writable": "_Flag", "conn": "WSConnection", "buffer": "WebsocketBuffer"}
    problems = []
    for name, value in vars(theirs).items():
        if not hasattr(ours, name):
            problems.append(f"uvicorn's WSProtocol.__init__ now sets `{name}`, GatewayWSProtocol's does not")
        elif name in replaced:
            if type(getattr(ours, name)).__name__ != replaced[name]:
                problems.append(f"{name} is a {type(getattr(ours, name)).__name__}, not {replaced[name]}")
        elif getattr(ours, name) != value:
            problems.append(f"{name}: uvicorn's is {value!r}, GatewayWSProtocol's {getattr(ours, name)!r}")
    assert ours.buffer.max_length == theirs.buffer.max_length == 1234
    assert not problems, "\n".join(problems)


async def test_a_real_connection_has_the_attributes() -> None:
    """The instance uvicorn itself creates for a WebSocket, after the accept, as transport.py sees it."""
    accepted = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws=WSProtocol, lifespan="off",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, what="uvicorn to listen", watch=[task])
        async with websockets.connect(f"ws://127.0.0.1:{port}/"):
            await asyncio.wait_for(accepted.wait(), 30)
            (proto,) = server.server_state.connections
            assert isinstance(proto, WSProtocol)
            problems = []
            for name, kind in ATTRIBUTES.items():
                if not hasattr(proto, name):
                    problems.append(f"WSProtocol instances have no `{name}` any more")
                elif not isinstance(getattr(proto, name), kind):
                    problems.append(f"WSProtocol.{name} is a {type(getattr(proto, name)).__name__}, not {kind}")
            if isinstance(proto.conn, WSConnection) and not isinstance(proto.conn.connection, Connection):
                problems.append("WSConnection.connection (wsproto) is no Connection after the handshake")
            if not isinstance(getattr(proto, "scope", {}).get("extensions"), dict):
                problems.append('scope["extensions"] is no dict (the RawChannel goes there)')
            assert proto.handshake_complete and not proto.close_sent
            assert not problems, "uvicorn's WSProtocol changed under gateway/edge/transport.py:\n" + "\n".join(
                problems)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


# --- the HTTP protocols: gateway/edge/http_protocol.py ------------------------------------------------
#
# HeaderDeadline is passed as uvicorn's `http=` and subclasses both of uvicorn's HTTP protocols. What it
# relies on, by class: the methods it overrides (with their parameters after `self`) and the statements
# of uvicorn's code that make those overrides sufficient.

HTTP_METHODS: dict[type, dict[str, tuple[str, ...]]] = {
    HttpToolsProtocol: {
        "__init__": ("config", "server_state", "app_state", "_loop"),
        "connection_made": ("transport",),
        "connection_lost": ("exc",),
        "on_message_begin": (),  # httptools: a request's first byte
        "on_headers_complete": (),  # httptools: its headers are complete
        "handle_websocket_upgrade": (),
    },
    H11Protocol: {
        "__init__": ("config", "server_state", "app_state", "_loop"),
        "connection_made": ("transport",),
        "connection_lost": ("exc",),
        "data_received": ("data",),
        "on_response_complete": (),
    },
}
HTTP_MIRRORED: dict[type, dict[str, list[str]]] = {
    HttpToolsProtocol: {
        # the WebSocket hand-over happens after on_headers_complete (the parser raises HttpParserUpgrade
        # once its callbacks ran), and the HTTP protocol hears of the connection no more afterwards;
        # HttpToolsHeaderDeadline.handle_websocket_upgrade repeats it, without the re-serialized request
        # (transport.request_bytes, made only for a rejection) going through wsproto's parser
        "handle_websocket_upgrade": [
            "self.transport.set_protocol(protocol)",
            "self.connections.discard(self)",
            "method = self.scope['method'].encode()",
            "output = [method, b' ', self.url, b' HTTP/1.1\\r\\n']",
            "output += [name, b': ', value, b'\\r\\n']",
            "output.append(b'\\r\\n')",
            "protocol = self.ws_protocol_class(config=self.config, server_state=self.server_state, "
            "app_state=self.app_state)",
            "protocol.connection_made(self.transport)",
            "protocol.data_received(b''.join(output))",
        ],
        # the headers upgrade_request reads: lower-case names, in order, as the parser gave them
        "on_header": ["name = name.lower()", "self.headers.append((name, value))"],
        "connection_made": ["self.transport = transport", "self.server = get_local_addr(transport)",
                            "self.client = get_remote_addr(transport)",
                            "self.scheme = 'https' if is_ssl(transport) else 'http'"],
        "on_url": ["self.url += url"],
        "data_received": ["self.parser.feed_data(data)", "self.handle_websocket_upgrade()"],
    },
    H11Protocol: {
        "handle_websocket_upgrade": ["self.transport.set_protocol(protocol)"],
        "data_received": ["self.conn.receive_data(data)", "self.handle_events()"],
        # pipelined bytes of the next request are parsed when a response completes, not on data_received
        "on_response_complete": ["self.conn.start_next_cycle()", "self.handle_events()"],
    },
}
HTTP_ADDED = ("deadline", "header_timer")  # what the subclasses add: uvicorn's classes must not have them


def _method_statements(cls: type, method: str) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(cls, method))))
    return {ast.unparse(s) for s in ast.walk(tree)
            if isinstance(s, ast.stmt) and not isinstance(s, ast.If | ast.Try | ast.For | ast.With | ast.While)}


def test_the_http_protocols_still_have_what_the_deadline_overrides() -> None:
    problems = []
    for cls, methods in HTTP_METHODS.items():
        for name, params in methods.items():
            fn = getattr(cls, name, None)
            if fn is None:
                problems.append(f"{cls.__name__}.{name} is gone")
                continue
            got = tuple(inspect.signature(fn).parameters)[1:]
            if got != params:
                problems.append(f"{cls.__name__}.{name}{got} changed (http_protocol.py expects {params})")
        problems += [f"{cls.__name__} now has `{n}`, which http_protocol.py adds"
                     for n in HTTP_ADDED if hasattr(cls, n)]
    for cls, by_method in HTTP_MIRRORED.items():
        for method, wanted in by_method.items():
            have = _method_statements(cls, method)
            problems += [f"{cls.__name__}.{method} no longer does `{s}`" for s in wanted
                         if ast.unparse(ast.parse(s)) not in have]
    assert not problems, "uvicorn's HTTP protocols changed under gateway/edge/http_protocol.py:\n" + "\n".join(
        problems)


def test_uvicorn_still_calls_an_http_factory_like_a_class() -> None:
    """`http=` may be any callable: Config.load keeps a non-string as the protocol class, and each
    connection's protocol is made with these keywords (HeaderDeadline.__call__'s parameters)."""
    assert "self.http_protocol_class = self.http" in inspect.getsource(uvicorn.Config.load)
    startup = inspect.getsource(uvicorn.Server.startup)
    call = startup[startup.index("config.http_protocol_class("):]
    call = call[:call.index(")") + 1]
    for keyword in ("config=config", "server_state=self.server_state", "app_state=self.lifespan.state",
                    "_loop=_loop"):
        assert keyword in call, f"uvicorn.Server.startup no longer passes {keyword}: {call}"
    assert tuple(inspect.signature(HeaderDeadline.__call__).parameters)[1:] == (
        "config", "server_state", "app_state", "_loop")


def test_h11_stays_idle_until_the_request_headers_are_complete() -> None:
    """H11HeaderDeadline arms the deadline while h11 is IDLE after receiving bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert conn.next_event() is h11.NEED_DATA and conn.their_state is h11.IDLE
    assert conn.trailing_data[0]
    conn.receive_data(b"\r\n")
    assert isinstance(conn.next_event(), h11.Request) and conn.their_state is not h11.IDLE


@pytest.mark.parametrize("impl", ["httptools", "h11"])
async def test_a_real_http_connection_is_the_deadlines(impl: Implementation) -> None:
    """The protocol uvicorn makes for a connection is HeaderDeadline's, waiting, with the attributes it uses."""
    deadline = HeaderDeadline(3600, 10, impl)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=deadline,  # type: ignore[arg-type]
                                           lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, what="uvicorn to listen", watch=[task])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: deadline.waiting == 1, what="the connection to wait for its headers", watch=[task])
        (proto,) = server.server_state.connections
        expected = UpgradeFirst if impl == "httptools" else H11HeaderDeadline
        assert type(proto) is expected
        assert isinstance(proto.transport, asyncio.Transport) and isinstance(proto.loop, asyncio.AbstractEventLoop)
        assert isinstance(proto.header_timer, asyncio.TimerHandle)
        due = proto.header_timer.when()
        if isinstance(proto, H11HeaderDeadline):
            assert isinstance(proto.conn, h11.Connection)
        else:  # the first bytes of a request: uvicorn's httptools protocol takes over, and the same deadline
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            await eventually(lambda: type(next(iter(server.server_state.connections))) is HttpToolsHeaderDeadline,
                             what="uvicorn's protocol to take the connection over", watch=[task])
            (http,) = server.server_state.connections
            assert http.transport is proto.transport and deadline.waiting == 1
            assert isinstance(http.header_timer, asyncio.TimerHandle) and http.header_timer.when() == due
        writer.close()
        await eventually(lambda: deadline.waiting == 0, what="the closed connection to stop waiting", watch=[task])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


# --- the upgrade request: read once, by httptools (transport.upgrade_request) ----------------------------
#
# HttpToolsHeaderDeadline hands a valid upgrade request to GatewayWSProtocol as httptools parsed it, and
# wsproto's handshake (h11) never parses it again. upgrade_request must accept only what wsproto accepts,
# and make the same Request event of it; anything it declines takes uvicorn's path, so it may decline more.

_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_VALID = [(b"Host", b"gw.example:8000"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
          (b"Sec-WebSocket-Key", _KEY), (b"Sec-WebSocket-Version", b"13")]


def _request(target: bytes = b"/v1/ws?scope=a", method: bytes = b"GET",
             headers: list[tuple[bytes, bytes]] | None = None, drop: tuple[bytes, ...] = (),
             add: list[tuple[bytes, bytes]] | None = None) -> bytes:
    hs = [(n, v) for n, v in (_VALID if headers is None else headers) if n.lower() not in drop] + (add or [])
    return method + b" " + target + b" HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in hs) + b"\r\n"


UPGRADE_REQUESTS = {
    "valid": _request(),
    "with subprotocols, extensions and a token": _request(add=[
        (b"Sec-WebSocket-Protocol", b"wsgateway.v1, bearer.abc.def.ghi"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
        (b"Authorization", b"Bearer abc.def.ghi"), (b"X-Forwarded-For", b"10.0.0.1, 10.0.0.2")]),
    "mixed-case values": _request(headers=[(b"HOST", b"gw"), (b"upgrade", b"WebSocket"),
                                           (b"connection", b"keep-alive, UPGRADE"), (b"sec-websocket-key", _KEY),
                                           (b"sec-websocket-version", b"13")]),
    "no key": _request(drop=(b"sec-websocket-key",)),
    "no version": _request(drop=(b"sec-websocket-version",)),
    "version 8": _request(drop=(b"sec-websocket-version",), add=[(b"Sec-WebSocket-Version", b"8")]),
    "no Connection: upgrade": _request(drop=(b"connection",), add=[(b"Connection", b"keep-alive")]),
    "Upgrade: h2c": _request(drop=(b"upgrade",), add=[(b"Upgrade", b"h2c")]),
    "no host": _request(drop=(b"host",)),
    "two hosts": _request(add=[(b"Host", b"other")]),
    "POST": _request(method=b"POST"),
    "a body": _request(add=[(b"Content-Length", b"0")]),
    "a later Connection header wins": _request(add=[(b"Connection", b"close")]),
    "a later version wins": _request(add=[(b"Sec-WebSocket-Version", b"12")]),
    "obs-text in a value": _request(add=[(b"X-Name", "café".encode())]),
    "non-ASCII extensions": _request(add=[(b"Sec-WebSocket-Extensions", "défl".encode())]),
    "non-ASCII subprotocol": _request(add=[(b"Sec-WebSocket-Protocol", "é".encode())]),
    "a bad IDNA host": _request(drop=(b"host",), add=[(b"Host", b"a" * 64 + b".example")]),
    "a non-ASCII host": _request(drop=(b"host",), add=[(b"Host", "bücher.example".encode())]),
    "an A-label host": _request(drop=(b"host",), add=[(b"Host", b"xn--bcher-kva.example:8080")]),
    "an upper-case A-label host": _request(drop=(b"host",), add=[(b"Host", b"XN--BCHER-KVA.Example")]),
    "a mixed-case ASCII host": _request(drop=(b"host",), add=[(b"Host", b"GW.Example.COM.")]),
    "an empty value": _request(add=[(b"X-Empty", b"")]),
}


class _Parsed:
    """What uvicorn's httptools protocol has of a request when it hands an upgrade over (on_url, on_header)."""

    def __init__(self, raw: bytes) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade:
            pass
        self.method = parser.get_method().decode("ascii")
        self.version = parser.get_http_version()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


def _wsproto_reads(raw: bytes) -> wsproto.events.Request | None:
    conn = WSConnection(ConnectionType.SERVER)
    try:
        conn.receive_data(raw)
        events = list(conn.events())
    except (wsproto.utilities.RemoteProtocolError, UnicodeError):
        return None
    assert len(events) == 1 and isinstance(events[0], wsproto.events.Request), events
    return events[0]


@pytest.mark.parametrize("case", list(UPGRADE_REQUESTS))
def test_upgrade_request_reads_what_wsproto_reads(case: str) -> None:
    raw = UPGRADE_REQUESTS[case]
    parsed = _Parsed(raw)
    if not parsed.complete:
        pytest.fail(f"httptools refused {case!r}; the case tests nothing")
    ours = upgrade_request(parsed.method, parsed.url, parsed.headers)
    theirs = _wsproto_reads(request_bytes(parsed.method, parsed.url, parsed.headers))  # what uvicorn feeds it
    if ours is None:
        # declined: uvicorn's own path answers it; wsproto refusing it is the usual reason
        assert case not in ("valid", "with subprotocols, extensions and a token", "mixed-case values",
                            "obs-text in a value", "an empty value"), f"{case}: a valid request was declined"
        return
    assert theirs is not None, f"{case}: upgrade_request accepted what wsproto refuses"
    for field in ("host", "target", "extensions", "extra_headers", "subprotocols"):
        assert getattr(ours, field) == getattr(theirs, field), (case, field)


def test_request_bytes_is_what_uvicorn_feeds_wsproto() -> None:
    parsed = _Parsed(UPGRADE_REQUESTS["with subprotocols, extensions and a token"])
    raw = request_bytes(parsed.method, parsed.url, parsed.headers)
    assert raw.startswith(b"GET /v1/ws?scope=a HTTP/1.1\r\nhost: gw.example:8000\r\n") and raw.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_ws_text_frame_is_wsprotos_framing(size: int) -> None:
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    wsproto_frame = bytes(wsproto.frame_protocol.FrameProtocol(client=False, extensions=[]).send_data(
        payload.decode(), fin=True))
    assert ws_text_frame(payload) == wsproto_frame
    with pytest.raises(UnicodeDecodeError):
        ws_text_frame(b"\xff")


async def _roundtrip(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = re.search(rb"(?i)content-length: (\d+)", head)
        return head + (await asyncio.wait_for(reader.readexactly(int(length.group(1))), 30) if length else b"")
    finally:
        writer.close()


async def test_a_taken_over_upgrade_is_answered_as_wsproto_answers_it() -> None:
    """Through a real uvicorn (HeaderDeadline over httptools, GatewayWSProtocol): a valid request is taken
    over (its protocol's conn is a _Handshake until the 101), and what the app answers instead of a 101,
    uvicorn's 403 and 500, is byte for byte what wsproto's handshake writes for the same request."""
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        proto = scope["extensions"]["wsgateway.raw"]._proto
        assert isinstance(proto, GatewayWSProtocol)
        seen.append(type(proto.conn).__name__)
        # the addresses and scheme the HTTP protocol read (connection_made_from)
        assert scope["scheme"] == "ws" and scope["client"][0] == "127.0.0.1", scope
        assert scope["server"] == ("127.0.0.1", port) and proto.connections is server.server_state.connections
        assert proto in proto.connections
        await receive()
        if scope["path"] == "/reject":
            await send({"type": "websocket.close"})
        elif scope["path"] == "/fail":
            raise RuntimeError("an app that fails before its accept (uvicorn's 500)")
        else:
            await send({"type": "websocket.accept", "subprotocol": "wsgateway.v1"})
            await send({"type": "websocket.close", "code": 1000})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
                                           http=HeaderDeadline(60, 10, "httptools"),  # type: ignore[arg-type]
                                           ws=GatewayWSProtocol, server_header=False, date_header=False))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, what="uvicorn to listen", watch=[task])
        extra = [(b"Sec-WebSocket-Protocol", b"wsgateway.v1")]
        for path, event in ((b"/reject", wsproto.events.RejectConnection(status_code=403, headers=[])),
                            (b"/fail", None)):
            raw = _request(target=path, add=extra)
            expected = WSConnection(ConnectionType.SERVER)
            expected.receive_data(request_bytes("GET", path, _Parsed(raw).headers))
            list(expected.events())
            if event is None:  # uvicorn's send_500_response
                headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                           (b"content-length", b"21")]
                want = expected.send(wsproto.events.RejectConnection(status_code=500, headers=headers, has_body=True))
                want += expected.send(wsproto.events.RejectData(data=b"Internal Server Error"))
            else:
                want = expected.send(event)
            assert await _roundtrip(port, raw) == want, path
        got = await _roundtrip(port, _request(target=b"/ok", add=extra))
        assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                              b"Sec-WebSocket-Protocol: wsgateway.v1\r\n\r\n"), got
        assert seen == ["_Handshake"] * 3
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("case", ["valid", "a body"])  # taken over / uvicorn's own path through wsproto
async def test_an_upgraded_http_protocol_is_freed_without_the_cycle_collector(case: str) -> None:
    """The HTTP protocol that handed a connection over drops its parser (which holds its callbacks): it
    leaves no reference cycle for the garbage collector (gateway/gc_tuning.py)."""
    made: list[weakref.ref[asyncio.Protocol]] = []

    class Recording(HeaderDeadline):
        def __call__(self, *args: Any, **kwargs: Any) -> asyncio.Protocol:
            proto = super().__call__(*args, **kwargs)
            made.append(weakref.ref(proto))
            return proto

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
                                           http=Recording(60, 10, "httptools"),  # type: ignore[arg-type]
                                           ws=GatewayWSProtocol))
    task = asyncio.create_task(server.serve())
    gc.disable()
    try:
        await eventually(lambda: server.started, what="uvicorn to listen", watch=[task])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE_REQUESTS[case])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert len(made) == 1 and made[0]() is None, "the upgraded HTTP protocol is still alive"
        writer.close()
    finally:
        gc.enable()
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def test_wsproto_drops_what_arrives_before_the_101() -> None:
    """_Handshake drops client bytes that arrive before the 101, because wsproto's handshake does (h11 holds
    what follows an upgrade request and the post-handshake Connection never sees it); if wsproto starts
    passing them on, _Handshake must buffer them too."""
    conn = WSConnection(ConnectionType.SERVER)
    conn.receive_data(UPGRADE_REQUESTS["valid"])
    assert [type(e).__name__ for e in conn.events()] == ["Request"]
    conn.receive_data(b"\x89\x80abcd")  # a masked, empty ping, before the 101
    assert not list(conn.events())
    conn.send(wsproto.events.AcceptConnection())
    assert not list(conn.events())
    conn.receive_data(b"\x89\x80abcd")
    assert [type(e).__name__ for e in conn.events()] == ["Ping"]
    ours = _Handshake(WSConnection(ConnectionType.SERVER), lambda: UPGRADE_REQUESTS["valid"])
    ours.receive_data(b"\x89\x80abcd")
    assert not list(ours.events()) and ours.state is ConnectionState.CONNECTING


def _client_frame(draw: Any) -> bytes:
    from hypothesis import strategies as st

    from tests.support.rawws import frame

    kinds = ["text"] * 10 + ["pong"] * 3 + ["fragment", "binary", "ping", "badutf8", "unmasked", "rsv", "wide",
                                            "longpong", "widepong"]
    kind = draw(st.sampled_from(kinds))
    text = draw(st.text(max_size=draw(st.sampled_from([5, 130, 300]))))
    payload = text.encode()
    if kind == "pong":
        return frame(0xA, draw(st.binary(max_size=125)))
    if kind == "longpong":
        return frame(0xA, draw(st.binary(min_size=126, max_size=200)))
    if kind == "widepong":
        return frame(0xA, draw(st.binary(max_size=20)), wide_length=True)
    if kind == "binary":
        return frame(0x2, payload)
    if kind == "ping":
        return frame(0x9, payload[:100])
    if kind == "badutf8":
        return frame(0x1, payload + b"\xff")
    if kind == "unmasked":
        return frame(0x1, payload, mask=False)
    if kind == "rsv":
        return frame(0x1, payload, rsv=4)
    if kind == "wide":
        return frame(0x1, payload, wide_length=len(payload) < 126)
    return frame(0x1, payload, fin=kind != "fragment")


def test_client_frames_reads_what_wsproto_reads() -> None:
    """transport.client_frames (whole text and pong frames read without wsproto) returns frames only where
    wsproto's server connection reads exactly those TextMessage and Pong events from the same bytes, cut
    anywhere."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gateway.edge.transport import client_frames

    taken = []

    @settings(max_examples=800, deadline=None, derandomize=True)
    @given(st.data())
    def check(data: Any) -> None:
        frames = b"".join(_client_frame(data.draw) for _ in range(data.draw(st.integers(1, 4))))
        cut = data.draw(st.integers(0, len(frames)))
        raw = frames[:cut] if data.draw(st.integers(0, 3)) == 0 else frames
        limit = data.draw(st.sampled_from([64, 1 << 20]))
        ours = client_frames(raw, limit)
        if ours is None:
            return
        conn = Connection(ConnectionType.SERVER)
        conn.receive_data(raw)
        events = list(conn.events())
        want = ["TextMessage" if isinstance(f, str) else "Pong" for f in ours]
        assert [type(e).__name__ for e in events] == want, events
        assert [e.data if isinstance(e, wsproto.events.TextMessage) else bytes(e.payload)  # type: ignore[attr-defined]
                for e in events] == ours
        assert all(e.message_finished for e in events if isinstance(e, wsproto.events.TextMessage))
        assert all(len(f.encode()) <= limit for f in ours if isinstance(f, str))
        taken.append(len(ours))

    check()
    assert sum(taken) > 100, "too few inputs were whole text or pong frames: the comparison says little"
    assert client_frames(b"", 10) == []


@pytest.mark.parametrize("payload", [b"", b"\x00\x01\x02\x03", b"x" * 125])
def test_a_keepalive_ping_or_pong_is_written_as_wsproto_writes_it(payload: bytes) -> None:
    """_Established writes pings and pongs itself while it has made no wsproto Connection: the same bytes."""
    from gateway.edge.deflate import Inflate, negotiate

    for extensions in ([], [Inflate(negotiate(["permessage-deflate"]) or "", 1 << 20)]):
        for event in (wsproto.events.Ping(payload=payload), wsproto.events.Pong(payload=payload)):
            ours = _Established(list(extensions))
            assert ours.send(event) == Connection(ConnectionType.SERVER, list(extensions)).send(event)
            assert ours._connection is None  # nothing was made for it
    with pytest.raises(ValueError):  # too long for a control frame: wsproto's error, as before
        _Established([]).send(wsproto.events.Ping(payload=b"x" * 126))


def _head(draw: Any) -> bytes:
    """A request head: half of them as clients send them (varied target, extra headers), half with flaws."""
    from hypothesis import strategies as st

    if draw(st.booleans()):
        query = draw(st.lists(st.sampled_from([b"scope=a", b"since=5", b"scope=b%3Ac", b"x=%E2%9C%93", b"y"]),
                              max_size=3))
        extra = draw(st.lists(st.sampled_from([(b"Origin", b"https://app.example"), (b"User-Agent", b"a b/1 (c)"),
                                               (b"Sec-WebSocket-Protocol", b"wsgateway.v1, bearer.x.y.z"),
                                               (b"X-Forwarded-For", b"10.0.0.1, 10.0.0.2")]), max_size=3))
        target = b"/v1/ws" + (b"?" + b"&".join(query) if query else b"")
        lines = [b"GET " + target + b" HTTP/1.1", *(n + b": " + v for n, v in [*_VALID, *extra])]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    chars = st.sampled_from([b"a", b"Z", b"0", b"-", b"_", b" ", b"\t", b":", b"\x01", b"\x7f", b"\xe9", b"\r", b"\n",
                             b"%", b"?", b"=", b"&", b"{", b'"', b"/", b"\x00"])
    noise = st.lists(chars, max_size=6).map(b"".join)
    method = draw(st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"get"]))
    target = draw(st.sampled_from([b"/v1/ws?scope=a", b"/", b"/v1/ws", b"*", b"http://x/v1/ws"]))
    if draw(st.integers(0, 2)) == 0:
        target += draw(noise)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1 "]))
    lines = [method + b" " + target + b" " + version]
    for name, value in [*_VALID, *draw(st.lists(st.tuples(st.sampled_from([b"X-A", b"Origin", b"Host", b"Bad Name",
                                                                           b"X(y)"]), st.just(b"v") | noise),
                                                               max_size=3))]:
        if draw(st.integers(0, 5)) == 0:
            value = draw(noise) + value + draw(noise)
        sep = draw(st.sampled_from([b": ", b":", b":\t", b" : "])) if draw(st.integers(0, 4)) == 0 else b": "
        lines.append(name + sep + value)
    eol = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n"]))
    return eol.join(lines) + b"\r\n\r\n" + draw(st.sampled_from([b""] * 6 + [b"\x81\x80abcd"]))


def test_plain_upgrade_reads_what_httptools_reads() -> None:
    """UpgradeFirst reads a connection's first request itself (plain_upgrade, then upgrade_request) only where
    httptools' parser (uvicorn's) reads the same request from the same bytes, without error: method GET, the
    same target, headers and values."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    taken = []

    @settings(max_examples=800, deadline=None, derandomize=True)
    @given(st.data())
    def check(data: Any) -> None:
        raw = _head(data.draw)
        ours = plain_upgrade(raw)
        if ours is None or upgrade_request("GET", *ours, checked=True) is None:  # what UpgradeFirst takes
            return
        seen = _Parsed(raw)  # httptools raising HttpParserError fails the test
        assert seen.complete and seen.method == "GET" and seen.version == "1.1", raw
        assert (seen.url, seen.headers) == ours, raw
        assert upgrade_request("GET", *ours) == upgrade_request("GET", *ours, checked=True)  # h11's grammar too
        taken.append(raw)

    check()
    assert len(taken) > 100, f"only {len(taken)} heads were read as plain upgrades: the comparison says little"


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_endpoints_are_uvicorns_addresses(loop_kind: str, host: str) -> None:
    """transport.endpoints (compiled: two system calls, no Python socket objects) gives what uvicorn's
    get_local_addr and get_remote_addr give for the same accepted connection, and the file descriptor."""
    import socket

    import uvloop
    from uvicorn.protocols.utils import get_local_addr, get_remote_addr

    from gateway.edge import transport as tr

    assert tr._SOCKETS is not None, "gateway.core._fastpath is not built: `pip install -e .` builds it"

    async def main() -> None:
        accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

        class Keep(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.set_result(transport)  # type: ignore[arg-type]

        server = await asyncio.get_running_loop().create_server(Keep, host, 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(host, port)
        t = await accepted
        fd, local, peer = tr.endpoints(t)
        assert (local, peer) == (get_local_addr(t), get_remote_addr(t))
        assert local == (host, port) and peer is not None and peer[0] == host
        assert fd == t.get_extra_info("socket").fileno()
        saved, tr._SOCKETS = tr._SOCKETS, None  # the Python way, where the module is not built
        try:
            assert tr.endpoints(t) == (fd, local, peer)
        finally:
            tr._SOCKETS = saved
        tr._SOCKETS.sndbuf(fd, 65536)
        sock = socket.socket(fileno=os.dup(fd))
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536  # (Linux doubles it)
        finally:
            sock.close()
        writer.close()
        t.close()
        server.close()

    if loop_kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())
