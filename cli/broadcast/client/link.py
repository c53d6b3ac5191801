"""Staying connected: reconnect after every drop, with backoff, until told to leave.

Each reconnection asks for what was missed (``since`` the newest message id seen), and every
message passes a check against the ids already shown, so what the sink gets is each message
once, in order, whatever happened to the connection.

``move`` switches channels the simplest robust way: the Link closes its connection and opens a
new one with the new channel in the handshake query, exactly as it would reconnect. Message ids
are per channel, so the ids seen in the old channel are forgotten: resuming the new channel
``since`` an id of the old one would ask for the wrong messages.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Protocol

import trio

from broadcast.client.backoff import Backoff
from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Frame,
    Refused,
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
        self._moving = False  # the current connection is being closed to change channels
        self._left: Target | None = None  # before a move that has not connected yet
        self._waiting = trio.CancelScope()  # the backoff sleep, which a move cuts short
        self._welcomed = False  # once: later connections resume instead of asking for history
        self.seen = SeenMessages()

    async def run(self) -> None:
        while not self._leaving:
            welcomed_at: float | None = None
            target = self._target
            since = self.seen.newest_text
            history = 0 if self._welcomed or since is not None else target.history
            try:
                async with open_chat(target, since=since, history=history) as chat:
                    if self._target is not target:  # moved while connecting: not this channel
                        continue
                    welcomed_at = trio.current_time()
                    self._left = None
                    self._welcomed = True
                    self._chat = chat
                    self._sink.connected(chat)
                    await self._relay(chat)
                self._chat = None
                if self._leaving:
                    return
                continue  # moving: connect again at once, to the new channel
            except Refused as refused:
                if self._left is None:
                    raise
                # A channel we may not join (a token's ``channels``): go back, and say why.
                self._target, self._left = self._left, None
                self.seen = SeenMessages()
                self._welcomed = True  # its history was shown once already; not again
                self._sink.received(Frame(json.dumps(refused.event), dict(refused.event)))
            except ChatError as error:
                self._chat = None
                if self._leaving:
                    return
                if self._target is not target:  # moved meanwhile: try the new channel at once
                    self._moving = False
                    continue
                lasted = None if welcomed_at is None else trio.current_time() - welcomed_at
                if lasted is not None and lasted >= STABLE_SECONDS:
                    self._backoff.reset()
                delay = self._next_delay(error)
                self._sink.disconnected(error, delay)
                with trio.CancelScope() as self._waiting:
                    await trio.sleep(delay)

    def _next_delay(self, error: ChatError) -> float:
        """At once (a little jitter) for a draining gateway, unless that is all we get."""
        if server_restarting(error) and self._backoff.failures == 0:
            return self._backoff.soon()
        return self._backoff.next_delay()

    async def _relay(self, chat: ChatConnection) -> None:
        """Hand events to the sink until the connection ends; returns only when leaving or
        moving to another channel."""
        try:
            while True:
                frame = await chat.receive()
                if self.seen.admit(frame):
                    if chat.replay is not None:
                        chat.replay.note(frame)
                    self._sink.received(frame)
        except ConnectionLost:
            if not (self._leaving or self._moving):
                raise
            await chat.wait_closed()
            self._moving = False

    @property
    def channel(self) -> str:
        """The channel this Link connects to (the latest ``move``'s)."""
        return self._target.channel

    async def move(self, channel: str) -> None:
        """Connect to ``channel`` from now on: close the current connection (politely, bounded
        in time) so that ``run`` reconnects at once, and start that channel afresh.

        The new channel's first connection asks for ``target.history`` messages, like the
        first one did: joining a channel is joining, whichever way it happens.
        """
        self._left = self._left or self._target
        self._target = replace(self._target, channel=channel)
        self.seen = SeenMessages()
        self._welcomed = False
        self._waiting.cancel()  # reconnecting after a failure: no need to wait any longer
        if self._chat is not None:
            self._moving = True
            await self._chat.close()

    async def leave(self) -> None:
        """Stop reconnecting and close the current connection politely (bounded in time)."""
        self._leaving = True
        if self._chat is not None:
            await self._chat.close()
