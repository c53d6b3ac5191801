"""Reading a channel's history stream in Redis, and deciding whether an answer is complete.

One Lua script reads, atomically, the newest entries after an id and what the stream knows of
itself (XINFO STREAM), so no trim can fall between the two. Completeness is then decided here,
from that snapshot, by one rule: the stream must *vouch* for ``after``, i.e. show that nothing
after it was removed. It does when it still holds an entry at or before ``after`` (trimming
removes the oldest entries first, so everything after that entry is still there), or when
``after`` is its newest id; XDEL (which we never issue) is covered by ``max-deleted-entry-id``.

Why not ``max-deleted-entry-id`` alone: Redis 7.0 updates it for XDEL only, never for MAXLEN or
MINID trimming (checked against redis-server 7.0.15), so it cannot tell a trimmed history.

A stream that does not vouch for ``after`` lost something after it, or is a new stream (the old
one expired, or Redis restarted without its data) that cannot say what came before it. Both
read as incomplete: the client is told plainly rather than left to guess. A missing stream
vouches only for ``0-0`` (nothing was ever there). The subscriber's refill tells the harmless
case apart (``lost_only_to_expiry``), see redis_bus.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from broadcast.bus.ids import ZERO_ID, MessageId, format_id, next_id, parse_message_id
from broadcast.protocol.envelope import message_payload

# KEYS[1] the stream; ARGV[1] after (the "held at or before" probe), ARGV[2] the first id wanted
# (inclusive; empty: none), ARGV[3] how many of the newest to return. Returns {TIME} for a
# missing stream, else {TIME, length, entries-added, last-generated-id, max-deleted-entry-id,
# entries at or before ARGV[1] (0 or 1), entries newest first}. No shebang flags, so the same
# script loads on Redis 6 (where XINFO lacks the last two fields and every answer reads as
# incomplete) instead of failing the publisher's start.
HISTORY_SCRIPT = """\
local key = KEYS[1]
local now = redis.call('TIME')
if redis.call('EXISTS', key) == 0 then return {now} end
local info = redis.call('XINFO', 'STREAM', key)
local field = {}
for i = 1, #info, 2 do field[info[i]] = info[i + 1] end
local entries = {}
if ARGV[2] ~= '' and tonumber(ARGV[3]) > 0 then
  entries = redis.call('XREVRANGE', key, '+', ARGV[2], 'COUNT', ARGV[3])
end
local held = #redis.call('XREVRANGE', key, ARGV[1], '-', 'COUNT', 1)
return {now, field['length'], field['entries-added'] or -1, field['last-generated-id'],
  field['max-deleted-entry-id'] or '18446744073709551615-18446744073709551615', held, entries}
"""
HISTORY_SCRIPT_SHA = hashlib.sha1(HISTORY_SCRIPT.encode()).hexdigest()


def history_args(after: MessageId, count: int) -> tuple[str, str, int]:
    """ARGV of HISTORY_SCRIPT for the newest ``count`` entries after ``after``."""
    first = next_id(after)
    return format_id(after), "" if first is None else format_id(first), count


def entry_payloads(entries: list[Any]) -> list[bytes]:
    """XRANGE-shaped entries as complete message payloads, in the order given. An entry without
    an ``m`` field (not written by a gateway) is skipped."""
    payloads = []
    for entry_id, fields in entries:
        if fields[:1] == [b"m"]:
            body = fields[1]
        else:
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            if b"m" not in pairs:
                continue
            body = pairs[b"m"]
        payloads.append(message_payload(entry_id.decode(), body))
    return payloads


@dataclass(frozen=True, slots=True)
class StreamRead:
    """One HISTORY_SCRIPT answer: the entries and the stream's own account of itself."""

    now_ms: int
    """Redis's clock (ids are made from it, so ages compare without skew)."""
    exists: bool
    newest_first: list[Any]
    length: int = 0
    entries_added: int = -1
    last_generated: MessageId = ZERO_ID
    max_deleted: MessageId = ZERO_ID
    holds_at_or_before: bool = False

    @classmethod
    def decode(cls, reply: list[Any]) -> StreamRead:
        seconds, micros = reply[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if len(reply) == 1:
            return cls(now_ms, exists=False, newest_first=[])
        length, added, last_generated, max_deleted, held, entries = reply[1:]
        return cls(
            now_ms,
            exists=True,
            newest_first=entries,
            length=length,
            entries_added=added,
            last_generated=parse_message_id(last_generated),
            max_deleted=parse_message_id(max_deleted),
            holds_at_or_before=held > 0,
        )

    def messages(self, limit: int) -> list[bytes]:
        """The newest ``limit`` entries read, oldest first, as payloads."""
        return entry_payloads(self.newest_first[:limit][::-1])

    def cut(self, limit: int) -> bool:
        """More than ``limit`` entries follow ``after`` (the script was asked for one more)."""
        return len(self.newest_first) > limit

    def nothing_removed(self) -> bool:
        """Every entry this stream was given is still in it."""
        return self.entries_added == self.length and self.max_deleted == ZERO_ID

    def vouches_for(self, after: MessageId) -> bool:
        """Whether the stream shows that no entry after ``after`` was removed (module docstring)."""
        if not self.exists:
            return after == ZERO_ID
        if self.max_deleted > after or after > self.last_generated:
            return False  # an entry after it was deleted; or `after` is not from this stream
        if after == self.last_generated or self.holds_at_or_before:
            return True
        return after == ZERO_ID and self.nothing_removed()

    def complete(self, after: MessageId, limit: int) -> bool:
        return self.vouches_for(after) and not self.cut(limit)

    def lost_only_to_expiry(self, after: MessageId, max_age_ms: int) -> bool:
        """The stream cannot vouch for ``after`` only because it expired after ``after``'s
        stream went quiet for ``max_age_ms`` (and may have been started afresh since, with
        nothing removed). For a subscriber that listened until recently, nothing it missed can
        be in the expired stream; a client away for longer cannot say the same."""
        fresh = not self.exists or (self.nothing_removed() and after < self.last_generated)
        return fresh and after[0] <= self.now_ms - max_age_ms
