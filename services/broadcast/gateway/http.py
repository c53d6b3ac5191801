"""The HTTP side of the port: reading one request head from a stream, and writing answers."""

from __future__ import annotations

import trio

from broadcast.protocol.http_request import (
    MAX_REQUEST_HEAD_BYTES,
    BadRequest,
    HttpRequest,
    RequestHeadParser,
)

__all__ = ["BadRequest", "HttpRequest", "read_request", "response"]


async def read_request(stream: trio.abc.Stream, initial: bytes) -> HttpRequest:
    """Read one request head. The caller bounds the time it may take."""
    parser = RequestHeadParser()
    request = parser.feed(initial)
    while request is None:
        request = parser.feed(await stream.receive_some(MAX_REQUEST_HEAD_BYTES))
    return request


def response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra_headers: bytes = b"",
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 503: b"Service Unavailable"}
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason.get(status, b"Unknown"))
    head += b"Content-Type: " + content_type + b"\r\nX-Content-Type-Options: nosniff\r\n"
    head += extra_headers
    head += b"Content-Length: %d\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n" % len(
        body
    )
    return head + body
