"""Encoding one WebSocket text frame once, so the same bytes can go to every client.

Server-to-client frames are never masked and we negotiate no extensions, so a frame's bytes
do not depend on the connection (RFC 6455 section 5.2).
"""

_FIN_TEXT = 0x81


def encode_text_frame(payload: bytes) -> bytes:
    """A single, final, unmasked text frame carrying ``payload`` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        header = bytes((_FIN_TEXT, size))
    elif size < 1 << 16:
        header = bytes((_FIN_TEXT, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((_FIN_TEXT, 127)) + size.to_bytes(8, "big")
    return header + payload


_FIN_CLOSE = 0x88
_FIN_PING = 0x89
_FIN_PONG = 0x8A


def _frame(first_byte: int, payload: bytes) -> bytes:
    # Control frames carry at most 125 bytes (RFC 6455 section 5.5).
    return bytes((first_byte, len(payload))) + payload


def encode_close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125-byte control-frame limit."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return _frame(_FIN_CLOSE, payload)


def encode_pong_frame(payload: bytes) -> bytes:
    return _frame(_FIN_PONG, payload[:125])


def encode_ping_frame(payload: bytes) -> bytes:
    return _frame(_FIN_PING, payload[:125])
