"""permessage-deflate (RFC 7692) through real clients: the `websockets` library (which offers it by default)
and raw sockets for the bytes on the wire, hostile offers and hostile compressed frames.

The gateway compresses each frame once for every compressing client (wsgateway_frames_compressed_total),
answers `server_no_context_takeover; client_no_context_takeover`, sends plain frames to clients that did
not offer it, declines an offer it cannot honour (the handshake still succeeds), and inflates the
client's compressed frames within WSGATEWAY_MAX_FRAME_BYTES (beyond: close 1009).
"""

from __future__ import annotations

import asyncio
import json
import zlib

import pytest
from websockets.asyncio.client import ClientConnection

from gateway.devtools.natsproc import NatsProcess
from gateway.protocol import CLOSE_INVALID_DATA, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.rawws import (
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    RawConnection,
    frame,
    open_websocket,
    response_header,
    upgrade_request,
)
from tests.support.wait import eventually
from tests.support.wsclient import connect, events, recv_type, subscribe, welcome

ADMIN = {"admins": ["user:alice"]}
ANSWER = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"
OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
TEXTY = "the agent thinks about the question and calls a tool; " * 40  # compressible, like real events


def deflated(payload: bytes) -> bytes:
    """A message compressed as a client does (RFC 7692 7.2.1: sync flush, the 4-byte tail removed)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflated(body: bytes) -> bytes:
    """A compressed server message, inflated as a client with no context takeover does."""
    return zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")


async def read_message(conn: RawConnection) -> tuple[bool, bytes, int]:
    """The next server text message over raw bytes: (compressed, its JSON, its size on the wire)."""
    fin, rsv, opcode, payload, size = await conn.read_raw_frame()
    assert fin and opcode == TEXT, (fin, opcode, payload)
    assert rsv in (0, 4), f"RSV bits {rsv}"
    return bool(rsv), inflated(payload) if rsv else payload, size


def compresses(ws: ClientConnection) -> bool:
    return any(e.name == "permessage-deflate" for e in ws.protocol.extensions)


async def test_compressing_and_plain_clients_get_identical_events(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    zipped = await connect(gw.ws, idp.mint("alice"))  # the library's default: offers permessage-deflate
    plain = await connect(gw.ws, idp.mint("alice"), compression=None)
    assert compresses(zipped) and not compresses(plain)
    for ws in (zipped, plain):
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"  # the client's frame: compressed
    seqs = [await platform.publish("acme", "conversation:c1", data={"text": TEXTY, "i": i}) for i in range(20)]
    got_zipped, got_plain = await events(zipped, 20), await events(plain, 20)
    assert [f["seq"] for f in got_zipped] == seqs
    assert got_zipped == got_plain
    assert await gw.metric("wsgateway_frames_compressed_total") > 0
    await zipped.close()
    await plain.close()


async def test_compressed_frames_are_smaller_on_the_wire_and_carry_the_same_bytes(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    zipped = await open_websocket(gw.port, idp.mint("alice"), "/v1/ws?scope=conversation:c1", headers=(OFFER,))
    plain = await open_websocket(gw.port, idp.mint("alice"), "/v1/ws?scope=conversation:c1")
    try:
        assert response_header(zipped.head, b"sec-websocket-extensions") == ANSWER
        assert response_header(plain.head, b"sec-websocket-extensions") is None
        for conn in (zipped, plain):
            for kind in ("welcome", "subscribed"):
                _, payload, _ = await read_message(conn)
                assert json.loads(payload)["type"] == kind
        seq = await platform.publish("acme", "conversation:c1", data={"text": TEXTY})
        was_compressed, z_payload, z_size = await read_message(zipped)
        plain_compressed, p_payload, p_size = await read_message(plain)
        assert was_compressed and not plain_compressed
        assert z_payload == p_payload  # byte for byte the same frame once inflated
        assert json.loads(z_payload)["seq"] == seq
        assert z_size < p_size // 4, (z_size, p_size)
    finally:
        zipped.close()
        plain.close()


async def test_each_frame_is_compressed_once_whatever_the_number_of_compressing_clients(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    clients = [await connect(gw.ws, idp.mint("alice")) for _ in range(4)]
    clients.append(await connect(gw.ws, idp.mint("alice"), compression=None))
    for ws in clients:
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
    before = await gw.metric("wsgateway_frames_compressed_total")  # welcome and subscribed: one per client
    assert before == 8
    seqs = [await platform.publish("acme", "conversation:c1", data={"text": TEXTY, "i": i}) for i in range(5)]
    for ws in clients:
        assert [f["seq"] for f in await events(ws, 5)] == seqs
    assert await gw.metric("wsgateway_frames_compressed_total") - before == 5
    for ws in clients:
        await ws.close()


async def test_compression_can_be_switched_off(nats_server: NatsProcess, idp: TestIdP, platform: Platform) -> None:
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, ws_compression=False) as g:
        ws = await connect(g.ws, idp.mint("alice"))
        assert not compresses(ws)
        await welcome(ws)
        await ws.close()
        raw = await open_websocket(g.port, idp.mint("alice"), headers=(OFFER,))
        try:
            assert response_header(raw.head, b"sec-websocket-extensions") is None
            assert (await read_message(raw))[0] is False
        finally:
            raw.close()


OFFERS: list[tuple[bytes, bytes | None]] = [
    # (the client's Sec-WebSocket-Extensions, the gateway's answer; None: declined, no header)
    (b"permessage-deflate", ANSWER),
    (b"permessage-deflate; client_max_window_bits", ANSWER),
    (b"permessage-deflate; client_max_window_bits=10", ANSWER),
    (b'permessage-deflate; client_max_window_bits="12"', ANSWER),
    (b"permessage-deflate; server_no_context_takeover; client_no_context_takeover", ANSWER),
    (b"permessage-deflate;server_max_window_bits=15", ANSWER + b"; server_max_window_bits=15"),
    (b"x-webkit-deflate-frame, permessage-deflate", ANSWER),
    (b"permessage-deflate; server_max_window_bits=10, permessage-deflate", ANSWER),  # the first acceptable wins
    (b"permessage-deflate; server_max_window_bits=10", None),  # a smaller window than the shared frames'
    (b"permessage-deflate; server_max_window_bits", None),  # this one needs a value
    (b"permessage-deflate; client_max_window_bits=16", None),
    (b"permessage-deflate; client_max_window_bits=7", None),
    (b"permessage-deflate; client_max_window_bits=010", None),
    (b"permessage-deflate; client_max_window_bits=abc", None),
    (b"permessage-deflate; client_max_window_bits=", None),
    (b"permessage-deflate; client_max_window_bits=" + b"9" * 5000, None),
    (b"permessage-deflate; server_no_context_takeover=1", None),
    (b"permessage-deflate; client_no_context_takeover; client_no_context_takeover", None),
    (b"permessage-deflate; mystery=1", None),
    (b"permessage-deflate; ;", None),
    (b"permessage-deflate; =15", None),
    (b"permessage-deflate; " + b"a" * 3000, None),
    (b"x-webkit-deflate-frame", None),
    (b",,,;;;", None),
]


async def _handshake_with(gw: RunningGateway, token: str, offer: bytes) -> tuple[bytes | None, bool]:
    """The answer to one offer, and whether the welcome frame came compressed."""
    conn = await open_websocket(gw.port, token, headers=(b"Sec-WebSocket-Extensions: " + offer,))
    try:
        answer = response_header(conn.head, b"sec-websocket-extensions")
        was_compressed, payload, _ = await read_message(conn)
        assert json.loads(payload)["type"] == "welcome"
        return answer, was_compressed
    finally:
        conn.close()


async def test_offers_are_checked_parameter_by_parameter_and_a_bad_one_is_declined_not_failed(
    gw: RunningGateway, idp: TestIdP
) -> None:
    token = idp.mint("alice")
    got = await asyncio.gather(*(_handshake_with(gw, token, offer) for offer, _ in OFFERS))
    wrong = [f"{offer!r}: answered {answer!r}, expected {want!r}"
             for (offer, want), (answer, _) in zip(OFFERS, got, strict=True) if answer != want]
    assert not wrong, "\n".join(wrong)
    # the welcome frame (compressible JSON) comes compressed exactly when the extension was agreed
    assert [c for _, c in got] == [want is not None for _, want in OFFERS]


@pytest.mark.parametrize("header", [
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=\u00e9",
    "Sec-WebSocket-Protocol: wsgateway.v1, b\u00e9arer",
    "Connection: Upgrade, k\u00e9ep",
])
async def test_an_upgrade_header_that_is_not_ascii_is_a_400_not_a_server_error(
    gw: RunningGateway, idp: TestIdP, header: str
) -> None:
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(upgrade_request(token=idp.mint("alice"), headers=(header.encode("latin-1"),)))
        head = await conn.response_head()
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert (await conn.ends()).endswith(b"ASCII text")
    finally:
        conn.close()


async def _open_compressing(gw: RunningGateway, token: str) -> RawConnection:
    conn = await open_websocket(gw.port, token, headers=(OFFER,))
    assert response_header(conn.head, b"sec-websocket-extensions") == ANSWER
    assert json.loads((await read_message(conn))[1])["type"] == "welcome"
    return conn


PING_OP = json.dumps({"op": "ping", "id": "p" * 40}).encode()


async def test_compressed_client_frames_are_inflated_even_fragmented(gw: RunningGateway, idp: TestIdP) -> None:
    conn = await _open_compressing(gw, idp.mint("alice"))
    try:
        await conn.send(frame(TEXT, deflated(PING_OP), rsv=4))
        assert json.loads((await read_message(conn))[1]) == {"type": "pong", "id": "p" * 40}
        body = deflated(PING_OP)
        # one compressed message in three frames (RSV1 on the first only), a WebSocket ping in between
        await conn.send(frame(TEXT, body[:5], rsv=4, fin=False) + frame(PING, b"hi")
                        + frame(CONTINUATION, body[5:9], fin=False) + frame(CONTINUATION, body[9:]))
        _, opcode, payload = await conn.read_frame()
        assert (opcode, payload) == (PONG, b"hi")
        assert json.loads((await read_message(conn))[1]) == {"type": "pong", "id": "p" * 40}
        await conn.send(frame(TEXT, PING_OP))  # an uncompressed message on a compressing connection is fine
        assert json.loads((await read_message(conn))[1]) == {"type": "pong", "id": "p" * 40}
    finally:
        conn.close()


BOMB = deflated(b'{"op":"ping","id":"' + b"0" * (4 * 1024 * 1024) + b'"}')  # ~4 KiB inflating to 4 MiB


@pytest.mark.parametrize(("name", "data", "code"), [
    ("a message inflating past the frame size limit", frame(TEXT, BOMB, rsv=4), CLOSE_TOO_BIG),
    ("the same bomb in fragments", frame(TEXT, BOMB[:100], rsv=4, fin=False) + frame(CONTINUATION, BOMB[100:]),
     CLOSE_TOO_BIG),
    ("data that is not deflate", frame(TEXT, b"\xff\xfe\xfd\xfc not deflate", rsv=4), CLOSE_INVALID_DATA),
    ("a compressed control frame", frame(PING, deflated(b"x"), rsv=4), CLOSE_PROTOCOL_ERROR),
    ("RSV1 on a continuation frame",
     frame(TEXT, deflated(PING_OP)[:3], rsv=4, fin=False) + frame(CONTINUATION, deflated(PING_OP)[3:], rsv=4),
     CLOSE_PROTOCOL_ERROR),
    ("RSV2 with the extension", frame(TEXT, deflated(PING_OP), rsv=6), CLOSE_PROTOCOL_ERROR),
])
async def test_hostile_compressed_frames_are_closed_with_their_code(
    gw: RunningGateway, idp: TestIdP, name: str, data: bytes, code: int
) -> None:
    conn = await _open_compressing(gw, idp.mint("alice"))
    try:
        await conn.send(data)
        got, reason = await conn.read_close()
        assert got == code, (name, got, reason)
        if code == CLOSE_TOO_BIG:
            assert b"inflated" in reason
        assert await conn.ends() == b""
    finally:
        conn.close()
    await eventually(lambda: not gw.gateway.hub.connections, what="the connection to leave the hub")


async def test_a_compressing_client_resumes_like_any_other(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """Replayed frames (the resume path) are compressed too and arrive in order."""
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    seqs = [await platform.publish("acme", "conversation:c1", data={"text": TEXTY, "i": i}) for i in range(5)]
    ws = await connect(f"{gw.ws}?scope=conversation:c1&since={seqs[0] - 1}", idp.mint("alice"))
    assert compresses(ws)
    await welcome(ws)
    assert (await recv_type(ws, "subscribed"))["recovered"] is True
    got = await events(ws, 5)
    assert [f["seq"] for f in got] == seqs
    assert [f["event"]["data"] for f in got] == [{"text": TEXTY, "i": i} for i in range(5)]
    await ws.close()
