"""What one gateway has written to presence: its live entries, and removals Redis still owes.

Pure bookkeeping, no I/O: RedisPresence writes through it to Redis and rewrites all of it at
every refresh, which is how presence heals after a Redis restart or an outage. Its size is
bounded by the gateway's connections (live entries), PENDING_LIMIT and WATCH_LIMIT.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from broadcast.presence.scripts import encode_member

# Removals that failed (Redis down when a client left) are retried at the next refresh. Past
# this many the oldest is dropped: it then expires by itself within the TTL, and some gateway
# reports it once more through on_expired (a duplicate leave notice, nothing worse).
PENDING_LIMIT = 10000
# Channels a caller asked ``members`` of, swept although this gateway has no entry there, for a
# while: a few hundred at most in practice; past the limit the oldest is forgotten.
WATCH_LIMIT = 1024


@dataclass
class Update:
    """One channel's share of a refresh: what to remove, then what to (re)write."""

    channel: str
    removals: list[str] = field(default_factory=list)
    additions: list[str] = field(default_factory=list)


class LocalEntries:
    """Channel -> key -> name for this gateway's clients, plus pending removals and watches."""

    def __init__(self, watch_seconds: float) -> None:
        self._watch_seconds = watch_seconds
        self._live: dict[str, dict[str, str]] = {}
        # (channel, member) -> None: an ordered set, oldest first.
        self._pending: dict[tuple[str, str], None] = {}
        self._watched: dict[str, float] = {}  # channel -> until when, oldest first

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._live.values())

    def enter(self, channel: str, key: str, name: str) -> str | None:
        """Records the entry; returns the member it replaces (same key, other name), if any."""
        keys = self._live.setdefault(channel, {})
        previous = keys.get(key)
        keys[key] = name
        self._pending.pop((channel, encode_member(key, name)), None)  # present again
        if previous is None or previous == name:
            return None
        return encode_member(key, previous)

    def leave(self, channel: str, key: str) -> str | None:
        """Forgets the entry; returns its member, or None when there was none."""
        keys = self._live.get(channel)
        if keys is None or key not in keys:
            return None
        name = keys.pop(key)
        if not keys:
            del self._live[channel]
        return encode_member(key, name)

    def owe_removal(self, channel: str, member: str) -> None:
        """``member`` may still be in Redis although it left: remove it at the next refresh."""
        self._pending[(channel, member)] = None
        while len(self._pending) > PENDING_LIMIT:
            del self._pending[next(iter(self._pending))]

    def watch(self, channel: str, now: float) -> None:
        """A caller asked who is in ``channel``: sweep it too, for a while."""
        self._watched.pop(channel, None)  # re-insert: the dict stays ordered by time
        self._watched[channel] = now + self._watch_seconds
        while len(self._watched) > WATCH_LIMIT:
            del self._watched[next(iter(self._watched))]

    def knows(self, channel: str, key: str, name: str) -> bool:
        """True if the entry is one of ours (live, or left with its removal pending): its expiry
        is not another gateway's death, and needs no leave notice."""
        member = encode_member(key, name)
        return self._live.get(channel, {}).get(key) == name or (channel, member) in self._pending

    def refresh_plan(self, now: float) -> list[Update]:
        """One Update per channel to refresh or sweep: with live entries, pending removals, or
        watched until after ``now`` (expired watches are dropped here)."""
        while self._watched and next(iter(self._watched.values())) <= now:
            del self._watched[next(iter(self._watched))]
        updates: dict[str, Update] = {}
        for channel, keys in self._live.items():
            updates[channel] = Update(
                channel, additions=[encode_member(key, name) for key, name in keys.items()]
            )
        # A member both pending and live (it came back while its removal was owed) is removed
        # and written again in the same script call: it stays.
        for channel, member in self._pending:
            updates.setdefault(channel, Update(channel)).removals.append(member)
        for channel in self._watched:
            updates.setdefault(channel, Update(channel))
        return list(updates.values())

    def removals_done(self, updates: Iterable[Update]) -> None:
        """Redis applied these updates: their removals are no longer owed."""
        for update in updates:
            for member in update.removals:
                self._pending.pop((update.channel, member), None)
