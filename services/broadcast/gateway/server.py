"""The gateway: one port for WebSocket, line and HTTP clients, fanned out through a bus.

Task tree (every task has an owner):

    Gateway.run
    ├── bus.run                       connections to Redis, or the in-process bus
    ├── probe, presence, sweeps       readiness, presence refresh, idle checks
    ├── accept loop                   cancelled first when draining
    └── handler nursery               one task per connection, bounded by the drain deadline
        └── _handle                   admission (admission.py) under a deadline, then
            └── ClientSession.serve   a nursery with the session's writer and its reader
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from broadcast.api import ApiCollector, ApiOptions, serve_api_listener
from broadcast.bus.base import Bus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.admission import Admission, Admitted
from broadcast.gateway.budget import AddressAllowances
from broadcast.gateway.context import SessionContext
from broadcast.gateway.file_limit import fit_connections_to_file_limit
from broadcast.gateway.http import HttpRequest, response
from broadcast.gateway.hub import ChannelHub
from broadcast.gateway.line_session import LineSession
from broadcast.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broadcast.gateway.metrics import GatewayMetrics
from broadcast.gateway.presence_notices import PresenceNotices
from broadcast.gateway.readiness import ReadinessProbe
from broadcast.gateway.replay import ReplayReads
from broadcast.gateway.session import ClientSession
from broadcast.gateway.static_files import CONTENT_SECURITY_POLICY, static_file
from broadcast.gateway.stats import GatewayStats
from broadcast.gateway.websocket_session import WebSocketSession
from broadcast.presence import MemoryPresence, OnExpired, PresenceStore
from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import (
    DEFAULT_CHANNEL,
    IDLE_TIMEOUT_SECONDS,
    LINE_IDLE_TIMEOUT_SECONDS,
    MAX_CONNECTIONS,
)
from broadcast.security import TokenBucket

log = logging.getLogger("broadcast.gateway")

# A connection must be admitted (TLS, its request head or WebSocket handshake, a line
# client's /auth) within this; a silent line client is admitted after about a second.
HANDSHAKE_TIMEOUT_SECONDS = 10.0
DRAIN_TIMEOUT_SECONDS = 10.0
# New sessions a gateway starts per second, after a burst: a reconnect storm of thousands is
# admitted at a pace one gateway serves (measured on 2 cores: 6,000 joins in 6.5 s with Redis,
# presence and notices) and the rest are told when to come back (503 with Retry-After),
# rather than all timing out together.
SESSION_RATE_PER_SECOND = 2500.0
SESSION_BURST = 5000
# A draining gateway closes this many clients a second, each told to wait a random part of the
# drain before reconnecting, so the gateways left take them over smoothly.
DRAIN_CLOSES_PER_SECOND = 2500
_DRAIN_TICK_SECONDS = 0.05
# Connections still being admitted, at most; past it the oldest is dropped for the newest, so
# sockets that never finish a handshake cannot keep out clients that would.
MAX_PENDING_CONNECTIONS = 1024
# Out of file descriptors, accept waits this long before trying again, and says so at most
# once per interval (trio's own loop logs a traceback ten times a second).
_ACCEPT_RETRY_SECONDS = 0.1
_ACCEPT_WARNING_INTERVAL_SECONDS = 10.0
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A closing connection reads (and drops) what its client still sends, this long and this much
# at most, so the client reads our last words before the socket goes.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
# Methods the plain HTTP routes answer; anything else is 405 with this Allow.
_READ_METHODS = (b"GET", b"HEAD")

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
        max_pending: int = MAX_PENDING_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        line_idle_timeout: float = LINE_IDLE_TIMEOUT_SECONDS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
        presence: PresenceFactory = lambda on_expired: MemoryPresence(),
        access: AccessPolicy | None = None,
        admission: Callable[[Admission], None] | None = None,
        api: ApiOptions | None = None,
        session_rate: float = SESSION_RATE_PER_SECOND,
        session_burst: int = SESSION_BURST,
    ) -> None:
        self.bus = bus
        self.node_id = node_id
        self.host = host
        self.port = port
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.handshake_timeout = handshake_timeout
        self.access = access or AccessPolicy()
        self.hub = ChannelHub(bus)
        self.stats = GatewayStats()
        self.probe = ReadinessProbe(bus, self.hub, node_id)
        self.presence = presence(self._presence_expired)
        self.notices = PresenceNotices(bus, self.hub, self.presence)
        self.hub.on_presence_diff = self.notices.forget_snapshot
        # The server API (docs/api.md): built always, answers 404 until a key turns it on; its
        # idempotency store also serves WebSocket publishes with an idempotency_key.
        self.api_options = api or ApiOptions()
        self.api = self.api_options.build(self)
        self.context = SessionContext(
            bus=bus,
            hub=self.hub,
            presence=self.presence,
            notices=self.notices,
            replays=ReplayReads(bus),
            access=self.access,
            stats=self.stats,
            node_id=node_id,
            default_channel=default_channel,
            idle_timeout=idle_timeout,
            line_idle_timeout=line_idle_timeout,
            clock=trio.current_time,
            address_allowances=(
                None
                if self.access.addresses is None
                else AddressAllowances(self.access.rates, trio.current_time)
            ),
            publish_once=self.api.publish_once,
        )
        self.admission = Admission(self.access, self.stats, self.answer_http)
        self._session_rate = (session_rate, session_burst)
        if admission is not None:  # tests tune its timers
            admission(self.admission)
        self.metrics = GatewayMetrics(self)
        self.metrics.registry.register(ApiCollector(self.api))
        self.hub.observe_lag = self.metrics.delivery_lag.observe
        self.draining = False
        self._sessions: set[ClientSession] = set()
        self._pending: OrderedDict[int, trio.CancelScope] = OrderedDict()
        self._numbers = itertools.count(1)
        self._accept_scope = trio.CancelScope()
        self._stop_requested = trio.Event()
        self._stop_reason = "server shutting down"
        self._accept_warned_at = -_ACCEPT_WARNING_INTERVAL_SECONDS
        self._listeners: list[trio.SocketListener] = []

    @property
    def ready(self) -> bool:
        return self.bus.ready and self.probe.live and not self.draining

    def connection_count(self) -> int:
        """Clients with a session on this gateway."""
        return len(self._sessions)

    def disconnect_local(self, name: str, code: int, reason: str) -> int:
        """Close every session of the user ``name`` here; how many there were."""
        matched = [session for session in self._sessions if session.name == name]
        for session in matched:
            session.disconnect(code, reason)
        return len(matched)

    def stop(self, reason: str = "server shutting down") -> None:
        """Begin a graceful drain; ``run`` returns once clients are gone or the drain times out."""
        self._stop_reason = reason
        self._stop_requested.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.max_connections, self.max_pending = fit_connections_to_file_limit(
            self.max_connections, self.max_pending
        )
        rate, burst = self._session_rate
        if rate > 0 and self.admission.new_sessions is None:
            self.admission.new_sessions = TokenBucket(rate, burst, trio.current_time)
        # Bound first: a port in use is a plain OSError for the caller, before anything starts
        # (and before the readiness probe could say "ready" on a gateway that has no port).
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        self._listeners = listeners
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_close_on_exit, listener)
            await nursery.start(self.bus.run, self.hub.deliver)
            nursery.start_soon(self.probe.run)
            await nursery.start(self.presence.run)
            await nursery.start(self.api.run)
            if self.api_options.listen is not None:
                await nursery.start(serve_api_listener, self.api, *self.api_options.listen)
            nursery.start_soon(self.notices.run)
            nursery.start_soon(self._sweep_idle)
            async with trio.open_nursery() as handlers:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, handlers)
                log.info(
                    "listening on %s:%d (WebSocket, lines and HTTP) as node %s; bus: %s",
                    self.host, self.port, self.node_id, self.bus.name,
                )  # fmt: skip
                task_status.started(self)
                await self._stop_requested.wait()
                self._begin_drain()
                handlers.start_soon(self._close_in_batches)
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
            nursery.cancel_scope.cancel()
        log.info("stopped")

    def _presence_expired(self, channel: str, key: str, name: str) -> None:
        """A client of a dead gateway left: told once, on its behalf, with the next diff."""
        self.notices.left(channel, name)

    async def _sweep_idle(self) -> None:
        """One task checks every client's liveness, rather than one timer task per client."""
        interval = min(self.context.idle_timeout, self.context.line_idle_timeout) / 3
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for session in list(self._sessions):
                session.check_alive(now)

    def _begin_drain(self) -> None:
        """Stop accepting, and close the port: a client that reconnects at once is refused
        here (and its balancer sends it elsewhere) instead of waiting in the backlog."""
        self.draining = True
        self._accept_scope.cancel()
        for listener in self._listeners:
            listener.socket.close()
        log.info(
            "draining: %d clients told to reconnect elsewhere (%.0f s at most)",
            len(self._sessions), self.drain_timeout,
        )  # fmt: skip

    async def _close_in_batches(self) -> None:
        """Tell clients to go, a batch per tick, each with its own reconnect delay: the other
        gateways take them over as a steady stream, not a wall (Phoenix drains 10k per 2 s)."""
        sessions = list(self._sessions)
        spread = min(self.drain_timeout / 2, len(sessions) / DRAIN_CLOSES_PER_SECOND)
        per_tick = max(1, math.ceil(DRAIN_CLOSES_PER_SECOND * _DRAIN_TICK_SECONDS))
        for start in range(0, len(sessions), per_tick):
            for session in sessions[start : start + per_tick]:
                session.shut_down(self._stop_reason, retry_after=random.uniform(0, spread))
            await trio.sleep(_DRAIN_TICK_SECONDS)

    async def _accept(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        """Accept until draining. Out of descriptors, wait and retry, warning once a while."""
        with self._accept_scope:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._warn_accept(exc)
                    await trio.sleep(_ACCEPT_RETRY_SECONDS)
                    continue
                handlers.start_soon(self._handle, stream)

    def _warn_accept(self, exc: OSError) -> None:
        self.stats.count_error("accept_failed")
        now = time.monotonic()
        if now - self._accept_warned_at >= _ACCEPT_WARNING_INTERVAL_SECONDS:
            self._accept_warned_at = now
            log.warning(
                "cannot accept connections: %s; retrying (raise ulimit -n or lower "
                "--max-connections)",
                exc.strerror or exc,
            )

    async def _handle(self, stream: trio.SocketStream) -> None:
        number = next(self._numbers)
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        address, addresses = _peer_address(stream), self.access.addresses
        counted = addresses is None or addresses.try_acquire(address)
        try:
            _enable_keepalive(stream)
            admitted = await self._admit(stream, number, self._refusal(counted))
            if admitted is not None:
                session = self._open_session(admitted, number, address)
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
            await _close_gently(stream)

    async def _admit(
        self, stream: trio.SocketStream, number: int, refusal: ProtocolError | None
    ) -> Admitted | None:
        """Admission under the handshake deadline, as one of at most ``max_pending``."""
        if len(self._pending) >= self.max_pending:
            _, oldest = self._pending.popitem(last=False)
            oldest.cancel()
            self.stats.count_error("pending_evicted")
        with trio.CancelScope(deadline=trio.current_time() + self.handshake_timeout) as scope:
            self._pending[number] = scope
            try:
                return await self.admission.admit(stream, refusal)
            finally:
                self._pending.pop(number, None)
        self.stats.count_error("handshake_timeout")
        return None

    def _refusal(self, address_admitted: bool) -> ProtocolError | None:
        """Why a new connection cannot have a session, if it cannot (health checks still can)."""
        if len(self._sessions) >= self.max_connections:
            return ProtocolError(ErrorCode.SERVER_FULL, "this gateway is full; try another")
        if not address_admitted:
            return ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS, "too many connections from your address"
            )
        return None

    def _open_session(self, admitted: Admitted, number: int, address: str) -> ClientSession:
        budget = self.context.budget(address)
        session: ClientSession
        if admitted.websocket is None:
            session = LineSession(self.context, admitted.stream, number, budget, admitted.initial)
        else:
            session = WebSocketSession(
                self.context, admitted.stream, number, budget, admitted.websocket
            )
        if admitted.identity is not None:
            session.apply_identity(admitted.identity)
        return session

    async def answer_http(self, request: HttpRequest, stream: trio.abc.Stream) -> bytes:
        """A plain HTTP request: health, readiness, metrics, the page; 405 for other methods."""
        path = request.target.split(b"?", 1)[0]
        if path.startswith(b"/api/"):
            return await self.api.respond(request, stream)
        if request.method not in _READ_METHODS:
            return response(
                405,
                b"method not allowed\n",
                extra_headers=b"Allow: GET, HEAD\r\n",
            )
        head_only = request.method == b"HEAD"
        if path == b"/healthz":
            return response(200, b"ok\n", head_only=head_only)
        if path == b"/readyz":
            if self.ready:
                return response(200, b"ready\n", head_only=head_only)
            why = b"draining" if self.draining else b"no round trip through the bus"
            return response(503, b"not ready: " + why + b"\n", head_only=head_only)
        if (static := static_file(path)) is not None:
            content, content_type = static
            csp = b"Content-Security-Policy: " + CONTENT_SECURITY_POLICY + b"\r\n"
            return response(200, content, content_type, csp, head_only=head_only)
        if path == b"/metrics":
            return response(200, self.metrics.render(), METRICS_CONTENT_TYPE, head_only=head_only)
        return response(404, b"not found; WebSocket clients connect to /\n", head_only=head_only)


async def _close_on_exit(listener: trio.SocketListener) -> None:
    """Owns a listener for the gateway's nursery: closed when the gateway stops."""
    try:
        await trio.sleep_forever()
    finally:
        await trio.aclose_forcefully(listener)


async def _close_gently(stream: trio.SocketStream) -> None:
    """Send FIN, then read and drop what the client still sends, briefly, before closing.

    Closing a socket with unread input makes the kernel send RST, and a client that gets RST
    throws away what it had not read yet: the 405 to a POST whose body we ignored, the close
    frame (4008, 4029) of a client cut while it was still sending.
    """
    with trio.move_on_after(_LINGER_SECONDS) as scope:
        scope.shield = True
        try:
            await stream.send_eof()
            drained = 0
            while drained < _LINGER_BYTES and (data := await stream.receive_some(65536)):
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


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
