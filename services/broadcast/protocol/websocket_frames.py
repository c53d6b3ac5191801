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
