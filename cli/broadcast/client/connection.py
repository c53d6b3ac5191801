"""One WebSocket connection to a gateway, speaking docs/protocol.md.

``open_chat`` connects with the name, channel and replay request in the handshake query
(``ws://host/?name=alice&channel=general``) and waits for the ``welcome``. Naming ourselves in
the query, rather than in a ``hello`` afterwards, means the others see one ``alice joined`` and
not ``guest-7 joined``, ``guest-7 left``, ``alice joined``; and a replay asked for there comes
before any live message. Network failures become ``Unreachable`` (before the welcome) or
``ConnectionLost`` (after it), each with a short reason a person can read; nothing else is
caught here, so a bug in the caller is never mistaken for a network problem.

A token goes in the ``Authorization: Bearer`` header, never in the URL (URLs are shown and
logged). A gateway that turns the token away (HTTP 401/403, or close 4001 when it expires on a
live connection) raises ``Denied``, and a certificate that does not verify ``ServerNotTrusted``:
neither is a network failure, so the Link does not retry them.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
)

from broadcast.client.recovery import Replay
from broadcast.client.transport import close_politely, open_websocket
from broadcast.protocol.errors import CloseCode
from broadcast.protocol.limits import MAX_FRAME_BYTES

# Connecting plus waiting for the welcome; a gateway on a busy machine answers in milliseconds.
CONNECT_TIMEOUT = 10.0
# After this long without a frame we send a protocol ping; after as long again, the connection
# is dead (a sleeping laptop or a vanished NAT entry never sends a FIN).
IDLE_SECONDS = 15.0
# Frames from the server are small JSON objects; a 64 KiB text fits many times over.
MAX_INCOMING_BYTES = 4 * MAX_FRAME_BYTES

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect, who to be there, and how to join."""

    url: str
    name: str | None
    channel: str
    announce: bool = True
    """False for one-shot tools (send, listen): join and leave without notices to others."""
    history: int = 0
    """How many earlier messages the first connection asks for (0 to 1000)."""
    token: str | None = field(default=None, repr=False)
    """A signed token for the ``Authorization`` header; kept out of reprs and tracebacks."""
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """How to verify a ``wss://`` server (``--ca-file``); None: the system's CAs."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The extra headers of the WebSocket upgrade request."""
        if self.token is None:
            return []
        return [(b"Authorization", b"Bearer " + self.token.encode("ascii"))]


@dataclass(frozen=True, slots=True)
class Frame:
    """One event from the server: the text exactly as received, and its parsed JSON object."""

    raw: str
    event: dict[str, Any]

    @property
    def kind(self) -> object:
        return self.event.get("type")


class ChatError(Exception):
    """A network failure, with a short reason for people: ``connection refused``, …

    ``code`` is the WebSocket close code when the server closed the connection with one;
    ``retry_after`` the seconds of a ``503`` refusal's ``Retry-After`` (a full or draining
    gateway saying when to come back), or of a 1012 close's ``reconnect in 1.27 s``.
    """

    def __init__(
        self, reason: str, code: int | None = None, *, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.retry_after = retry_after


class Unreachable(ChatError):
    """No working connection was made: nothing listens, the handshake failed, no welcome."""


class ConnectionLost(ChatError):
    """A connection that had been welcomed ended."""


class Refused(Exception):
    """The server refused the name or channel we asked for; retrying would not help."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        super().__init__(f"{event.get('code')}: {event.get('message')}")
        self.event = event


class Denied(Exception):
    """The gateway turned our token away; the same token would be refused again.

    At the handshake (``live`` False) that is HTTP 401 (``auth_required``, ``token_expired``,
    ``token_invalid``) or 403 (``tls_required``, ``forbidden_origin``) with a body
    ``<code>: <message>``. On a welcomed connection (``live``) it is close 4001: the token
    expired. ``code`` and ``message`` come from the server: sanitize before printing.
    """

    def __init__(self, code: str, message: str, *, live: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.live = live

    @property
    def text(self) -> str:
        """What to tell the person: ``refused: token_expired: …``, or the expiry in use."""
        if not self.live:
            return f"refused: {self.code}: {self.message}"
        if self.code == "token_expired":
            return "your token expired; get a new one"
        return f"the server ended the session: {self.code}: {self.message}"


# The body of a gateway's refusal, ``token_expired: the token has expired; get a new one``.
_REFUSAL = re.compile(r"([a-z][a-z0-9_]{0,63}): (.+)")
_REFUSAL_TEXT_LIMIT = 300  # a proxy may send a whole HTML page; a line is enough


def _refusal_line(exc: ConnectionRejected) -> str:
    """The first line of an HTTP refusal's body, bounded: ``<code>: <message>`` from a gateway."""
    body = (exc.body or b"").decode("utf-8", "replace").strip()
    return body.splitlines()[0][:_REFUSAL_TEXT_LIMIT] if body else ""


def _denied_at_handshake(exc: ConnectionRejected) -> Denied:
    first = _refusal_line(exc)
    if match := _REFUSAL.fullmatch(first):
        return Denied(match[1], match[2])
    fallback = "unauthorized" if exc.status_code == 401 else "forbidden"
    return Denied(f"HTTP {exc.status_code}", first or fallback)


def _denied_by_close(exc: ConnectionClosed) -> Denied:
    """Close 4001 (its reason ``token_expired: your token expired``) on a live connection."""
    reason = exc.reason.reason if exc.reason is not None else None
    if reason and (match := _REFUSAL.fullmatch(reason)):
        return Denied(match[1], match[2], live=True)
    return Denied("token_expired", reason or "unauthorized", live=True)


# Retry-After in seconds; the HTTP-date form is not used by gateways, and is ignored.
_RETRY_AFTER_LIMIT = 300.0  # a proxy's "come back in a day" is not a reason to sleep that long


def retry_after_header(exc: ConnectionRejected) -> float | None:
    """The ``Retry-After`` of a 503 refusal, in seconds (bounded); None without one."""
    if exc.status_code != 503:
        return None
    for key, value in exc.headers or ():
        if key.lower() == b"retry-after":
            try:
                seconds = float(value.decode("ascii", "replace").strip())
            except ValueError:
                return None
            if seconds == seconds and seconds >= 0:
                return min(seconds, _RETRY_AFTER_LIMIT)
    return None


def _is_unauthorized(exc: ConnectionClosed) -> bool:
    return _close_code(exc) == CloseCode.UNAUTHORIZED


def parse_frame(message: str | bytes) -> Frame | None:
    """A server frame as a Frame; None for anything that is not a JSON object (ignored)."""
    if not isinstance(message, str):
        return None
    try:
        event = json.loads(message)
    except ValueError:
        return None
    return Frame(message, event) if isinstance(event, dict) else None


class ChatConnection:
    """A welcomed connection: publish text, receive events.

    ``replay`` is what the handshake asked to be replayed, if anything. ``welcome`` is the
    latest welcome: a ``hello`` that renames us is answered with a new one.
    """

    def __init__(
        self, ws: WebSocketConnection, welcome: Mapping[str, Any], replay: Replay | None = None
    ) -> None:
        self._ws = ws
        self.welcome = welcome
        self.replay = replay
        self._closed = trio.Event()

    @property
    def name(self) -> str:
        """The name the server gave us (ours, or ``guest-<n>`` when we did not choose one)."""
        return str(self.welcome.get("name", "?"))

    @property
    def channel(self) -> str:
        return str(self.welcome.get("channel", "?"))

    @property
    def epoch(self) -> str | None:
        """The epoch of the channel's history, when the gateway says it (docs/protocol.md)."""
        epoch = self.welcome.get("epoch")
        return epoch if isinstance(epoch, str) and epoch else None

    async def rename(self, name: str) -> None:
        """Ask to be called ``name``; the server answers with a ``welcome`` or an ``error``."""
        await self._send({"type": "hello", "name": name})

    async def publish(self, text: str, ref: str, idempotency_key: str | None = None) -> None:
        """Send one message; the server answers with an ``ack`` or ``error`` carrying ``ref``.

        With an ``idempotency_key``, sending it again (after a lost answer) publishes nothing
        twice: the server acks the repeat with the first one's id.
        """
        # A lone surrogate (from a broken terminal or pipe) cannot be encoded as UTF-8.
        text = text.encode("utf-8", "replace").decode("utf-8")
        command = {"type": "publish", "text": text, "ref": ref}
        if idempotency_key is not None:
            command["idempotency_key"] = idempotency_key
        await self._send(command)

    async def who(self) -> None:
        """Ask who is in our channel; the server answers with a ``presence`` event."""
        await self._send({"type": "who"})

    async def receive(self) -> Frame:
        """The next event, pongs excluded; raises ConnectionLost when the connection ends."""
        pinged = False
        while True:
            with trio.move_on_after(IDLE_SECONDS) as idle:
                message = await self._get()
            if idle.cancelled_caught:
                if pinged:
                    raise ConnectionLost(f"no answer from the server for {2 * IDLE_SECONDS:g} s")
                await self._send({"type": "ping"})
                pinged = True
                continue
            pinged = False
            frame = parse_frame(message)
            if frame is not None and frame.kind != "pong":
                return frame

    async def close(self) -> None:
        """Close with 1000 and wait (briefly) for the server's answer: call before cancelling."""
        try:
            await close_politely(self._ws)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Until ``close`` (running in another task) is done.

        The task reading this connection calls this when ``close`` makes its ``receive`` fail:
        leaving ``open_chat`` by an exception at that point would cancel trio-websocket's reader
        task, which must stay alive to hear the server's answer to our close frame.
        """
        await self._closed.wait()

    async def _get(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def _send(self, command: dict[str, Any]) -> None:
        try:
            await self._ws.send_message(_compact(command))
        except ConnectionClosed as exc:
            raise _lost(exc) from None


def _lost(exc: ConnectionClosed) -> ConnectionLost | Denied:
    """Why a welcomed connection ended: a network matter, or our token's end (4001)."""
    if _is_unauthorized(exc):
        return _denied_by_close(exc)
    code = _close_code(exc)
    hint = drain_hint(exc.reason) if code == CloseCode.SERVICE_RESTART else None
    return ConnectionLost(describe_close(exc.reason), code, retry_after=hint)


# A draining gateway's close reason ends with the delay it drew for this client.
_RECONNECT_IN = re.compile(r"reconnect in (\d{1,4}(?:\.\d+)?) s$")


def drain_hint(reason: CloseReason | None) -> float | None:
    """The seconds of a 1012 close's ``… reconnect in 1.27 s``; None without one."""
    found = _RECONNECT_IN.search(reason.reason or "") if reason is not None else None
    return min(float(found[1]), _RETRY_AFTER_LIMIT) if found else None


def _close_code(exc: ConnectionClosed) -> int | None:
    return exc.reason.code if exc.reason is not None else None


def handshake_url(
    target: Target, *, since: str | None = None, history: int = 0, epoch: str | None = None
) -> str:
    """``target.url`` with our name, channel and replay request in its query string.

    ``epoch`` goes with ``since``: the history ``since`` belongs to, so that the gateway can
    tell a restarted history from lost messages. Parameters already in a ``--url`` are kept,
    except those we set ourselves.
    """
    ours: dict[str, str] = {"channel": target.channel}
    if target.name is not None:
        ours["name"] = target.name
    if not target.announce:
        ours["announce"] = "0"
    if since is not None:
        ours["since"] = since
        if epoch is not None:
            ours["epoch"] = epoch
    elif history > 0:
        ours["history"] = str(history)
    parts = urlsplit(target.url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
    return urlunsplit(parts._replace(query=urlencode([*kept, *ours.items()])))


@asynccontextmanager
async def open_chat(
    target: Target,
    handshake_seconds: float = CONNECT_TIMEOUT,
    *,
    since: str | None = None,
    history: int = 0,
    epoch: str | None = None,
) -> AsyncIterator[ChatConnection]:
    """A welcomed connection, closed with code 1000 on the way out (even when cancelled).

    Connecting and waiting for the welcome may each take ``handshake_seconds``. ``since`` (a
    message id) asks for every message after it, ``history`` for the last N messages; either
    way the gateway replays them right after the welcome and ends with ``recovered``.
    Raises ``Denied`` when the gateway refuses our token (or TLS-less connection), and
    ``ServerNotTrusted`` when its certificate does not verify.
    """
    async with AsyncExitStack() as stack:
        try:
            ws = await stack.enter_async_context(
                open_websocket(
                    handshake_url(target, since=since, history=history, epoch=epoch),
                    ssl_context=target.ssl_context,
                    headers=target.headers(),
                    connect_timeout=handshake_seconds,
                    max_message_size=MAX_INCOMING_BYTES,
                )
            )
        except ConnectionRejected as exc:
            if exc.status_code in (401, 403):
                raise _denied_at_handshake(exc) from None
            raise Unreachable(describe(exc), retry_after=retry_after_header(exc)) from None
        except (HandshakeError, OSError) as exc:
            raise Unreachable(describe(exc)) from None
        stack.push_async_callback(close_politely, ws)
        try:
            with trio.fail_after(handshake_seconds):
                welcome = await _welcome(ws, target)
        except ConnectionClosed as exc:
            if _is_unauthorized(exc):
                raise _denied_by_close(exc) from None
            raise Unreachable(describe(exc), _close_code(exc)) from None
        except trio.TooSlowError:
            raise Unreachable(f"no welcome within {handshake_seconds:g} s") from None
        asked = since is not None or history > 0
        yield ChatConnection(ws, welcome, Replay(since, history) if asked else None)


async def _welcome(ws: WebSocketConnection, target: Target) -> dict[str, Any]:
    """The welcome the gateway sends first, naming the identity our query asked for.

    A gateway that does not accept a value of the query (a name it refuses) welcomes us with
    its defaults and follows that with an ``error``: that error, or the mismatch itself, is a
    refusal, since joining under another name or in another channel is not what was asked.
    """
    welcome: dict[str, Any] | None = None
    while True:
        frame = parse_frame(await ws.get_message())
        if frame is None:
            continue
        if frame.kind == "error":
            raise Refused(frame.event)
        if welcome is not None:  # the frame after a welcome that did not answer us
            raise Refused(_not_as_asked(welcome, target))
        if frame.kind == "welcome":
            if _answers(frame.event, target):
                return frame.event
            welcome = frame.event


def _answers(welcome: Mapping[str, Any], target: Target) -> bool:
    if welcome.get("channel") != target.channel:
        return False
    return target.name is None or welcome.get("name") == target.name


def _not_as_asked(welcome: Mapping[str, Any], target: Target) -> dict[str, Any]:
    """An error event of our own for a server that silently ignored what we asked for."""
    asked = f"{target.name} in #{target.channel}" if target.name else f"#{target.channel}"
    given = f"{welcome.get('name')} in #{welcome.get('channel')}"
    message = f"the server welcomed us as {given}, not {asked}"
    if target.token is not None and welcome.get("name") != target.name:
        message += " (the name comes from the token: leave out --name)"
    return {"type": "error", "code": "not_as_asked", "message": message}


def describe(exc: BaseException) -> str:
    """A short reason for a failure to connect: ``connection refused``, ``unknown host``, …"""
    if isinstance(exc, ConnectionClosed):
        return describe_close(exc.reason)
    if isinstance(exc, ConnectionRejected):
        said = _refusal_line(exc)
        detail = f": {said}" if said else ""
        return f"the server refused the WebSocket upgrade (HTTP {exc.status_code}{detail})"
    if isinstance(exc, ConnectionTimeout):
        return "timed out"
    cause = _root_os_error(exc)
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if cause is not None and cause.strerror:
        return cause.strerror[:1].lower() + cause.strerror[1:]
    return str(exc) or type(exc).__name__


_CLOSE_MEANINGS = {
    CloseCode.NORMAL: "closed by the server",
    CloseCode.GOING_AWAY: "the server shut down",
    CloseCode.PROTOCOL_ERROR: "WebSocket protocol error",
    CloseCode.MESSAGE_TOO_BIG: "a frame was too big",
    CloseCode.SERVICE_RESTART: "the server shut down",
    CloseCode.SLOW: "this client read too slowly",
    CloseCode.IDLE: "the server heard nothing from this client for too long",
    4003: "disconnected by the server's operator",
    4029: "too many requests after being told to slow down",
}


def describe_close(reason: CloseReason | None) -> str:
    """Why a connection ended, from its close code (docs/protocol.md) and reason."""
    if reason is None or reason.code == 1006:  # 1006: no close frame, the socket just ended
        return "the connection dropped"
    meaning = _CLOSE_MEANINGS.get(reason.code, "closed by the server")
    detail = f": {reason.reason}" if reason.reason else ""
    return f"{meaning} ({reason.code}{detail})"


def _root_os_error(exc: BaseException) -> OSError | None:
    """The most specific OSError behind ``exc``: trio wraps the per-address errors in a group."""
    found: OSError | None = None
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and (found is None or current.errno is not None):
            found = current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(reversed(current.exceptions))
        if current.__cause__ is not None:
            todo.append(current.__cause__)
    return found
