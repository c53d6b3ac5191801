"""The few bytes of the wire the load generator speaks, written by hand so clients stay cheap.

Receivers and senders do a raw WebSocket handshake, then read server frames themselves: server
frames are never masked and carry no extensions (protocol/websocket_frames.py), so a frame is
``0x81``, a length (7 bits, or 126 + 2 bytes, or 127 + 8 bytes) and the payload. Client frames
must be masked (RFC 6455 5.3); a zero masking key leaves the payload as it is, which the server
accepts and which saves the XOR in Python.

The text of every benchmark message is ``<step>.<sender>:<seq>:<time.time_ns()>``: it tells a
receiver which step and sender it belongs to, its place in that sender's sequence, and when it
was sent (all processes run on one machine, so one clock).
"""

from __future__ import annotations

import base64
import os
from urllib.parse import urlencode

from broadcast.protocol import ids

TEXT = 0x81
CLOSE = 0x88
PING = 0x89
PONG = 0x8A

MESSAGE_PREFIX = ids.MESSAGE_PREFIX  # defined once, in protocol/ids.py
TEXT_FIELD = b'"text":"'
ACK_PREFIX = b'{"type":"ack"'
ERROR_PREFIX = b'{"type":"error"'
_ZERO_MASK = b"\x00\x00\x00\x00"
# A handshake answer (101 and its headers) is far below this; more means something is wrong.
MAX_HEAD_BYTES = 16384


def upgrade_request(host: str, port: int, query: dict[str, str]) -> bytes:
    """A WebSocket upgrade for ``ws://host:port/?query``."""
    key = base64.b64encode(os.urandom(16))
    target = "/?" + urlencode(query) if query else "/"
    return (
        (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )


def split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` once the response head is complete; raises if it is not a 101."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD_BYTES:
            raise ConnectionError("no end to the handshake answer")
        return None
    head = data[:end]
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
    return head, data[end + 4 :]


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame with a zero mask (so the payload needs no XOR)."""
    size = len(payload)
    if size < 126:
        header = bytes((opcode, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


def next_frame(buffer: bytes, pos: int) -> tuple[int, int, int] | None:
    """``(opcode byte, payload start, payload end)`` of the server frame at ``pos``, or None if
    it is not all there yet."""
    available = len(buffer) - pos
    if available < 2:
        return None
    size = buffer[pos + 1]
    start = pos + 2
    if size == 126:
        if available < 4:
            return None
        size = int.from_bytes(buffer[start : start + 2], "big")
        start += 2
    elif size == 127:
        if available < 10:
            return None
        size = int.from_bytes(buffer[start : start + 8], "big")
        start += 8
    end = start + size
    if end > len(buffer):
        return None
    return buffer[pos], start, end


def message_text(step: int, sender: int, seq: int, sent_ns: int) -> str:
    return f"{step}.{sender}:{seq}:{sent_ns}"


def parse_text(text: bytes) -> tuple[int, int, int, int]:
    """``(step, sender, seq, sent_ns)``; raises ValueError for text that is not ours."""
    head, seq, sent_ns = text.split(b":")
    step, sender = head.split(b".")
    return int(step), int(sender), int(seq), int(sent_ns)


def parse_id(message_id: bytes) -> tuple[int, int]:
    """Ids compare as the pair (milliseconds, sequence), never as strings (docs/protocol.md)."""
    ms, _, seq = message_id.partition(b"-")
    return int(ms), int(seq)
