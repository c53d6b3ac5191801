"""Staying connected: reconnect after every drop, with backoff, until told to leave.

Each reconnection asks for what was missed (``since`` the newest message id seen), and every
message passes a check against the ids already shown, so what the sink gets is each message
once, in order, whatever happened to the connection.

``move`` switches channels the simplest robust way: the Link closes its connection and opens a
new one with the new channel in the handshake query, exactly as it would reconnect. Message ids
are per channel, so the ids seen in the old channel are forgotten: resuming the new channel
``since`` an id of the old one would ask for the wrong messages.

Only a connection that worked once is worth waiting for: when the very first one cannot be made
(a wrong port, an unknown host) ``run`` raises ``Unreachable`` at once, so a typo is an error
and not an endless "retrying". A gateway that answers ``503`` with ``Retry-After`` (full, or not
ready yet) is waited for, that long and a little more, a few times even then.

A ``welcome`` after the first one answers our ``hello`` (``rename``): the Link notes the new name,
so that a reconnection keeps it. It also notes the history's ``epoch`` (in ``welcome`` and
``recovered``) and sends it back with ``since``, so the gateway can tell "the history restarted,
nothing was missed" from "messages may be lost".
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
    Unreachable,
    open_chat,
)
from broadcast.client.recovery import SeenMessages
from broadcast.protocol.errors import CloseCode

# A connection that lasted this long resets the backoff; a gateway that accepts and then drops
# every connection at once is not hammered at the shortest delay.
STABLE_SECONDS = 5.0
# The first connection waits out this many "503, Retry-After" answers before giving up.
FIRST_CONNECTION_BUSY_TRIES = 5


class Sink(Protocol):
    """What a Link reports to; called from the Link's task, one call at a time.

    Awaited, so that a sink that hands events to a bounded queue (realtime.py) holds the Link
    back while its reader is busy, rather than dropping events or buffering without end.
    """

    async def connected(self, chat: ChatConnection) -> None: ...

    async def received(self, frame: Frame) -> None: ...

    async def disconnected(self, error: ChatError, retry_in: float) -> None: ...


def server_shut_down(error: ChatError) -> bool:
    """The gateway said it was going (1001) or draining (1012): not a network failure."""
    return isinstance(error, ConnectionLost) and error.code in (
        CloseCode.GOING_AWAY,
        CloseCode.SERVICE_RESTART,
    )


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
        self._ever_welcomed = False  # any connection at all worked: failures are outages
        self._busy_answers = 0  # 503s before the first welcome
        self._moves = 0  # bumped by each ``move``: a connection made for an older one is stale
        self.seen = SeenMessages()
        self.epoch: str | None = None  # of the channel's history, as the gateway last said

    async def run(self) -> None:
        while not self._leaving:
            welcomed_at: float | None = None
            target, moves = self._target, self._moves
            since = self.seen.newest_text
            history = 0 if self._welcomed or since is not None else target.history
            epoch = (self.seen.epoch or self.epoch) if since is not None else None
            try:
                async with open_chat(target, since=since, history=history, epoch=epoch) as chat:
                    if self._moves != moves:  # moved while connecting: not this channel
                        continue
                    welcomed_at = trio.current_time()
                    self._left = None
                    self._welcomed = self._ever_welcomed = True
                    self.epoch = chat.epoch or self.epoch
                    if self.seen.epoch is None and self.seen.newest_text is None:
                        self.seen.epoch = chat.epoch
                    self._chat = chat
                    await self._sink.connected(chat)
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
                self.epoch = None
                self._welcomed = True  # its history was shown once already; not again
                await self._sink.received(Frame(json.dumps(refused.event), dict(refused.event)))
            except ChatError as error:
                self._chat = None
                if self._leaving:
                    return
                if self._moves != moves:  # moved meanwhile: try the new channel at once
                    self._moving = False
                    continue
                if not self._ever_welcomed and not self._worth_waiting(error):
                    raise
                lasted = None if welcomed_at is None else trio.current_time() - welcomed_at
                if lasted is not None and lasted >= STABLE_SECONDS:
                    self._backoff.reset()
                delay = self._next_delay(error)
                await self._sink.disconnected(error, delay)
                with trio.CancelScope() as self._waiting:
                    await trio.sleep(delay)

    def _worth_waiting(self, error: ChatError) -> bool:
        """Before any welcome: only a gateway that said "503, come back in N s" is waited for."""
        if isinstance(error, Unreachable) and error.retry_after is not None:
            self._busy_answers += 1
            return self._busy_answers <= FIRST_CONNECTION_BUSY_TRIES
        return False

    def _next_delay(self, error: ChatError) -> float:
        """For a draining gateway, the delay it drew for us (1012 ``reconnect in 1.27 s``) or
        at once (a little jitter), unless that is all we get; no sooner than a 503's
        Retry-After."""
        if server_shut_down(error) and self._backoff.failures == 0:
            soon = self._backoff.soon()  # counts the failure: the next one backs off
            return soon if error.retry_after is None else error.retry_after
        if error.retry_after is not None:
            return self._backoff.at_least(error.retry_after)
        return self._backoff.next_delay()

    async def _relay(self, chat: ChatConnection) -> None:
        """Hand events to the sink until the connection ends; returns only when leaving or
        moving to another channel."""
        try:
            while True:
                frame = await chat.receive()
                if frame.kind == "welcome":  # the answer to a hello: our new name
                    self._renamed(chat, frame)
                elif frame.kind == "recovered" and isinstance(frame.event.get("epoch"), str):
                    self.epoch = frame.event["epoch"] or self.epoch
                if self.seen.admit(frame):
                    if chat.replay is not None:
                        chat.replay.note(frame)
                    await self._sink.received(frame)
        except ConnectionLost:
            if not (self._leaving or self._moving):
                raise
            await chat.wait_closed()
            self._moving = False

    def _renamed(self, chat: ChatConnection, frame: Frame) -> None:
        chat.welcome = frame.event
        name = frame.event.get("name")
        if isinstance(name, str) and frame.event.get("channel") == self._target.channel:
            self._target = replace(self._target, name=name)

    async def rename(self, name: str) -> None:
        """Ask the server for ``name`` on the current connection (the welcome that answers
        is relayed as any event); raises ConnectionLost when there is none."""
        if self._chat is None:
            raise ConnectionLost("not connected")
        await self._chat.rename(name)

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
        self._moves += 1
        self.seen = SeenMessages()
        self.epoch = None
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
