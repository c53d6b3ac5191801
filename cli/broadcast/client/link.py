"""Staying connected: reconnect after every drop, with backoff, until told to leave.

Each reconnection asks for what was missed (``since`` the newest message id seen), and every
message passes a check against the ids already shown, so what the sink gets is each message
once, in order, whatever happened to the connection.
"""

from __future__ import annotations

from typing import Protocol

import trio

from broadcast.client.backoff import Backoff
from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Frame,
    Target,
    open_chat,
)
from broadcast.client.recovery import SeenMessages
from broadcast.protocol.errors import CloseCode

# A connection that lasted this long resets the backoff; a gateway that accepts and then drops
# every connection at once is not hammered at the shortest delay.
STABLE_SECONDS = 5.0


class Sink(Protocol):
    """What a Link reports to; called from the Link's task, one call at a time."""

    def connected(self, chat: ChatConnection) -> None: ...

    def received(self, frame: Frame) -> None: ...

    def disconnected(self, error: ChatError, retry_in: float) -> None: ...


def server_restarting(error: ChatError) -> bool:
    """The gateway is draining (close code 1012): another one will take us at once."""
    return isinstance(error, ConnectionLost) and error.code == CloseCode.SERVICE_RESTART


class Link:
    """A connection to ``target`` that comes back after drops, feeding events to ``sink``.

    ``run`` loops until ``leave``; only Refused (the server rejected our name or channel),
    Denied (our token) and ServerNotTrusted (its certificate) end it early, since retrying
    would not help: they are not ChatErrors, so they pass straight through. To stop,
    ``await leave()`` and then cancel ``run``: leaving first lets the close handshake complete
    (code 1000) before anything is cancelled.

    The first connection asks for ``target.history`` earlier messages; every later one for
    the messages after the newest id seen. A message whose id was already seen is dropped.
    """

    def __init__(self, target: Target, sink: Sink, backoff: Backoff | None = None) -> None:
        self._target = target
        self._sink = sink
        self._backoff = backoff or Backoff()
        self._chat: ChatConnection | None = None
        self._leaving = False
        self._welcomed = False  # once: later connections resume instead of asking for history
        self.seen = SeenMessages()

    async def run(self) -> None:
        while not self._leaving:
            welcomed_at: float | None = None
            since = self.seen.newest_text
            history = 0 if self._welcomed or since is not None else self._target.history
            try:
                async with open_chat(self._target, since=since, history=history) as chat:
                    welcomed_at = trio.current_time()
                    self._welcomed = True
                    self._chat = chat
                    self._sink.connected(chat)
                    await self._relay(chat)
                    return  # we are leaving
            except ChatError as error:
                self._chat = None
                if self._leaving:
                    return
                lasted = None if welcomed_at is None else trio.current_time() - welcomed_at
                if lasted is not None and lasted >= STABLE_SECONDS:
                    self._backoff.reset()
                delay = self._next_delay(error)
                self._sink.disconnected(error, delay)
                await trio.sleep(delay)

    def _next_delay(self, error: ChatError) -> float:
        """At once (a little jitter) for a draining gateway, unless that is all we get."""
        if server_restarting(error) and self._backoff.failures == 0:
            return self._backoff.soon()
        return self._backoff.next_delay()

    async def _relay(self, chat: ChatConnection) -> None:
        """Hand events to the sink until the connection ends; returns only when leaving."""
        try:
            while True:
                frame = await chat.receive()
                if self.seen.admit(frame):
                    if chat.replay is not None:
                        chat.replay.note(frame)
                    self._sink.received(frame)
        except ConnectionLost:
            if not self._leaving:
                raise
            await chat.wait_closed()

    async def leave(self) -> None:
        """Stop reconnecting and close the current connection politely (bounded in time)."""
        self._leaving = True
        if self._chat is not None:
            await self._chat.close()
