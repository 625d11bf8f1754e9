"""Raw sockets for the edge's own rules: HTTP requests sent byte by byte, WebSocket frames built by hand.

The `websockets` client (tests/support/wsclient.py) refuses to send a malformed frame or an unfinished
request, which is exactly what these tests need to send. Everything here is asyncio streams: the
gateway under test runs in the same event loop, so a blocking socket would stall it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

from tests.support.wait import HANG_S

# Opcodes (RFC 6455 5.2)
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
    wide_length: bool = False,
) -> bytes:
    """One WebSocket frame as a client would send it: `rsv` is the three reserved bits (0-7, RSV1 = 4),
    `mask=False` leaves it unmasked (clients must mask), `wide_length` spends two length bytes on a
    payload that fits in the first (a non-minimal length, which RFC 6455 forbids)."""
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    mask_bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126 and not wide_length:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawConnection:
    """One TCP connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head = b""  # the HTTP response head of the opening handshake (`open_websocket`)

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response_head(self, timeout: float = HANG_S) -> bytes:
        """The HTTP response's status line and headers."""
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)

    async def until_closed(self) -> bytes:
        """Everything the server still sends until it closes the connection (EOF or reset)."""
        data = b""
        try:
            while chunk := await self.reader.read(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return data

    async def ends(self, timeout: float = HANG_S) -> bytes:
        """`until_closed` with a hang guard."""
        return await asyncio.wait_for(self.until_closed(), timeout)

    async def read_frame(self, timeout: float = HANG_S) -> tuple[bool, int, bytes]:
        """The next server frame: (fin, opcode, payload). Server frames are never masked."""
        fin, _, opcode, payload, _ = await self.read_raw_frame(timeout)
        return fin, opcode, payload

    async def read_raw_frame(self, timeout: float = HANG_S) -> tuple[bool, int, int, bytes, int]:
        """The next server frame: (fin, rsv bits (RSV1 = 4), opcode, payload, its size on the wire)."""
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "the server masked a frame"
            n, size = b1 & 0x7F, 2
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                size += 2
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                size += 8
            return bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, await self.reader.readexactly(n), size + n

    async def read_close(self, timeout: float = HANG_S) -> tuple[int | None, bytes]:
        """Skip frames up to the server's close frame; its (code, reason bytes) (code None: empty payload).

        Raises `asyncio.IncompleteReadError` when the connection ends without a close frame."""
        async with asyncio.timeout(timeout):
            while True:
                _, opcode, payload = await self.read_frame()
                if opcode == CLOSE:
                    if not payload:
                        return None, b""
                    return struct.unpack("!H", payload[:2])[0], payload[2:]

    def close(self) -> None:
        self.writer.close()


def upgrade_request(
    path: str = "/v1/ws", *, token: str | None = None, host: str = "127.0.0.1", headers: tuple[bytes, ...] = ()
) -> bytes:
    """A complete WebSocket upgrade request (RFC 6455 4.1), `Authorization: Bearer` when `token` is given;
    `headers` are more header lines, as bytes (e.g. `Sec-WebSocket-Extensions: ...`)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return b"\r\n".join([line.encode() for line in lines] + list(headers)) + b"\r\n\r\n"


def response_header(head: bytes, name: bytes) -> bytes | None:
    """The value of one header of an HTTP response head (None: absent)."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


async def open_websocket(
    port: int, token: str, path: str = "/v1/ws", *, headers: tuple[bytes, ...] = ()
) -> RawConnection:
    """A raw connection after a real opening handshake (101), ready for hand-made frames; the response
    head is kept in `head`."""
    conn = await RawConnection.open(port)
    await conn.send(upgrade_request(path, token=token, headers=headers))
    head = await conn.response_head()
    assert head.startswith(b"HTTP/1.1 101 "), f"no upgrade: {head!r}"
    conn.head = head
    return conn
