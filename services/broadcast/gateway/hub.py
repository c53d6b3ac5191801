"""Local membership by channel, and the fan-out of bus batches to the members on this gateway."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import trio

from broadcast.bus.base import Bus, Delivery
from broadcast.gateway.outbox import Outbox
from broadcast.protocol.envelope import decode
from broadcast.protocol.lines import render_event
from broadcast.protocol.websocket_frames import encode_text_frame

log = logging.getLogger("broadcast.gateway.hub")

# Above this many members here, line clients are not told who came and went (it would be most
# of what they read); WebSocket clients still get the diffs, to keep their member lists.
LARGE_CHANNEL_MEMBERS = 100


class Member(Protocol):
    """What the fan-out needs of a client session."""

    origin: str
    channel: str
    echo: bool
    speaks_websocket: bool
    outbox: Outbox
    held: list[tuple[str | None, bytes]] | None

    def hold(self, message_id: str | None, data: bytes) -> None: ...


class ChannelHub:
    """Knows who is in which channel here; subscribes on the bus only where someone listens."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._members: dict[str, set[Member]] = {}
        # Serialises SUBSCRIBE/UNSUBSCRIBE so a join never races the last leave of a channel.
        self._subscription_lock = trio.Lock()
        self._watchers: dict[str, Callable[[bytes], None]] = {}
        self.observe_lag: Callable[[float], None] = lambda seconds: None
        self.on_presence_diff: Callable[[str], None] = lambda channel: None
        self.deliveries = 0

    def channel_count(self) -> int:
        return len(self._members)

    def member_count(self) -> int:
        return sum(len(members) for members in self._members.values())

    def local_members(self, channel: str) -> int:
        """Clients of ``channel`` on this gateway."""
        return len(self._members.get(channel, ()))

    async def add(self, member: Member) -> None:
        """Join ``member.channel``; returns once messages published afterwards will reach it.

        The member is in the set before the subscription is confirmed: Redis may send the first
        messages in the same read as the confirmation, and they must find it there.
        """
        async with self._subscription_lock:
            members = self._members.get(member.channel)
            first = members is None
            if members is None:
                members = self._members[member.channel] = set()
            members.add(member)
            if first:
                try:
                    await self._bus.subscribe(member.channel)
                except BaseException:
                    members.discard(member)
                    if not members:
                        del self._members[member.channel]
                    raise

    async def remove(self, member: Member) -> None:
        async with self._subscription_lock:
            members = self._members.get(member.channel)
            if members is None or member not in members:
                return
            members.discard(member)
            if not members:
                del self._members[member.channel]
                await self._bus.unsubscribe(member.channel)

    def watch(self, channel: str, callback: Callable[[bytes], None]) -> None:
        """Hand a channel's payloads to ``callback`` instead of clients (the readiness probe)."""
        self._watchers[channel] = callback

    def deliver(self, batch: list[Delivery]) -> None:
        """Fan a batch out in bus order, then flush: at most one write per client per batch.

        Each payload is encoded at most once per kind of client, whatever their number.
        """
        now = time.time()
        touched: set[Outbox] = set()
        for channel, payload in batch:
            members = self._members.get(channel)
            if not members:
                if channel in self._watchers:
                    self._watchers[channel](payload)
                continue
            try:
                event = decode(payload)
            except ValueError:
                log.warning("dropping a malformed payload on channel %r: %.80r", channel, payload)
                continue
            origin = event.get("origin")
            message_id = event.get("id")
            if message_id is not None:
                self.observe_lag(now - event.get("ts", now))
            frame: bytes | None = None
            line: bytes | None = None
            if event.get("type") == "presence_diff":
                self.on_presence_diff(channel)
                if len(members) > LARGE_CHANNEL_MEMBERS:
                    line = b""
            for member in members:
                if member.origin == origin and not member.echo:
                    continue
                if member.speaks_websocket:
                    if frame is None:
                        frame = encode_text_frame(payload)
                    data = frame
                else:
                    if line is None:
                        line = render_event(event) or b""
                    if not line:
                        continue
                    data = line
                if member.held is None:
                    member.outbox.push(data)
                    touched.add(member.outbox)
                else:
                    member.hold(message_id, data)
                self.deliveries += 1
        for outbox in touched:
            outbox.flush()
