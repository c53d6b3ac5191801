"""The HTTP side of the port: reading one request, and the health endpoints for orchestrators."""

from __future__ import annotations

from dataclasses import dataclass

import h11
import trio

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
    pass


async def read_request(stream: trio.abc.Stream, initial: bytes) -> HttpRequest:
    """Read one request head. The caller bounds the time it may take."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    parser.receive_data(initial)
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if isinstance(event, h11.Request):
            trailing, _ = parser.trailing_data
            headers = [(k.lower(), v) for k, v in event.headers.raw_items()]
            return HttpRequest(event.method, event.target, headers, bytes(trailing))
        if event is h11.NEED_DATA:
            parser.receive_data(await stream.receive_some(MAX_REQUEST_HEAD_BYTES))
        else:
            raise BadRequest(f"unexpected {type(event).__name__}")


def response(status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 503: b"Service Unavailable"}
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason.get(status, b"Unknown"))
    head += b"Content-Type: " + content_type + b"\r\n"
    head += b"Content-Length: %d\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n" % len(
        body
    )
    return head + body
