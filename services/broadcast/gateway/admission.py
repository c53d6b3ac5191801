"""One door: everything about a new connection is settled here, before any session starts.

For every kind of client (HTTP, WebSocket, line; TLS or not) ``Admission.admit`` decides the
protocol from the first bytes, answers plain HTTP, checks the origin and the token, and
returns an ``Admitted`` ticket, or ``None`` when the connection was answered (or refused) and
is over. Nothing a stranger sends reaches a channel before this says yes.

Protocol detection (``protocol/sniff.py``) reads until the first line is a request line or
cannot become one. A client that says nothing for ``SILENT_CLIENT_SECONDS`` is a line client
that only listens (``nc``): it is greeted. Before deciding it is silent, whatever already sits
in the socket is read, so a loaded gateway whose timer fired late never mistakes a waiting
WebSocket handshake for silence.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request
from wsproto.utilities import RemoteProtocolError

from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.http import BadRequest, HttpRequest, read_request, response
from broadcast.gateway.stats import GatewayStats
from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import MAX_LINE_BYTES
from broadcast.protocol.lines import render_error
from broadcast.protocol.sniff import Kind, classify
from broadcast.security import (
    AuthError,
    Identity,
    PrefixedStream,
    TokenBucket,
    could_be_tls,
    looks_like_tls,
    parse_auth_line,
    token_from_request,
)

log = logging.getLogger("broadcast.gateway.admission")

# How long a connection may say nothing before it is taken for a listening line client and
# greeted. A browser or websocat sends its handshake right after the TCP handshake, so it is
# here within one round trip; two seconds cover slow links, and an nc user barely minds.
SILENT_CLIENT_SECONDS = 2.0
# With tokens required, a line client has this long to send ``/auth TOKEN``, so a silent socket
# cannot hold a slot meant for someone with a token.
AUTH_TIMEOUT_SECONDS = 5.0
_SNIFF_BYTES = 4096
# A warning an operator must act on, logged once per interval rather than once per request.
_OPERATOR_HINT_INTERVAL_SECONDS = 60.0

HttpAnswer = Callable[[HttpRequest, trio.abc.Stream], Awaitable[bytes]]
"""Answers one plain HTTP request (not an upgrade) with a whole response."""


@dataclass(slots=True)
class WebSocketHandshake:
    """A checked upgrade request: wsproto's side of it, ready to be accepted."""

    connection: WSConnection
    target: str
    trailing: bytes
    """Bytes after the request head: the client's first frames."""


@dataclass(slots=True)
class Admitted:
    """A connection that may start a session."""

    stream: trio.abc.Stream
    websocket: WebSocketHandshake | None = None
    """The handshake of a WebSocket client; None for a line client."""
    initial: bytes = b""
    """Bytes a line client sent that belong to its session."""
    identity: Identity | None = None
    """Who a verified token says the client is; None while authentication is off."""


@dataclass
class Admission:
    access: AccessPolicy
    stats: GatewayStats
    answer_http: HttpAnswer
    silent_after: float = SILENT_CLIENT_SECONDS
    auth_timeout: float = AUTH_TIMEOUT_SECONDS
    new_sessions: TokenBucket | None = None
    """How fast sessions may start; past it, clients are told to come back (503)."""
    _hinted: dict[str, float] = field(default_factory=dict)
    _busy_since: float = -1.0
    _refused_recently: int = 0

    def _busy(self) -> ProtocolError | None:
        """A reconnect storm is admitted at a pace the gateway can serve, not all at once.

        Each refused client is given its own time to come back, spread over how long the
        clients refused in the last second would take at the admitted rate: told "1 s" all
        together, they would all come back together and most be refused again."""
        if self.new_sessions is None or self.new_sessions.try_take():
            return None
        now = trio.current_time()
        if now - self._busy_since >= 1.0:
            self._busy_since, self._refused_recently = now, 0
        self._refused_recently += 1
        backlog = self._refused_recently / self.new_sessions.rate
        wait = max(0.1, self.new_sessions.retry_after()) + random.uniform(0, backlog)
        return ProtocolError(
            ErrorCode.SERVER_BUSY,
            f"too many clients connecting at once; try again in {wait:.1f} s",
            retry_after=round(wait, 1),
        )

    async def admit(
        self, stream: trio.abc.Stream, refusal: ProtocolError | None
    ) -> Admitted | None:
        """Settle the connection; the caller bounds the whole of it with a deadline.

        ``refusal`` says why no session can be had (full, too many from the address); plain
        HTTP is still answered then, so health checks work on a full gateway.
        """
        initial = await self._sniff(stream)
        if initial is None:
            return None
        tls = self.access.tls
        if tls is not None and looks_like_tls(initial):
            stream = trio.SSLStream(PrefixedStream(initial, stream), tls, server_side=True)
            await stream.do_handshake()
            initial = await self._sniff(stream)
            if initial is None:
                return None
        elif tls is not None and refusal is None:
            refusal = ProtocolError(ErrorCode.TLS_REQUIRED, "this gateway takes TLS only: wss://")
        if classify(initial) is Kind.HTTP:
            return await self._http(stream, initial, refusal)
        refusal = refusal or self._busy()
        if refusal is not None:
            self.stats.count_error(refusal.code)
            await stream.send_all(render_error(refusal))
            return None
        return await self._lines(stream, initial)

    async def _sniff(self, stream: trio.abc.Stream) -> bytes | None:
        """The first bytes, enough to decide; None if the client left without a word.

        Silence ends the wait only while nothing has arrived: a request line that is still
        coming (slowly, or in pieces) is read to its end, however late, within the caller's
        deadline.
        """
        initial = b""
        with trio.move_on_after(self.silent_after):
            while not initial:
                initial = bytes(await stream.receive_some(_SNIFF_BYTES))
                if not initial:
                    return None
        if not initial:
            arrived = _already_arrived(stream)
            if arrived is None:
                return None
            initial = arrived
        while initial and self._undecided(initial):
            data = await stream.receive_some(_SNIFF_BYTES)
            if not data:
                return None
            initial += data
        return initial

    def _undecided(self, initial: bytes) -> bool:
        if self.access.tls is not None and could_be_tls(initial):
            return True
        return classify(initial) is Kind.UNDECIDED

    async def _http(
        self, stream: trio.abc.Stream, initial: bytes, refusal: ProtocolError | None
    ) -> Admitted | None:
        """A plain request is answered; an upgrade is checked and becomes a ticket."""
        try:
            request = await read_request(stream, initial)
        except BadRequest as exc:
            await stream.send_all(response(400, f"bad request: {exc}\n".encode()))
            return None
        if not request.wants_websocket:
            await stream.send_all(await self.answer_http(request, stream))
            return None
        if request.method != b"GET":
            await stream.send_all(
                response(405, b"a WebSocket handshake is a GET\n", extra_headers=b"Allow: GET\r\n")
            )
            return None
        refusal = refusal or self._busy()
        if refusal is not None:
            self.stats.count_error(refusal.code)
            status = _REFUSAL_STATUS.get(refusal.code, 503)
            body = f"{refusal.code}: {refusal.message}\n".encode()
            retry = b""
            if refusal.retry_after is not None:
                retry = b"Retry-After: %d\r\n" % max(1, math.ceil(refusal.retry_after))
            await stream.send_all(response(status, body, extra_headers=retry))
            return None
        origin, host = request.header(b"origin"), request.header(b"host")
        if not self.access.origins.allows(origin or None, host or None):
            self.stats.count_error(ErrorCode.FORBIDDEN_ORIGIN)
            self._hint_operator(origin, host)
            await stream.send_all(response(403, b"forbidden_origin: this page may not connect\n"))
            return None
        identity = None
        if self.access.verifier is not None:
            try:
                token = token_from_request(request.headers, request.target)
                identity = self.access.verifier.verify(token)
            except AuthError as error:
                self.stats.count_error(error.code)
                body = f"{error.code}: {error.message}\n".encode()
                await stream.send_all(response(error.http_status, body))
                return None
        try:
            connection = WSConnection(ConnectionType.SERVER)
            connection.initiate_upgrade_connection(request.headers, request.target)
            event = next(e for e in connection.events() if isinstance(e, Request))
        except RemoteProtocolError as exc:
            self.stats.count_error("bad_handshake")
            await stream.send_all(response(400, f"bad WebSocket handshake: {exc}\n".encode()))
            return None
        handshake = WebSocketHandshake(connection, event.target, request.trailing)
        return Admitted(stream, websocket=handshake, identity=identity)

    async def _lines(self, stream: trio.abc.Stream, initial: bytes) -> Admitted | None:
        """A line client; with tokens required its first line must be ``/auth TOKEN``."""
        verifier = self.access.verifier
        if verifier is None:
            return Admitted(stream, initial=initial)
        buffered, line = initial, None
        with trio.move_on_after(self.auth_timeout):
            while line is None:
                end = buffered.find(b"\n")
                if end >= 0:
                    first, buffered = buffered[:end], buffered[end + 1 :]
                    if first.strip():
                        line = first.rstrip(b"\r")
                    continue
                if len(buffered) > MAX_LINE_BYTES:
                    break
                data = await stream.receive_some(_SNIFF_BYTES)
                if not data:
                    return None
                buffered += data
        if line is None:
            self.stats.count_error(ErrorCode.AUTH_TIMEOUT)
            error = ProtocolError(
                ErrorCode.AUTH_TIMEOUT, f"send /auth TOKEN within {self.auth_timeout:g} s"
            )
            await stream.send_all(render_error(error))
            return None
        try:
            identity = verifier.verify(parse_auth_line(line.decode("utf-8", "replace")))
        except AuthError as error:
            self.stats.count_error(error.code)
            await stream.send_all(f"! {error.code}: {error.message}\n".encode())
            return None
        return Admitted(stream, initial=buffered, identity=identity)

    def _hint_operator(self, origin: bytes, host: bytes) -> None:
        """One log line per host and interval, naming the flag that would let it in."""
        host_text = host.decode("ascii", "replace")[:100]
        now = time.monotonic()
        if now - self._hinted.get(host_text, -_OPERATOR_HINT_INTERVAL_SECONDS) < (
            _OPERATOR_HINT_INTERVAL_SECONDS
        ):
            return
        if len(self._hinted) > 1000:
            self._hinted.clear()
        self._hinted[host_text] = now
        log.warning(
            "refused a browser from Origin %r for Host %r: if this is your site, start the "
            "gateway with --public-host %s (or --allowed-origins %s)",
            origin.decode("ascii", "replace")[:100],
            host_text,
            host_text.rsplit(":", 1)[0] if not host_text.endswith("]") else host_text,
            origin.decode("ascii", "replace")[:100],
        )


_REFUSAL_STATUS = {
    ErrorCode.TOO_MANY_CONNECTIONS: 429,
    ErrorCode.TLS_REQUIRED: 403,
    ErrorCode.SERVER_FULL: 503,
}


def _already_arrived(stream: trio.abc.Stream) -> bytes | None:
    """What the kernel already holds for a plain socket, without waiting: b"" if nothing,
    None if the peer closed. Other streams (TLS) report b""."""
    if not isinstance(stream, trio.SocketStream):
        return b""
    try:
        data = os.read(stream.socket.fileno(), _SNIFF_BYTES)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return None
    return data if data else None
