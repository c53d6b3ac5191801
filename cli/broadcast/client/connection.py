"""One WebSocket connection to a gateway, speaking docs/protocol.md.

``open_chat`` connects, says ``hello`` and waits for the ``welcome`` that answers it. Network
failures become ``Unreachable`` (before the welcome) or ``ConnectionLost`` (after it), each with
a short reason a person can read; nothing else is caught here, so a bug in the caller is never
mistaken for a network problem.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from broadcast.protocol.errors import CloseCode
from broadcast.protocol.limits import MAX_FRAME_BYTES

# Connecting plus the hello/welcome exchange; a gateway on a busy machine answers in milliseconds.
CONNECT_TIMEOUT = 10.0
# Closing politely (our close frame, the server's answer) must not hold up leaving.
CLOSE_TIMEOUT = 2.0
# After this long without a frame we send a protocol ping; after as long again, the connection
# is dead (a sleeping laptop or a vanished NAT entry never sends a FIN).
IDLE_SECONDS = 15.0
# Frames from the server are small JSON objects; a 64 KiB text fits many times over.
MAX_INCOMING_BYTES = 4 * MAX_FRAME_BYTES

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect and who to be there."""

    url: str
    name: str | None
    channel: str


@dataclass(frozen=True, slots=True)
class Frame:
    """One event from the server: the text exactly as received, and its parsed JSON object."""

    raw: str
    event: dict[str, Any]

    @property
    def kind(self) -> object:
        return self.event.get("type")


class ChatError(Exception):
    """A network failure, with a short reason for people: ``connection refused``, …"""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreachable(ChatError):
    """No working connection was made: nothing listens, the handshake failed, no welcome."""


class ConnectionLost(ChatError):
    """A connection that had been welcomed ended."""


class Refused(Exception):
    """The server answered our hello with an error; retrying would not help."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        super().__init__(f"{event.get('code')}: {event.get('message')}")
        self.event = event


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
    """A welcomed connection: publish text, receive events."""

    def __init__(self, ws: WebSocketConnection, welcome: Mapping[str, Any]) -> None:
        self._ws = ws
        self.welcome = welcome
        self._closed = trio.Event()

    @property
    def name(self) -> str:
        """The name the server gave us (ours, or ``guest-<n>`` when we did not choose one)."""
        return str(self.welcome.get("name", "?"))

    @property
    def channel(self) -> str:
        return str(self.welcome.get("channel", "?"))

    async def publish(self, text: str, ref: str) -> None:
        """Send one message; the server answers with an ``ack`` or ``error`` carrying ``ref``."""
        # A lone surrogate (from a broken terminal or pipe) cannot be encoded as UTF-8.
        text = text.encode("utf-8", "replace").decode("utf-8")
        await self._send({"type": "publish", "text": text, "ref": ref})

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
            raise ConnectionLost(describe_close(exc.reason)) from None

    async def _send(self, command: dict[str, Any]) -> None:
        try:
            await self._ws.send_message(_compact(command))
        except ConnectionClosed as exc:
            raise ConnectionLost(describe_close(exc.reason)) from None


@asynccontextmanager
async def open_chat(
    target: Target, handshake_seconds: float = CONNECT_TIMEOUT
) -> AsyncIterator[ChatConnection]:
    """A welcomed connection, closed with code 1000 on the way out (even when cancelled).

    Connecting and the hello/welcome exchange may each take ``handshake_seconds``.
    """
    async with AsyncExitStack() as stack:
        try:
            ws = await stack.enter_async_context(
                open_websocket_url(
                    target.url,
                    connect_timeout=handshake_seconds,
                    disconnect_timeout=CLOSE_TIMEOUT,
                    max_message_size=MAX_INCOMING_BYTES,
                )
            )
        except (HandshakeError, OSError) as exc:
            raise Unreachable(describe(exc)) from None
        stack.push_async_callback(close_politely, ws)
        try:
            with trio.fail_after(handshake_seconds):
                welcome = await _hello(ws, target)
        except ConnectionClosed as exc:
            raise Unreachable(describe(exc)) from None
        except trio.TooSlowError:
            raise Unreachable(f"no welcome within {handshake_seconds:g} s") from None
        yield ChatConnection(ws, welcome)


async def close_politely(ws: WebSocketConnection) -> None:
    """Close with 1000 (normal) and wait briefly for the server's answer, even if cancelled.

    Under cancellation trio-websocket's reader task is cancelled too, so the answer cannot be
    heard and this waits CLOSE_TIMEOUT: ``ChatConnection.close`` is the way to leave quickly.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(CloseCode.NORMAL)


async def _hello(ws: WebSocketConnection, target: Target) -> dict[str, Any]:
    """Send hello and return the welcome that answers it.

    The gateway sends one welcome right after the handshake and another after the hello. The
    one that answers ours names our channel (and our name, if we chose one), which also copes
    with a server that sends a single welcome. Events before it belong to the default channel
    we were in before the hello, so they are dropped.
    """
    hello: dict[str, Any] = {"type": "hello", "channel": target.channel}
    if target.name is not None:
        hello["name"] = target.name
    await ws.send_message(_compact(hello))
    while True:
        frame = parse_frame(await ws.get_message())
        if frame is None:
            continue
        if frame.kind == "error":
            raise Refused(frame.event)
        if frame.kind == "welcome" and _answers(frame.event, target):
            return frame.event


def _answers(welcome: Mapping[str, Any], target: Target) -> bool:
    if welcome.get("channel") != target.channel:
        return False
    return target.name is None or welcome.get("name") == target.name


def describe(exc: BaseException) -> str:
    """A short reason for a failure to connect: ``connection refused``, ``unknown host``, …"""
    if isinstance(exc, ConnectionClosed):
        return describe_close(exc.reason)
    if isinstance(exc, ConnectionRejected):
        return f"the server refused the WebSocket upgrade (HTTP {exc.status_code})"
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
    CloseCode.GOING_AWAY: "the server is shutting down",
    CloseCode.PROTOCOL_ERROR: "WebSocket protocol error",
    CloseCode.MESSAGE_TOO_BIG: "a frame was too big",
    1012: "the server is restarting",  # RFC 6455 registry: Service Restart
    CloseCode.SLOW: "this client read too slowly",
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
