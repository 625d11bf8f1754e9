"""The uvicorn internals gateway/edge/transport.py builds on are still there and still behave as it expects.

`GatewayWSProtocol` subclasses uvicorn's wsproto `WSProtocol` and uses its private attributes and
methods (there is no public API for a raw write path). pyproject pins uvicorn to the tested minor
version; when that pin is raised, this test names each private attribute or method that disappeared
or changed, instead of the gateway failing somewhere in the fan-out path.

The lists below are what transport.py relies on; keep them in step with it (the seam's code stays in
transport.py, its inventory lives here).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import uvicorn
import websockets
import wsproto.events
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState, ConnectionType

from tests.support.ports import free_port
from tests.support.wait import eventually

# Instance attributes transport.py reads or writes, and what they must be once the handshake is done.
ATTRIBUTES: dict[str, type | tuple[type, ...]] = {
    "transport": asyncio.Transport,  # RawChannel writes frames to it directly
    "loop": asyncio.AbstractEventLoop,  # close_now arms the close timer on it
    "scope": dict,  # handle_connect puts the RawChannel into scope["extensions"]
    "conn": WSConnection,  # swapped for a lighter wrapper of `conn.connection` after the accept
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
}
# What GatewayWSProtocol adds: names uvicorn's class must not have (or an override would be silent).
ADDED = ("channel", "flag", "close_now", "fail", "failed")
# What uvicorn may call on the objects transport.py replaces with lighter ones.
QUEUE_USES = {"put_nowait", "get", "empty"}  # _Inbox
WRITABLE_USES = {"set", "clear", "is_set", "wait"}  # _Flag
CONN_USES = {"send", "receive_data", "events", "state"}  # _Established (after the accept)
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
    ],
    # ... and relies on connection_lost to cancel that timer and to wake writers waiting on `writable`
    "connection_lost": ["self.close_timer.cancel()", "self.writable.set()", "self.disconnected = True"],
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
