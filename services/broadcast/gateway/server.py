"""The gateway: one port for WebSocket, line and HTTP clients, fanned out through a bus.

Task tree (every task has an owner):

    Gateway.run
    ├── bus.run                       connections to Redis, or the in-process bus
    ├── accept loop                   trio.serve_listeners, cancelled first when draining
    └── handler nursery               one task per connection, bounded by the drain deadline
        └── ClientSession.serve       a nursery with the session's writer and its reader
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections.abc import Callable

import trio
from wsproto.utilities import RemoteProtocolError

from broadcast.bus.base import Bus, BusUnavailable
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.http import BadRequest, HttpRequest, read_request, response
from broadcast.gateway.hub import ChannelHub
from broadcast.gateway.line_session import LineSession
from broadcast.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broadcast.gateway.metrics import GatewayMetrics
from broadcast.gateway.readiness import ReadinessProbe
from broadcast.gateway.session import ClientSession
from broadcast.gateway.static_files import CONTENT_SECURITY_POLICY, static_file
from broadcast.gateway.stats import GatewayStats
from broadcast.gateway.websocket_session import WebSocketSession
from broadcast.presence import MemoryPresence, OnExpired, PresenceStore
from broadcast.protocol.envelope import event_payload
from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import (
    DEFAULT_CHANNEL,
    IDLE_TIMEOUT_SECONDS,
    MAX_CONNECTIONS,
    SNIFF_TIMEOUT_SECONDS,
)
from broadcast.protocol.lines import render_error
from broadcast.protocol.sniff import Kind, classify
from broadcast.security import (
    AuthError,
    PrefixedStream,
    could_be_tls,
    looks_like_tls,
    token_from_request,
)

log = logging.getLogger("broadcast.gateway")

# A client that opened an HTTP request must finish its head (and a WebSocket its handshake) soon.
HANDSHAKE_TIMEOUT_SECONDS = 10.0
DRAIN_TIMEOUT_SECONDS = 10.0
_SNIFF_BYTES = 16  # enough to tell "GET /" from a line
EXPIRED_NOTICES_QUEUE = 1000

PresenceFactory = Callable[[OnExpired], PresenceStore]
"""Builds the presence store, given the gateway's callback for entries that expired."""


class Gateway:
    def __init__(
        self,
        bus: Bus,
        *,
        node_id: str,
        host: str = "127.0.0.1",
        port: int = 0,
        default_channel: str = DEFAULT_CHANNEL,
        drain_timeout: float = DRAIN_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
        presence: PresenceFactory = lambda on_expired: MemoryPresence(),
        access: AccessPolicy | None = None,
    ) -> None:
        self.bus = bus
        self.node_id = node_id
        self.host = host
        self.port = port
        self.default_channel = default_channel
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.access = access or AccessPolicy()
        self.hub = ChannelHub(bus)
        self.stats = GatewayStats()
        self.probe = ReadinessProbe(bus, self.hub, node_id)
        self.presence = presence(self._presence_expired)
        # Leave notices for a dead gateway's clients, published by a task; bounded, and a notice
        # that does not fit is only logged (presence itself is already right).
        self._expired_send, self._expired_receive = trio.open_memory_channel[tuple[str, str, str]](
            EXPIRED_NOTICES_QUEUE
        )
        self.metrics = GatewayMetrics(self)
        self.hub.observe_lag = self.metrics.delivery_lag.observe
        self.draining = False
        self._sessions: set[ClientSession] = set()
        self._numbers = itertools.count(1)
        self._accept_scope = trio.CancelScope()
        self._stop_requested = trio.Event()
        self._stop_reason = "server shutting down"

    @property
    def ready(self) -> bool:
        return self.bus.ready and self.probe.live and not self.draining

    def stop(self, reason: str = "server shutting down") -> None:
        """Begin a graceful drain; ``run`` returns once clients are gone or the drain times out."""
        self._stop_reason = reason
        self._stop_requested.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run, self.hub.deliver)
            nursery.start_soon(self.probe.run)
            await nursery.start(self.presence.run)
            nursery.start_soon(self._announce_expired)
            nursery.start_soon(self._sweep_idle)
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as handlers:
                nursery.start_soon(self._accept, listeners, handlers)
                log.info(
                    "listening on %s:%d (WebSocket, lines and HTTP) as node %s; bus: %s",
                    self.host, self.port, self.node_id, self.bus.name,
                )  # fmt: skip
                task_status.started(self)
                await self._stop_requested.wait()
                self._begin_drain()
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
            nursery.cancel_scope.cancel()
        log.info("stopped")

    def _presence_expired(self, channel: str, key: str, name: str) -> None:
        try:
            self._expired_send.send_nowait((channel, key, name))
        except trio.WouldBlock:
            log.warning("too many expired presence entries at once; no leave notice for %s", name)

    async def _announce_expired(self) -> None:
        """A client of a dead gateway left: say so once, on its behalf."""
        async for channel, key, name in self._expired_receive:
            payload = event_payload("leave", channel, name, round(time.time(), 3), key)
            try:
                await self.bus.publish_event(channel, payload)
            except BusUnavailable:
                log.info("no leave notice for %s in #%s: the bus is unavailable", name, channel)

    async def _sweep_idle(self) -> None:
        """One task checks every client's liveness, rather than one timer task per client."""
        while True:
            await trio.sleep(self.idle_timeout / 3)
            now = trio.current_time()
            for session in list(self._sessions):
                session.check_alive(now)

    def _begin_drain(self) -> None:
        self.draining = True
        self._accept_scope.cancel()
        log.info(
            "draining: %d clients told to reconnect elsewhere (%.0f s at most)",
            len(self._sessions), self.drain_timeout,
        )  # fmt: skip
        for session in list(self._sessions):
            session.shut_down(self._stop_reason)

    async def _accept(self, listeners: list[trio.SocketListener], handlers: trio.Nursery) -> None:
        with self._accept_scope:
            await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)

    async def _handle(self, stream: trio.SocketStream) -> None:
        number = next(self._numbers)
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        address, addresses = _peer_address(stream), self.access.addresses
        counted = addresses is None or addresses.try_acquire(address)
        try:
            _enable_keepalive(stream)
            session = await self._open_session(stream, number, self._refusal(counted))
            if session is not None:
                self._sessions.add(session)
                try:
                    await session.serve()
                finally:
                    self._sessions.discard(session)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as group:
            log.debug("connection %d ended: %r", number, group.exceptions[0])
        except* Exception:
            log.exception("connection %d failed", number)
        finally:
            self.stats.connections_open -= 1
            if addresses is not None and counted:
                addresses.release(address)
            await trio.aclose_forcefully(stream)

    def _refusal(self, address_admitted: bool) -> ProtocolError | None:
        """Why a new connection cannot have a session, if it cannot (health checks still can)."""
        if self.stats.connections_open > self.max_connections:
            error = ProtocolError(ErrorCode.SERVER_FULL, "this gateway is full; try another")
        elif not address_admitted:
            error = ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS, "too many connections from your address"
            )
        else:
            return None
        self.stats.count_error(error.code)
        return error

    async def _open_session(
        self, stream: trio.abc.Stream, number: int, refusal: ProtocolError | None
    ) -> ClientSession | None:
        """Tell the protocols apart by the first bytes; a silent client is a line client."""
        initial = await self._sniff(stream)
        if initial is None:
            return None
        tls = self.access.tls
        if tls is not None and looks_like_tls(initial):
            stream = trio.SSLStream(PrefixedStream(initial, stream), tls, server_side=True)
            try:
                with trio.fail_after(self.handshake_timeout):
                    await stream.do_handshake()
            except trio.TooSlowError:
                self.stats.count_error("handshake_timeout")
                return None
            initial = await self._sniff(stream)
            if initial is None:
                return None
        elif tls is not None and refusal is None:
            refusal = ProtocolError(ErrorCode.TLS_REQUIRED, "this gateway takes TLS only: wss://")
        if classify(initial) is not Kind.HTTP:
            if refusal is not None:
                await stream.send_all(render_error(refusal))
                return None
            return LineSession(self, stream, number, initial)
        try:
            with trio.fail_after(self.handshake_timeout):
                return await self._handshake(stream, number, initial, refusal)
        except trio.TooSlowError:
            self.stats.count_error("handshake_timeout")
            return None

    async def _sniff(self, stream: trio.abc.Stream) -> bytes | None:
        """The first bytes, enough to decide; None if the client left without a word."""
        initial = b""
        tls = self.access.tls is not None
        with trio.move_on_after(SNIFF_TIMEOUT_SECONDS):
            while classify(initial) is Kind.UNDECIDED or (tls and could_be_tls(initial)):
                data = await stream.receive_some(_SNIFF_BYTES)
                if not data:
                    return None
                initial += data
        return initial

    async def _handshake(
        self,
        stream: trio.abc.Stream,
        number: int,
        initial: bytes,
        refusal: ProtocolError | None,
    ) -> ClientSession | None:
        """An HTTP request: a WebSocket upgrade becomes a session; anything else is answered."""
        try:
            request = await read_request(stream, initial)
        except BadRequest as exc:
            await stream.send_all(response(400, f"bad request: {exc}\n".encode()))
            return None
        if not request.wants_websocket:
            await stream.send_all(self._answer_http(request))
            return None
        if refusal is not None:
            status = _REFUSAL_STATUS.get(refusal.code, 503)
            await stream.send_all(response(status, f"{refusal.code}: {refusal.message}\n".encode()))
            return None
        origin, host = request.header(b"origin"), request.header(b"host")
        if not self.access.origins.allows(origin or None, host or None):
            self.stats.count_error("forbidden_origin")
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
            session = await WebSocketSession.accept(
                self, stream, number, request.headers, request.target, request.trailing
            )
        except RemoteProtocolError as exc:
            await stream.send_all(response(400, f"bad WebSocket handshake: {exc}\n".encode()))
            return None
        if identity is not None:
            session.apply_identity(identity)
        return session

    def _answer_http(self, request: HttpRequest) -> bytes:
        path = request.target.split(b"?", 1)[0]
        if path == b"/healthz":
            return response(200, b"ok\n")
        if path == b"/readyz":
            if self.ready:
                return response(200, b"ready\n")
            why = b"draining" if self.draining else b"no round trip through the bus"
            return response(503, b"not ready: " + why + b"\n")
        if (static := static_file(path)) is not None:
            content, content_type = static
            csp = b"Content-Security-Policy: " + CONTENT_SECURITY_POLICY + b"\r\n"
            return response(200, content, content_type, csp)
        if path == b"/metrics":
            return response(200, self.metrics.render(), METRICS_CONTENT_TYPE)
        return response(404, b"not found; WebSocket clients connect to /\n")


_REFUSAL_STATUS = {ErrorCode.TOO_MANY_CONNECTIONS: 429, ErrorCode.TLS_REQUIRED: 403}


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:  # already gone
        return ""


# Half-open TCP (a vanished client, a dead NAT entry) is found by the kernel within ~90 s:
# probes after 60 s of silence, every 10 s, 3 unanswered ones end the connection.
_KEEPALIVE_OPTIONS = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def _enable_keepalive(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE_OPTIONS:
        if hasattr(socket, name):  # Linux has all three; others use system defaults
            stream.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
