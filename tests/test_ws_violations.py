"""WebSocket protocol violations are answered with a close frame (RFC 6455 7.4.1), never a bare drop.

Each case opens a real connection (opening handshake with a token, `welcome` received), then sends
hand-built frame bytes that break RFC 6455. The close frame's code is read back from the socket: 1002
for a protocol error, 1007 for a text frame (or close reason) that is not UTF-8; then the server ends
the TCP connection. A well-behaved client on the same gateway keeps receiving events throughout.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from gateway.protocol import CLOSE_INVALID_DATA, CLOSE_PROTOCOL_ERROR
from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.rawws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    RawConnection,
    close_payload,
    frame,
    open_websocket,
)
from tests.support.wait import eventually
from tests.support.wsclient import connect, events, subscribe, welcome

PING_OP = json.dumps({"op": "ping", "id": "p"}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes  # sent after the welcome frame
    code: int  # the close code the server must send


CASES = [
    Case("unmasked text frame", frame(TEXT, PING_OP, mask=False), CLOSE_PROTOCOL_ERROR),
    Case("unmasked ping", frame(PING, b"x", mask=False), CLOSE_PROTOCOL_ERROR),
    Case("RSV1 set (no extension negotiated)", frame(TEXT, PING_OP, rsv=4), CLOSE_PROTOCOL_ERROR),
    Case("RSV2 set", frame(TEXT, PING_OP, rsv=2), CLOSE_PROTOCOL_ERROR),
    Case("RSV3 set", frame(BINARY, b"x", rsv=1), CLOSE_PROTOCOL_ERROR),
    Case("reserved data opcode 0x3", frame(0x3, b"x"), CLOSE_PROTOCOL_ERROR),
    Case("reserved data opcode 0x7", frame(0x7), CLOSE_PROTOCOL_ERROR),
    Case("reserved control opcode 0xB", frame(0xB), CLOSE_PROTOCOL_ERROR),
    Case("reserved control opcode 0xF", frame(0xF, b"x"), CLOSE_PROTOCOL_ERROR),
    Case("continuation without a message", frame(CONTINUATION, b"x"), CLOSE_PROTOCOL_ERROR),
    Case("new message inside a fragmented one",
         frame(TEXT, b'{"op":', fin=False) + frame(TEXT, b'"ping"}'), CLOSE_PROTOCOL_ERROR),
    Case("fragmented ping", frame(PING, b"x", fin=False), CLOSE_PROTOCOL_ERROR),
    Case("fragmented close", frame(CLOSE, close_payload(1000), fin=False), CLOSE_PROTOCOL_ERROR),
    Case("ping over 125 bytes", frame(PING, b"x" * 126), CLOSE_PROTOCOL_ERROR),
    Case("pong over 125 bytes", frame(PONG, b"x" * 200), CLOSE_PROTOCOL_ERROR),
    Case("close over 125 bytes", frame(CLOSE, close_payload(1000, b"r" * 124)), CLOSE_PROTOCOL_ERROR),
    Case("non-minimal payload length", frame(TEXT, PING_OP, wide_length=True), CLOSE_PROTOCOL_ERROR),
    Case("close with a 1-byte payload", frame(CLOSE, b"\x03"), CLOSE_PROTOCOL_ERROR),
    Case("close code 999 (below the range)", frame(CLOSE, close_payload(999)), CLOSE_PROTOCOL_ERROR),
    Case("close code 1004 (reserved)", frame(CLOSE, close_payload(1004)), CLOSE_PROTOCOL_ERROR),
    Case("close code 1005 (never on the wire)", frame(CLOSE, close_payload(1005)), CLOSE_PROTOCOL_ERROR),
    Case("close code 1006 (never on the wire)", frame(CLOSE, close_payload(1006)), CLOSE_PROTOCOL_ERROR),
    Case("close code 1015 (never on the wire)", frame(CLOSE, close_payload(1015)), CLOSE_PROTOCOL_ERROR),
    Case("close code 2999 (unassigned protocol range)", frame(CLOSE, close_payload(2999)), CLOSE_PROTOCOL_ERROR),
    Case("close code 5000 (above the range)", frame(CLOSE, close_payload(5000)), CLOSE_PROTOCOL_ERROR),
    Case("invalid UTF-8 in a text frame", frame(TEXT, b'{"op":"ping","id":"\xff"}'), CLOSE_INVALID_DATA),
    Case("invalid UTF-8 across fragments",
         frame(TEXT, b'{"op":"ping","id":"\xc3', fin=False) + frame(CONTINUATION, b'("}'), CLOSE_INVALID_DATA),
    Case("overlong UTF-8 encoding", frame(TEXT, b'{"id":"\xc0\xaf"}'), CLOSE_INVALID_DATA),
    Case("UTF-16 surrogate encoded as UTF-8", frame(TEXT, b'"\xed\xa0\x80"'), CLOSE_INVALID_DATA),
    Case("invalid UTF-8 in a close reason", frame(CLOSE, close_payload(1000, b"bye \xff")), CLOSE_INVALID_DATA),
]


async def _violate(gw: RunningGateway, token: str, case: Case) -> str | None:
    """Run one case; None if the server answered as RFC 6455 asks, else what it did instead."""
    conn: RawConnection = await open_websocket(gw.port, token)
    try:
        _, opcode, payload = await conn.read_frame()
        assert opcode == TEXT and json.loads(payload)["type"] == "welcome", payload
        await conn.send(case.data)
        try:
            code, reason = await conn.read_close()
        except asyncio.IncompleteReadError:
            return "the connection ended without a close frame (the client sees 1006)"
        if code != case.code:
            return f"close code {code} (reason {reason!r}), expected {case.code}"
        rest = await conn.ends()  # the server ends the TCP connection after its close frame
        if rest:
            return f"{rest!r} after the close frame"
        return None
    finally:
        conn.close()


async def test_each_violation_is_answered_with_its_close_code_then_the_connection_ends(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.applied(idp, gw)
    bystander = await connect(gw.ws, idp.mint("alice"))
    await welcome(bystander)
    await subscribe(bystander, "conversation:c1")
    token = idp.mint("bob")

    outcomes = await asyncio.gather(*(_violate(gw, token, case) for case in CASES))
    wrong = [f"{case.name}: {got}" for case, got in zip(CASES, outcomes, strict=True) if got is not None]
    assert not wrong, "protocol violations not answered as RFC 6455 7.4.1 asks:\n" + "\n".join(wrong)

    # each violating connection left the hub; the bystander is the one still there, and still served
    await eventually(lambda: len(gw.gateway.hub.connections) == 1, what="only the bystander to stay connected",
                     info=lambda: f"hub connections: {len(gw.gateway.hub.connections)}")
    seq = await platform.publish("acme", "conversation:c1")
    assert (await events(bystander, 1))[0]["seq"] == seq
    await bystander.close()


async def test_a_valid_close_frame_is_still_echoed(gw: RunningGateway, idp: TestIdP) -> None:
    """The violation path only takes close events wsproto made up; a peer's own close is answered as before."""
    for code in (1000, 1001, 3000, 4999):
        conn = await open_websocket(gw.port, idp.mint("alice"))
        try:
            await conn.read_frame()  # welcome
            await conn.send(frame(CLOSE, close_payload(code, b"done")))
            echoed, _ = await conn.read_close()
            assert echoed == code
            assert await conn.ends() == b""
        finally:
            conn.close()


async def test_frames_before_the_violation_are_still_handled(gw: RunningGateway, idp: TestIdP) -> None:
    """A valid frame followed by a bad one in the same write: the first is answered, then 1002.

    (A WebSocket ping, which the protocol answers at once; an application frame's answer would come
    after the close frame, so the gateway does not write it.)"""
    conn = await open_websocket(gw.port, idp.mint("alice"))
    try:
        await conn.read_frame()  # welcome
        await conn.send(frame(PING, b"still here") + frame(TEXT, b"x", rsv=4))
        _, opcode, payload = await conn.read_frame()
        assert (opcode, payload) == (PONG, b"still here")
        code, _ = await conn.read_close()
        assert code == CLOSE_PROTOCOL_ERROR
        assert await conn.ends() == b""
    finally:
        conn.close()


async def test_a_client_that_keeps_sending_after_the_violation_still_gets_the_close_frame(
    gw: RunningGateway, idp: TestIdP
) -> None:
    """After its close frame the server reads and discards: bytes still arriving do not reset the
    connection before the client has read the close frame, and are not buffered."""
    conn = await open_websocket(gw.port, idp.mint("alice"))
    try:
        await conn.read_frame()  # welcome
        await conn.send(frame(TEXT, b"x", mask=False))
        for _ in range(50):
            await conn.send(frame(BINARY, b"y" * 4096))
        code, _ = await conn.read_close()
        assert code == CLOSE_PROTOCOL_ERROR
        assert await conn.ends() == b""
    finally:
        conn.close()


async def test_text_frames_in_any_framing_are_answered_in_order(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """Client frames as a client may write them: several in one write, a 16-bit length, then a control frame,
    a frame split over two writes and frames after that. Every one is answered, in the order sent (the
    gateway reads whole text frames itself and hands anything else to wsproto from then on)."""
    conn = await open_websocket(gw.port, idp.mint("alice"))

    def ping(rid: str, pad: int = 0) -> bytes:
        return frame(TEXT, json.dumps({"op": "ping", "id": rid + "." * pad}).encode())

    async def pongs(*ids: str) -> None:
        for rid in ids:
            _, opcode, payload = await conn.read_frame()
            assert opcode == TEXT and json.loads(payload) == {"type": "pong", "id": rid}, payload

    try:
        await conn.read_frame()  # welcome
        await conn.send(ping("a") + ping("b") + ping("c", pad=200))  # the last one has a 16-bit length
        await pongs("a", "b", "c" + "." * 200)
        await conn.send(ping("é✓"))  # non-ASCII text
        await pongs("é✓")
        await conn.send(frame(PING, b"ws-ping") + ping("d"))
        _, opcode, payload = await conn.read_frame()
        assert (opcode, payload) == (PONG, b"ws-ping")
        await pongs("d")
        split = ping("e")
        await conn.send(split[:5])
        await conn.send(split[5:] + ping("f"))
        await pongs("e", "f")
    finally:
        conn.close()


async def test_a_violation_after_plain_text_frames_is_still_answered(gw: RunningGateway, idp: TestIdP) -> None:
    """Whole text frames first (read by the gateway itself), then an invalid one: 1007, as for a first frame."""
    conn = await open_websocket(gw.port, idp.mint("alice"))
    try:
        await conn.read_frame()  # welcome
        await conn.send(frame(TEXT, PING_OP))
        _, _, payload = await conn.read_frame()
        assert json.loads(payload) == {"type": "pong", "id": "p"}
        await conn.send(frame(TEXT, b'{"op":"ping","id":"\xff"}'))
        code, _ = await conn.read_close()
        assert code == CLOSE_INVALID_DATA
        assert await conn.ends() == b""
    finally:
        conn.close()
