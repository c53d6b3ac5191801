"""Where a client's token comes from, sans I/O: the WebSocket handshake, or a line client's
first line. Both functions only *find* a token; ``TokenVerifier.verify`` decides about it.

They never raise, whatever bytes a client sends: a malformed header is the same as no token.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl

# RFC 6750 section 2.1: ``Authorization: Bearer <token>``; the scheme is case-insensitive.
_BEARER: Final = b"bearer"

# The query parameter a browser uses, since it cannot set headers on a WebSocket.
TOKEN_QUERY_PARAMETER: Final = "token"

# The line protocol's command for authenticating, sent as the very first line.
AUTH_COMMAND: Final = "/auth"


def token_from_request(headers: list[tuple[bytes, bytes]], target: bytes) -> str | None:
    """The token of a WebSocket handshake: ``Authorization: Bearer …``, else ``?token=…``.

    The header wins when both are present: it is what non-browser clients send, and a query
    string is the weaker place for a secret (proxies and access logs record URLs, which is
    why ``redact`` scrubs ``token=``). Browsers cannot set headers on a WebSocket, so they
    use the query (or the ``hello`` message, which the session reads itself). Header names
    are compared case-insensitively; a non-Bearer ``Authorization`` (Basic…) is ignored.
    """
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == _BEARER and (token := credentials.strip()):
            return token.decode("latin-1")  # never fails; verify refuses non-JWT bytes
    return _query_token(target)


def _query_token(target: bytes) -> str | None:
    query = target.partition(b"#")[0].partition(b"?")[2]
    if not query:
        return None
    found = ""
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == TOKEN_QUERY_PARAMETER:
            found = value  # the last one, as the handshake's other parameters are read
    return found.strip() or None


def parse_auth_line(line: str) -> str | None:
    """The token in a line client's ``/auth TOKEN``; None if the line is anything else.

    The gateway asks for this as the first line when auth is on, and refuses the connection
    with ``auth_required`` when it is None (a chat line, a bare ``/auth``, another command).
    """
    command, _, argument = line.strip().partition(" ")
    if command != AUTH_COMMAND:
        return None
    return argument.strip() or None
