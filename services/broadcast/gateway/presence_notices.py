"""Who came and went, told once per channel per interval rather than once per client.

A join notice per client costs a delivery to every member: N clients arriving cost O(N²), and a
reconnect storm of 1,500 clients took 30 s. Here each gateway gathers its own clients' arrivals
and departures per channel and publishes one ``presence_diff`` event per interval:

    {"type": "presence_diff", "channel": "general", "joined": ["bob"], "left": ["carol"],
     "more_joined": 0, "more_left": 0, "ts": 1732435201.5}

so a storm costs a few events per member, whatever its size. At most ``NAMES_PER_DIFF`` names
of each kind are listed (``more_*`` counts the rest, and a client that keeps a list asks
``who``). A channel with more than ``LARGE_CHANNEL_MEMBERS`` members here is told every
``LARGE_INTERVAL_SECONDS``: there, individual arrivals are noise, and the bound keeps a busy
channel's churn from costing each member more than one small event per interval.

The same module answers ``who`` for many clients with one read (``members``): a storm of
joins that each want the member list shares the store's answer for ``SNAPSHOT_SECONDS``, as
long as no ``presence_diff`` of the channel was delivered since the read (the asker is already
subscribed, so every later diff reaches it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Final

import trio

from broadcast.bus.base import Bus, BusUnavailable
from broadcast.gateway.hub import LARGE_CHANNEL_MEMBERS, ChannelHub
from broadcast.presence import PresenceStore
from broadcast.protocol.envelope import encode

log = logging.getLogger("broadcast.gateway.presence")

# A person sees a join within half a second; a storm is told in a handful of events.
INTERVAL_SECONDS: Final = 0.5
LARGE_INTERVAL_SECONDS: Final = 5.0
NAMES_PER_DIFF: Final = 50
# A member list read serves every client that asks within this long.
SNAPSHOT_SECONDS: Final = 0.5
# Names in a ``presence`` event at most (with ``count`` for all): a joiner of a channel of 10,000
# gets a first page, not 10,000 names, so a storm of joins stays O(1) bytes per join.
PRESENCE_LIST_LIMIT: Final = 1000


@dataclass
class _Changes:
    """Arrivals and departures not told yet, as ordered sets (dict keys): O(1) per change."""

    joined: dict[str, None] = field(default_factory=dict)
    left: dict[str, None] = field(default_factory=dict)
    since: float = 0.0

    def add(self, bucket: dict[str, None], other: dict[str, None], name: str) -> None:
        """One arrival (or departure); one that undoes a pending opposite cancels it."""
        if name in other:
            del other[name]
        else:
            bucket[name] = None


@dataclass
class _Snapshot:
    """One read of the presence store, shared by every client that asks while it is fresh."""

    read_at: float
    names: list[str]
    name_set: frozenset[str]
    event: bytes | None = None
    """The ``presence`` event of a large channel, encoded once for every joiner."""


class PresenceNotices:
    def __init__(
        self,
        bus: Bus,
        hub: ChannelHub,
        presence: PresenceStore,
        *,
        interval: float = INTERVAL_SECONDS,
        large_interval: float = LARGE_INTERVAL_SECONDS,
    ) -> None:
        self._bus = bus
        self._hub = hub
        self._presence = presence
        self._interval = interval
        self._large_interval = large_interval
        self._changes: dict[str, _Changes] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._reads: dict[str, trio.Event] = {}
        self._diffs_seen: dict[str, int] = {}

    def joined(self, channel: str, name: str) -> None:
        changes = self._pending(channel)
        changes.add(changes.joined, changes.left, name)

    def left(self, channel: str, name: str) -> None:
        changes = self._pending(channel)
        changes.add(changes.left, changes.joined, name)

    def _pending(self, channel: str) -> _Changes:
        changes = self._changes.get(channel)
        if changes is None:
            changes = self._changes[channel] = _Changes(since=trio.current_time())
        return changes

    def forget_snapshot(self, channel: str) -> None:
        """A ``presence_diff`` of ``channel`` was delivered here: a member list read before it
        may miss what it told, and a client that joined after it would never learn it."""
        self._snapshots.pop(channel, None)
        self._diffs_seen[channel] = self._diffs_seen.get(channel, 0) + 1
        if len(self._diffs_seen) > 10_000:
            self._diffs_seen.clear()

    async def run(self) -> None:
        """Publish what changed, per channel, once its interval has passed."""
        while True:
            await trio.sleep(self._interval)
            now = trio.current_time()
            for channel in list(self._changes):
                changes = self._changes[channel]
                large = self._hub.local_members(channel) > LARGE_CHANNEL_MEMBERS
                if now - changes.since < (self._large_interval if large else 0):
                    continue
                del self._changes[channel]
                if changes.joined or changes.left:
                    await self._publish(channel, changes)

    async def _publish(self, channel: str, changes: _Changes) -> None:
        event = {
            "type": "presence_diff",
            "channel": channel,
            "joined": list(changes.joined)[:NAMES_PER_DIFF],
            "left": list(changes.left)[:NAMES_PER_DIFF],
            "more_joined": max(0, len(changes.joined) - NAMES_PER_DIFF),
            "more_left": max(0, len(changes.left) - NAMES_PER_DIFF),
            "ts": round(time.time(), 3),
        }
        try:
            await self._bus.publish_event(channel, encode(event).encode())
        except BusUnavailable:
            log.info("presence changes in #%s not told: the bus is unavailable", channel)

    async def members(self, channel: str) -> list[str]:
        """The channel's members on every gateway, one store read for many askers.

        A shared read may predate this gateway's latest arrivals: those not yet told are
        added (and departures removed), so a client always finds itself in the list.
        """
        snapshot = await self._shared_read(channel)
        changes = self._changes.get(channel)
        if changes is None or not (changes.joined or changes.left):
            return snapshot.names
        merged = (snapshot.name_set | changes.joined.keys()) - changes.left.keys()
        return sorted(merged)

    async def contains(self, channel: str, name: str) -> bool:
        """Whether ``name`` is in ``channel``: O(1), whatever the channel's size."""
        snapshot = await self._shared_read(channel)
        changes = self._changes.get(channel)
        if changes is not None:
            if name in changes.joined:
                return True
            if name in changes.left:
                return False
        return name in snapshot.name_set

    async def presence_event(self, channel: str) -> bytes:
        """The ``presence`` event for ``channel``: every name in a small channel; in a large
        one the first ``PRESENCE_LIST_LIMIT`` and the count, encoded once per read."""
        snapshot = await self._shared_read(channel)
        if len(snapshot.names) <= PRESENCE_LIST_LIMIT:
            members = await self.members(channel)
            small: dict[str, object] = {"type": "presence", "channel": channel}
            small.update(members=members, count=len(members))
            return encode(small).encode()
        if snapshot.event is None:
            shown = snapshot.names[:PRESENCE_LIST_LIMIT]
            event: dict[str, object] = {
                "type": "presence",
                "channel": channel,
                "members": shown,
                "count": len(snapshot.names),
            }
            snapshot.event = encode(event).encode()
        return snapshot.event

    async def _shared_read(self, channel: str) -> _Snapshot:
        while True:
            snapshot = self._snapshots.get(channel)
            if snapshot is not None and trio.current_time() - snapshot.read_at < SNAPSHOT_SECONDS:
                return snapshot
            reading = self._reads.get(channel)
            if reading is None:
                break
            await reading.wait()
            if channel not in self._snapshots:  # the read failed: try ourselves
                break
        done = self._reads[channel] = trio.Event()
        started, diffs_seen = trio.current_time(), self._diffs_seen.get(channel, 0)
        try:
            members = await self._presence.members(channel)
            snapshot = _Snapshot(started, members, frozenset(members))
            if self._diffs_seen.get(channel, 0) == diffs_seen:  # nothing told meanwhile
                if len(self._snapshots) > 10_000:
                    self._snapshots.clear()
                self._snapshots[channel] = snapshot
            return snapshot
        finally:
            if self._reads.get(channel) is done:
                del self._reads[channel]
            done.set()
