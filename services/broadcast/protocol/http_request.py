"""Reading one HTTP request head, sans I/O: the health checks and the WebSocket handshake."""

from __future__ import annotations

from dataclasses import dataclass

import h11

# Request line and headers together; a browser's handshake is well under 4 KiB.
MAX_REQUEST_HEAD_BYTES = 16384


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    trailing: bytes
    """Bytes the client sent after the request head (a WebSocket client's first frames)."""

    def header(self, name: bytes) -> bytes:
        return b", ".join(v for k, v in self.headers if k == name).lower()

    @property
    def wants_websocket(self) -> bool:
        return b"websocket" in self.header(b"upgrade")


class BadRequest(Exception):
    """Not an HTTP/1.x request head we can read: malformed, too large, or cut short."""


class RequestHeadParser:
    """Feed bytes until a request head is complete; h11 does the parsing and the size limit."""

    def __init__(self) -> None:
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)

    def feed(self, data: bytes | bytearray) -> HttpRequest | None:
        """The request once its head is complete, else None. ``b""`` means the peer closed."""
        self._parser.receive_data(bytes(data))
        try:
            event = self._parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            raise BadRequest(f"unexpected {type(event).__name__}")
        trailing, _ = self._parser.trailing_data
        headers = [(k.lower(), v) for k, v in event.headers.raw_items()]
        return HttpRequest(event.method, event.target, headers, bytes(trailing))
