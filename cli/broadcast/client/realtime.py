"""A real-time client for programs: connect, send with an ack, iterate events, stay connected.

    import trio
    from broadcast.client import Message, connect

    async def main() -> None:
        async with connect("ws://127.0.0.1:12345/", name="bot", channel="general") as client:
            await client.send("hello")
            async for event in client:
                if isinstance(event, Message):
                    print(event.sender, event.text)

    trio.run(main)

It is the CLI's own machinery given a public face: the ``Link`` (link.py) reconnects after a
drop with backoff and jitter, honouring a ``503``'s ``Retry-After`` and a draining gateway's
``reconnect in 1.27 s``, and resumes ``since`` the last message seen (with its epoch); repeats
are dropped by id (recovery.py); sends are paced to the server's limits and retried when it
says "later" (pacing.py). What is left here is turning frames into typed events and matching
answers to the calls that wait for them.

Events come in the order the server sent them, each message once. A loss is never silent: a
recovery the history could not complete, or a gateway that lost messages itself, is a ``Gap``.
A history that restarted with nothing missed (a gateway with no Redis came back empty) is only
a ``Recovered`` with ``reset=True``.

Only failures that waiting cannot cure end the client: a refused token or origin (``Denied``),
a refused name or channel (``Refused``), a certificate that does not verify
(``ServerNotTrusted``), and a first connection that cannot be made (``Unreachable``: a typo in
the URL should fail at once, not retry for ever). ``connect`` raises them; later, iterating and
every call do.
"""

from __future__ import annotations

import itertools
import math
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import trio

from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Denied,
    Frame,
    Refused,
    Target,
    Unreachable,
)
from broadcast.client.link import Link
from broadcast.client.pacing import Deliveries, Pacer, Pending, Retries
from broadcast.client.recovery import Replay
from broadcast.client.transport import ServerNotTrusted, sole_exception

__all__ = [
    "ClientClosed",
    "CommandRefused",
    "Connected",
    "Denied",
    "Disconnected",
    "Event",
    "Gap",
    "Message",
    "Presence",
    "PresenceDiff",
    "PublishError",
    "RealtimeClient",
    "Recovered",
    "Refused",
    "Renamed",
    "ServerError",
    "ServerNotTrusted",
    "Unreachable",
    "connect",
]

DEFAULT_URL = "ws://127.0.0.1:12345/"
# Events waiting for the program to take them. About what a gateway holds for a slow client
# (1 MiB of frames): past it the client stops reading, and the gateway's own limit decides
# (close 4008, after which the client reconnects and recovers what it missed).
EVENT_BUFFER = 1000
# A send waits this long for its ack, across reconnections: long enough to ride out a gateway
# restart, short enough that a program hears of an outage.
SEND_TIMEOUT = 30.0
# ``who``, ``rename`` and ``join`` are answered in milliseconds by a live gateway; past this
# (an outage, across reconnections) they raise ``trio.TooSlowError``.
COMMAND_TIMEOUT = 10.0

FATAL = (Denied, Refused, ServerNotTrusted, Unreachable)
"""What ends a client: no retry would be answered differently."""


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection was welcomed: the first, or one after a drop (``resumed``: it asked for
    what was missed, and a ``Recovered`` follows the replay)."""

    name: str
    channel: str
    node: str
    resumed: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection dropped (``reason`` for people, ``code`` the WebSocket close code if
    any); the client reconnects by itself in ``retry_in`` seconds. Sends wait meanwhile."""

    reason: str
    code: int | None
    retry_in: float


@dataclass(frozen=True, slots=True)
class Message:
    """A chat message. ``id`` increases within the channel's history, named by ``epoch``;
    keep both to resume there later (``connect(since=..., epoch=...)``)."""

    id: str
    epoch: str | None
    channel: str
    sender: str
    text: str
    ts: float


@dataclass(frozen=True, slots=True)
class PresenceDiff:
    """Who came and went (``more_*`` count names beyond those listed: ask ``who``)."""

    channel: str
    joined: tuple[str, ...]
    left: tuple[str, ...]
    more_joined: int
    more_left: int


@dataclass(frozen=True, slots=True)
class Presence:
    """Everyone in the channel, on every gateway: after each welcome, and for ``who``."""

    channel: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Recovered:
    """A replay ended: ``count`` messages new to this client came before it.

    ``reset``: the history restarted (a gateway or Redis came back empty) and the messages
    replayed are the new history from its start; with ``complete`` too, nothing was missed.
    """

    channel: str
    count: int
    complete: bool
    reset: bool
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages may have been lost just before this point.

    ``recovery_incomplete``: after a reconnection the history no longer held everything since
    the last message seen (too old, too many, or a restart lost them). ``bus_interrupted``: the
    gateway's own link to the bus broke and it could not fetch everything it missed.
    """

    channel: str
    reason: Literal["recovery_incomplete", "bus_interrupted"]


@dataclass(frozen=True, slots=True)
class Renamed:
    """The server accepted a new name (``rename``)."""

    name: str
    channel: str


@dataclass(frozen=True, slots=True)
class ServerError:
    """The server refused something no call is waiting for (``code`` is stable,
    docs/protocol.md; ``message`` is for people)."""

    code: str
    message: str


Event = (
    Connected
    | Disconnected
    | Message
    | PresenceDiff
    | Presence
    | Recovered
    | Gap
    | Renamed
    | ServerError
)


# --- errors ---------------------------------------------------------------------------------


class CommandRefused(Exception):
    """The server refused a command (``who``, ``rename``, ``join``) with this stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PublishError(CommandRefused):
    """A message was not published: the server refused it (``text_too_long``, …), or no ack
    came in time (``timeout``: it may have been; send again with the same ``idempotency_key``
    and it is published at most once)."""

    def __init__(self, code: str, message: str, idempotency_key: str) -> None:
        super().__init__(code, message)
        self.idempotency_key = idempotency_key


class ClientClosed(Exception):
    """The client was closed: nothing more can be sent or received."""


# --- the client ------------------------------------------------------------------------------


@asynccontextmanager
async def connect(
    url: str = DEFAULT_URL,
    *,
    name: str | None = None,
    channel: str = "general",
    token: str | None = None,
    history: int = 0,
    since: str | None = None,
    epoch: str | None = None,
    announce: bool = True,
    listen: bool = True,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[RealtimeClient]:
    """A client connected and welcomed as ``name`` in ``channel``; closed (code 1000) on exit.

    ``history`` asks for the last N messages on joining; ``since`` (with the ``epoch`` of that
    message) for every message after one a previous run saw: it resumes rather than repeats.
    ``token`` goes in the ``Authorization`` header, never in the URL. ``announce=False`` stays
    out of presence; ``listen=False`` drops events, for a program that only sends and never
    iterates (otherwise unread events hold the connection back, acks included).
    ``ssl_context`` verifies a ``wss://`` gateway (a private CA); by default the system's CAs.
    Raises ``Unreachable``, ``Denied``, ``Refused`` or ``ServerNotTrusted`` when the first
    connection cannot be made: a wrong URL is an error, not an outage.
    """
    target = Target(url, name, channel, announce, history, token=token, ssl_context=ssl_context)
    client = RealtimeClient(target, listen=listen, since=since, epoch=epoch)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # our task and the caller's body, in one nursery
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from sole.__cause__


class RealtimeClient:
    """One program's presence on a gateway, kept up across drops; made by ``connect``.

    Iterate it for events; ``send``, ``who``, ``rename`` and ``join`` may be called from any
    task meanwhile. A call made while the connection is down waits for the next one.
    """

    def __init__(
        self,
        target: Target,
        *,
        listen: bool = True,
        since: str | None = None,
        epoch: str | None = None,
    ) -> None:
        self._link = Link(target, _Sink(self))
        if since is not None:  # the first connection resumes there instead of joining afresh
            self._link.seen.resume_from(since, epoch)
        self._listen = listen
        self._events_in, self._events = trio.open_memory_channel[Event](EVENT_BUFFER)
        self._chat: ChatConnection | None = None
        self._replay: Replay | None = None
        self._changed = trio.Event()  # set, and replaced, at each change of the connection
        self._deliveries = Deliveries()
        self._pacer = Pacer(None)
        self._refs = itertools.count(1)
        self._asked: list[_Asked] = []  # commands waiting for their answer, oldest first
        self._started: Callable[[], None] | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._name = target.name or ""

    # --- what programs use -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """Our name, as the server last welcomed us."""
        return self._name

    @property
    def channel(self) -> str:
        """The channel we are in (or, during a ``join``, moving to)."""
        return self._link.channel

    @property
    def connected(self) -> bool:
        """Whether a connection is up now; calls made while it is not wait for the next."""
        return self._chat is not None

    @property
    def last_message(self) -> tuple[str, str | None] | None:
        """The newest message id seen and its epoch: pass them to ``connect(since=, epoch=)``
        to resume in a later run."""
        newest = self._link.seen.newest_text
        return None if newest is None else (newest, self._link.seen.epoch)

    def __aiter__(self) -> RealtimeClient:
        return self

    async def __anext__(self) -> Event:
        """The next event; ends when the client is closed, or raises what ended it."""
        try:
            return await self._events.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._failure is not None:
                raise self._failure from None
            raise StopAsyncIteration from None

    async def send(self, text: str, *, idempotency_key: str | None = None) -> str:
        """Publish ``text`` in our channel and return its id once the server acks it.

        Paced to the server's limits; sent again after a ``rate_limited`` or
        ``bus_unavailable`` refusal, or a connection lost before the answer, always with the
        same idempotency key (made up unless given), so it is published at most once. Raises
        ``PublishError`` when the server refuses it for good or SEND_TIMEOUT passes. Awaiting
        each send before the next keeps their order.
        """
        key = idempotency_key or secrets.token_hex(16)
        retries = Retries()
        with trio.move_on_after(SEND_TIMEOUT):
            while True:
                chat = await self._connection()
                await self._pacer.wait()
                if chat is not self._chat:
                    continue  # dropped while we waited
                pending = self._deliveries.expect(f"rt-{next(self._refs)}")
                try:
                    await chat.publish(text, pending.ref, idempotency_key=key)
                except (ConnectionLost, Denied):
                    self._lost(chat)
                    continue
                answer = await pending.wait()
                if answer is None:  # lost before the answer: the same key again
                    continue
                if answer.get("type") == "ack":
                    return str(answer.get("id"))
                if (delay := retries.delay(answer, self._pacer)) is None:
                    raise PublishError(*_code_and_message(answer), key)
                await trio.sleep(delay)
        raise PublishError(
            "timeout", f"no ack within {SEND_TIMEOUT:g} s; it may have been published", key
        )

    async def who(self) -> list[str]:
        """Everyone in our channel, on every gateway (sorted display names)."""
        answer = await self._command("presence", lambda chat: chat.who())
        members = answer.get("members")
        return [str(m) for m in members] if isinstance(members, list) else []

    async def rename(self, name: str) -> None:
        """Be called ``name`` from now on (and after reconnections); ``CommandRefused`` with
        ``bad_name`` or ``name_taken`` when the server says no."""
        await self._command("welcome", lambda chat: chat.rename(name))

    async def join(self, channel: str) -> None:
        """Move to ``channel``: reconnect there, starting afresh (no history unless
        ``connect`` asked for some). ``CommandRefused`` (we stay where we were) when the
        server refuses it: ``bad_channel``, or ``channel_forbidden`` by our token."""
        if channel == self._link.channel:
            return
        asked = self._ask("join", channel)
        self._lost(self._chat)  # what waits to be sent goes to the new channel
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                await self._link.move(channel)
                answer = await asked.pending.wait()
        finally:
            self._forget(asked)
        if answer is not None and answer.get("type") == "error":
            raise CommandRefused(*_code_and_message(answer))

    async def close(self) -> None:
        """Leave: close the connection politely (code 1000); iterating then ends."""
        if self._closed:
            return
        self._closed = True
        await self._link.leave()
        self._events_in.close()
        self._changed.set()

    # --- how calls wait --------------------------------------------------------------------

    async def _connection(self) -> ChatConnection:
        """The live connection; waits for one while the client reconnects."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._chat is not None:
                return self._chat
            await self._changed.wait()

    async def _command(
        self,
        kind: Literal["presence", "welcome"],
        send: Callable[[ChatConnection], Awaitable[None]],
    ) -> dict[str, Any]:
        """Send a command and wait for its answer, sending it again after a drop; raises
        ``trio.TooSlowError`` after COMMAND_TIMEOUT."""
        with trio.fail_after(COMMAND_TIMEOUT):
            while True:
                chat = await self._connection()
                asked = self._ask(kind, None)
                try:
                    await send(chat)
                    answer = await asked.pending.wait()
                except (ConnectionLost, Denied):
                    self._lost(chat)
                    continue
                finally:
                    self._forget(asked)
                if answer is None:
                    continue
                if answer.get("type") == "error":
                    raise CommandRefused(*_code_and_message(answer))
                return answer

    def _ask(self, kind: str, channel: str | None) -> _Asked:
        asked = _Asked(kind, channel, Pending(kind))
        self._asked.append(asked)
        return asked

    def _forget(self, asked: _Asked) -> None:
        """A command no longer waits (answered, timed out or cancelled)."""
        if asked in self._asked:
            self._asked.remove(asked)

    def _answer(self, event: Mapping[str, Any] | None, *kinds: str) -> bool:
        """Hand ``event`` to the oldest command of one of ``kinds`` waiting; False if none."""
        for asked in self._asked:
            if asked.kind in kinds:
                self._asked.remove(asked)
                asked.pending.answer = None if event is None else dict(event)
                asked.pending.answered.set()
                return True
        return False

    def _lost(self, chat: ChatConnection | None) -> None:
        """``chat`` is gone: nothing sent on it will be answered."""
        if chat is not None and chat is self._chat:
            self._chat = None
        self._deliveries.lose_all()
        while self._answer(None, "presence", "welcome"):
            pass
        self._changed.set()
        self._changed = trio.Event()

    # --- what the Link reports -------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started = task_status.started
        try:
            await self._link.run()
        except FATAL as exc:
            if self._started is not None:
                raise  # the first connection: ``connect`` raises it
            self._failure = exc
        finally:
            self._events_in.close()
            self._lost(self._chat)

    async def _connected(self, chat: ChatConnection) -> None:
        self._chat, self._replay, self._name = chat, chat.replay, chat.name
        self._pacer = Pacer.for_welcome(chat.welcome)
        if any(a.kind == "join" and a.channel == chat.channel for a in self._asked):
            self._answer(chat.welcome, "join")
        self._changed.set()
        self._changed = trio.Event()
        if (started := self._started) is not None:  # the first welcome: ``connect`` returns
            self._started = None
            started()
        resumed = chat.replay is not None and chat.replay.resumed
        node = str(chat.welcome.get("node", ""))
        await self._emit(Connected(chat.name, chat.channel, node, resumed))

    async def _received(self, frame: Frame) -> None:
        kind, event = frame.kind, frame.event
        if kind in ("ack", "error") and self._deliveries.answer(event):
            return  # a send waits for it
        if kind == "error":
            if not self._answer(event, "presence", "welcome", "join"):
                await self._emit(ServerError(*_code_and_message(event)))
        elif kind == "welcome":  # the answer to a rename
            self._answer(event, "welcome")
            self._name = _str(event, "name") or self._name
            await self._emit(Renamed(self._name, _str(event, "channel")))
        elif kind == "presence":
            self._answer(event, "presence")
            await self._emit(Presence(_str(event, "channel"), _names(event.get("members"))))
        else:
            for item in _events(kind, event, self._replay):
                await self._emit(item)

    async def _disconnected(self, error: ChatError, retry_in: float) -> None:
        self._lost(self._chat)
        await self._emit(Disconnected(error.reason, error.code, retry_in))

    async def _emit(self, event: Event) -> None:
        if self._listen and not self._closed:
            # Closed while the event waited for room: nobody will read it.
            with suppress(trio.ClosedResourceError):
                await self._events_in.send(event)


class _Sink:
    """The Link's view of a client (link.py ``Sink``), kept off the client's public face."""

    def __init__(self, client: RealtimeClient) -> None:
        self._client = client

    async def connected(self, chat: ChatConnection) -> None:
        await self._client._connected(chat)

    async def received(self, frame: Frame) -> None:
        await self._client._received(frame)

    async def disconnected(self, error: ChatError, retry_in: float) -> None:
        await self._client._disconnected(error, retry_in)


@dataclass(slots=True)
class _Asked:
    """A command waiting for its answer: a ``presence``, a ``welcome``, or (``join``) the
    welcome in ``channel``; an ``error`` instead is a refusal."""

    kind: str
    channel: str | None
    pending: Pending


# --- frames to events --------------------------------------------------------------------------


def _events(kind: object, event: Mapping[str, Any], replay: Replay | None) -> list[Event]:
    """The events a frame means; none for what programs need not see (pongs, old notices)."""
    channel = _str(event, "channel")
    if kind == "message":
        epoch = event.get("epoch")
        return [
            Message(
                _str(event, "id"),
                epoch if isinstance(epoch, str) and epoch else None,
                channel,
                _str(event, "sender"),
                _str(event, "text"),
                _float(event.get("ts")),
            )
        ]
    if kind == "presence_diff":
        return [
            PresenceDiff(
                channel,
                _names(event.get("joined")),
                _names(event.get("left")),
                int(_float(event.get("more_joined"))),
                int(_float(event.get("more_left"))),
            )
        ]
    if kind == "gap":
        return [Gap(channel, "bus_interrupted")]
    if kind == "recovered":
        complete = event.get("complete") is not False
        epoch = event.get("epoch")
        recovered = Recovered(
            channel,
            replay.shown if replay is not None else int(_float(event.get("count"))),
            complete,
            event.get("reset") is True,
            epoch if isinstance(epoch, str) and epoch else None,
        )
        # A first look at the history (``history=N``) that finds fewer is no loss to us.
        lost = not complete and replay is not None and replay.resumed
        return [Gap(channel, "recovery_incomplete"), recovered] if lost else [recovered]
    return []


def _str(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return value if isinstance(value, str) else ""


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def _names(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _code_and_message(event: Mapping[str, Any]) -> tuple[str, str]:
    return _str(event, "code") or "error", _str(event, "message")
