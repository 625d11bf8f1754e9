"""permessage-deflate (RFC 7692), shaped for fan-out: each server frame is compressed ONCE for all clients.

The gateway always answers `server_no_context_takeover; client_no_context_takeover`: no message depends
on an earlier one in either direction, so one compressed form of a frame is valid on every compressing
connection (`Deflater`, shared by the process; the bytes are cached on the frame, `OutFrame.deflated`),
and an idle connection keeps no zlib state at all (a deflate context is ~256 KiB, an inflate one ~40).

Three parts:
- `negotiate`: the client's offers (`Sec-WebSocket-Extensions`) checked parameter by parameter; the
  first acceptable offer wins, a bad one is declined (the connection goes on uncompressed), never a
  failed handshake.
- `Inflate`: the wsproto extension of a connection that negotiated it: inflates the client's compressed
  messages (RSV1) within the frame size limit (beyond it: close 1009), and sends its own (wsproto's)
  data frames uncompressed, which RFC 7692 allows.
- `Deflater`: the server frames' compressed form, made at most once per frame.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

if TYPE_CHECKING:
    from gateway.core.queue import OutFrame

NAME = "permessage-deflate"
ANSWER = "server_no_context_takeover; client_no_context_takeover"

_PARAM = re.compile(r"[a-z_]{1,40}")  # every parameter RFC 7692 defines is lower-case letters and `_`
_BITS = re.compile(r"(?:[89]|1[0-5])")  # 8..15, no leading zero (RFC 7692 7.1.2)
_FLAGS = frozenset({"server_no_context_takeover", "client_no_context_takeover"})
_TAIL = b"\x00\x00\xff\xff"  # the empty stored block a sync/full flush ends with (RFC 7692 7.2.1)
_FIN_RSV1_TEXT = 0x80 | 0x40 | 0x1


def negotiate(offers: Sequence[str]) -> str | None:
    """The response parameters for the first acceptable permessage-deflate offer; None: decline them all.

    An offer is declined (RFC 7692 5, 7.1) when it has a parameter that is unknown, repeated or of a bad
    value, or asks for `server_max_window_bits` below 15: the shared compressed frames use a 32 KiB
    window, and one per window size would defeat compressing once. `client_max_window_bits` (any valid
    form) is accepted and not answered: the client keeps its window, the gateway inflates with 15 bits.
    """
    for offer in offers:
        name, _, rest = offer.partition(";")
        if name.strip() != NAME:
            continue
        answer = _accept(rest)
        if answer is not None:
            return answer
    return None


def _accept(params: str) -> str | None:
    seen: set[str] = set()
    server_bits = False
    for item in params.split(";") if params.strip() else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if not _PARAM.fullmatch(key) or key in seen:
            return None
        seen.add(key)
        if len(value) >= 2 and value[0] == value[-1] == '"':  # quoted-string: its content must be a token
            value = value[1:-1]
        if key in _FLAGS:
            if eq:
                return None
        elif key == "client_max_window_bits":
            if eq and not _BITS.fullmatch(value):
                return None
        elif key == "server_max_window_bits":
            if value != "15":  # a valid smaller window is declined too (see `negotiate`)
                return None
            server_bits = True
        else:
            return None
    return ANSWER + ("; server_max_window_bits=15" if server_bits else "")


class Inflate(Extension):
    """The negotiated extension on one connection: inflates the client's compressed messages, bounded.

    Holds an inflater only while a compressed message is arriving (no context takeover): nothing per
    idle connection but this small object."""

    __slots__ = ("_frame", "_inflater", "_left", "_limit", "_message", "answer", "failure")
    name = NAME

    def __init__(self, answer: str, limit: int) -> None:
        self.answer = answer  # the response's parameters (`negotiate`)
        self._limit = limit  # largest inflated message (WSGATEWAY_MAX_FRAME_BYTES)
        self._left = 0  # bytes the current message may still inflate to
        self._message = False  # the message being received is compressed
        self._frame = False  # the frame being received belongs to it (not an interleaved control frame)
        self._inflater: zlib._Decompress | None = None
        self.failure: str | None = None  # why the last inflate failed, for the close reason

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool | str:  # a client's side: the gateway never offers
        return False

    def accept(self, offer: str) -> bool | str | None:
        return self.answer  # already chosen by `negotiate` (wsproto asks once per offer: same answer)

    def finalize(self, offer: str) -> None:  # a client's side
        return None

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR  # control frames are never compressed
            self._frame = False
            return RsvBits(True, False, False)
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR  # only a message's first frame carries RSV1
        else:
            self._message = rsv.rsv1
            if rsv.rsv1:
                self._inflater = zlib.decompressobj(-15)
                self._left = self._limit
        self._frame = self._message
        return RsvBits(True, False, False)

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        inflater = self._inflater
        assert inflater is not None
        try:
            out = inflater.decompress(data, self._left + 1)
        except zlib.error as exc:
            self._inflater = None
            self.failure = f"bad compressed data: {exc}"
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > self._left:
            self._inflater = None
            self.failure = f"message exceeds the maximum size ({self._limit} bytes) once inflated"
            return CloseReason.MESSAGE_TOO_BIG
        self._left -= len(out)
        return out

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        return self._inflate(data) if self._frame else data

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        if not (fin and self._frame):
            return None
        out = self._inflate(_TAIL)
        self._inflater = None  # client_no_context_takeover: the next message starts afresh
        self._message = self._frame = False
        return out

    def frame_outbound(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        return rsv, data  # wsproto's own messages go uncompressed (RSV1 clear); the data path uses Deflater

    def __repr__(self) -> str:
        return f"<Inflate {NAME}; {self.answer}>"


def frame_header(first: int, n: int) -> bytes:
    """An unmasked server frame's header: first byte, then the payload length (RFC 6455 5.2)."""
    if n < 126:
        return struct.pack("!BB", first, n)
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n)
    return struct.pack("!BBQ", first, 127, n)


class Deflater:
    """The compressed WebSocket form of server frames, made once per frame for every compressing client.

    One deflate context for the process, fully flushed after each frame (Z_FULL_FLUSH resets its history),
    so each frame inflates on its own, as `server_no_context_takeover` promises. A frame that would not
    shrink goes uncompressed (RSV1 clear): permessage-deflate allows it per message. `counted` is told
    how many frames were compressed (wsgateway_frames_compressed_total)."""

    def __init__(self, counted: Callable[[int], object], level: int = 1) -> None:
        # level 1: for event-sized JSON (hundreds of bytes) within a few % of level 6's size, at a fraction of
        # its CPU on larger frames (bench/deflate.py)
        self._level = level
        self._z: zlib._Compress | None = None  # made for the first compressed frame: ~260 KiB of zlib state
        self._counted = counted

    def frame(self, f: OutFrame) -> bytes:
        z = f.deflated
        if z is None:
            c = self._z
            if c is None:
                c = self._z = zlib.compressobj(self._level, zlib.DEFLATED, -15, 8)
            body = (c.compress(f.payload) + c.flush(zlib.Z_FULL_FLUSH))[:-4]
            z = f.deflated = frame_header(_FIN_RSV1_TEXT, len(body)) + body if len(body) < len(f.payload) else f.data
            self._counted(1)
        return z

    def encode(self, frames: Sequence[OutFrame]) -> bytes:
        """The wire bytes of queued frames on a compressing connection (a `Channel.encode`)."""
        if len(frames) == 1:
            z = frames[0].deflated
            return z if z is not None else self.frame(frames[0])
        return b"".join([f.deflated or self.frame(f) for f in frames])


__all__ = ["ANSWER", "NAME", "Deflater", "Inflate", "frame_header", "negotiate"]
