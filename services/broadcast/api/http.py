"""HTTP for the server API, sans I/O where it can be: JSON answers, refusals, and a bounded
request body read from the stream."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import trio

from broadcast.protocol.errors import ErrorCode
from broadcast.protocol.http_request import HttpRequest

# A request is a message of at most 4 KiB of text, JSON-escaped (up to ~6x), to at most
# MAX_BROADCAST_CHANNELS channels: 64 KiB holds any valid one with room to spare.
MAX_BODY_BYTES = 65536
# A client gets this long to send the body it announced (a slow sender holds a connection).
BODY_TIMEOUT_SECONDS = 10.0

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    411: b"Length Required",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

Headers = Sequence[tuple[bytes, bytes]]


class ApiRefusal(Exception):
    """A request the API answers with an error document."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: Headers = (),
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.retry_after = retry_after
        """Seconds to wait before retrying: ``Retry-After`` (whole seconds) and, exact, the
        error's ``retry_after`` (as in the WebSocket protocol's ``error`` event)."""


def encode_json(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(status: int, document: Any, headers: Headers = ()) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    body = encode_json(document)
    head = [
        b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Unknown")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
        b"X-Content-Type-Options: nosniff",
        b"Connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def error_response(refusal: ApiRefusal) -> bytes:
    error: dict[str, Any] = {"code": str(refusal.code), "message": refusal.message}
    headers = [*refusal.headers]
    if refusal.retry_after is not None:
        wait = max(refusal.retry_after, 0.001)  # a real positive time, never 0
        error["retry_after"] = round(wait, 3)
        # Whole seconds, rounded up, at least 1.
        headers.append((b"Retry-After", b"%d" % max(1, math.ceil(wait))))
    return json_response(refusal.status, {"error": error}, headers)


def body_length(request: HttpRequest) -> int:
    """The announced body size, refused before any of it is read: chunked or no length (411),
    a bad length (400), more than MAX_BODY_BYTES (413)."""
    if request.header(b"transfer-encoding"):
        raise ApiRefusal(
            411, ErrorCode.LENGTH_REQUIRED, "send the body with Content-Length, not chunked"
        )
    values = {v.strip() for k, v in request.headers if k == b"content-length"}
    if not values:
        raise ApiRefusal(411, ErrorCode.LENGTH_REQUIRED, "a POST needs Content-Length")
    if len(values) > 1 or not (value := values.pop()).isdigit() or len(value) > 18:
        raise ApiRefusal(400, ErrorCode.BAD_COMMAND, "Content-Length is not a number")
    length = int(value)
    if length > MAX_BODY_BYTES:
        raise ApiRefusal(
            413,
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}",
        )
    return length


async def read_body(request: HttpRequest, stream: trio.abc.Stream) -> bytes:
    """The request body, at most MAX_BODY_BYTES, read within BODY_TIMEOUT_SECONDS."""
    length = body_length(request)
    body = bytearray(request.trailing[:length])
    if len(body) < length and request.header(b"expect") == b"100-continue":
        # curl asks before sending a body over 1 KiB, and waits a second for the answer.
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
    with trio.move_on_after(BODY_TIMEOUT_SECONDS):
        while len(body) < length:
            data = await stream.receive_some(length - len(body))
            if not data:
                break
            body += data
    if len(body) < length:
        raise ApiRefusal(400, ErrorCode.BAD_JSON, "the body ended before its Content-Length")
    return bytes(body)


def parse_json_object(request: HttpRequest, body: bytes) -> dict[str, Any]:
    content_type = request.header(b"content-type").split(b";", 1)[0].strip()
    if content_type != b"application/json":
        raise ApiRefusal(
            415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json"
        )
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiRefusal(400, ErrorCode.BAD_JSON, "the body is not JSON (UTF-8)") from None
    if not isinstance(document, dict):
        raise ApiRefusal(400, ErrorCode.BAD_JSON, "the body must be a JSON object")
    return document
