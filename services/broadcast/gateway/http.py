"""The HTTP side of the port: reading one request head from a stream, and writing answers."""

from __future__ import annotations

from http import HTTPStatus

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
    *,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (no body for ``HEAD``)."""
    head = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
    head += b"Content-Type: " + content_type + b"\r\nX-Content-Type-Options: nosniff\r\n"
    head += extra_headers
    head += b"Content-Length: %d\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n" % len(
        body
    )
    return head if head_only else head + body


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
