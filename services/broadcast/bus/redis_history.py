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

The same script reads the channel's epoch (its own key, made by the publish script) and takes
the reader's: when they differ, the read is a *reset* and returns the newest entries from the
stream's start instead of after ``after``, whose id means nothing in the current epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broadcast.protocol.envelope import message_payload
from broadcast.protocol.ids import ZERO_ID, MessageId, format_id, next_id, parse_message_id
from broadcast.redis.scripts import Script

# KEYS[1] the stream, KEYS[2] the channel's epoch; ARGV[1] after (the "held at or before"
# probe), ARGV[2] the first id wanted (inclusive; empty: none), ARGV[3] how many of the newest to
# return, ARGV[4] the reader's epoch (empty: not known). Returns {TIME, epoch, reset} for a
# missing stream, else {TIME, epoch, reset, length, entries-added, last-generated-id,
# max-deleted-entry-id, entries at or before ARGV[1] (0 or 1), entries newest first}; epoch is
# empty when the key is missing, reset 1 when ARGV[4] is given and is not the epoch (entries are
# then the newest from the start). No shebang flags, so the same script loads on Redis 6 (where
# XINFO lacks the last two fields and every answer reads as incomplete) instead of failing the
# publisher's start.
HISTORY_SCRIPT = """\
local key = KEYS[1]
local now = redis.call('TIME')
local epoch = redis.call('GET', KEYS[2]) or ''
local reset = 0
local first = ARGV[2]
if ARGV[4] ~= '' and ARGV[4] ~= epoch then
  reset = 1
  first = '-'
end
if redis.call('EXISTS', key) == 0 then return {now, epoch, reset} end
local info = redis.call('XINFO', 'STREAM', key)
local field = {}
for i = 1, #info, 2 do field[info[i]] = info[i + 1] end
local entries = {}
if first ~= '' and tonumber(ARGV[3]) > 0 then
  entries = redis.call('XREVRANGE', key, '+', first, 'COUNT', ARGV[3])
end
local held = #redis.call('XREVRANGE', key, ARGV[1], '-', 'COUNT', 1)
return {now, epoch, reset, field['length'], field['entries-added'] or -1,
  field['last-generated-id'],
  field['max-deleted-entry-id'] or '18446744073709551615-18446744073709551615', held, entries}
"""
HISTORY = Script(HISTORY_SCRIPT)


def history_args(
    after: MessageId, count: int, epoch: str | None = None
) -> tuple[str, str, int, str]:
    """ARGV of HISTORY_SCRIPT for the newest ``count`` entries after ``after`` of ``epoch``."""
    first = next_id(after)
    return format_id(after), "" if first is None else format_id(first), count, epoch or ""


def entry_payloads(entries: list[Any], epoch: str = "") -> list[bytes]:
    """XRANGE-shaped entries as complete message payloads of ``epoch``, in the order given. An
    entry without an ``m`` field (not written by a gateway) is skipped."""
    payloads = []
    for entry_id, fields in entries:
        if fields[:1] == [b"m"]:
            body = fields[1]
        else:
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            if b"m" not in pairs:
                continue
            body = pairs[b"m"]
        payloads.append(message_payload(entry_id.decode(), body, epoch))
    return payloads


@dataclass(frozen=True, slots=True)
class StreamRead:
    """One HISTORY_SCRIPT answer: the entries and the stream's own account of itself."""

    now_ms: int
    """Redis's clock (ids are made from it, so ages compare without skew)."""
    exists: bool
    newest_first: list[Any]
    epoch: str = ""
    """The channel's epoch; empty when it has none (no message since Redis lost its data)."""
    reset: bool = False
    """The reader's epoch was not ``epoch``: ``newest_first`` starts from the stream's start."""
    length: int = 0
    entries_added: int = -1
    last_generated: MessageId = ZERO_ID
    max_deleted: MessageId = ZERO_ID
    holds_at_or_before: bool = False

    @classmethod
    def decode(cls, reply: list[Any]) -> StreamRead:
        seconds, micros = reply[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        epoch, reset = reply[1].decode(), reply[2] == 1
        if len(reply) == 3:
            return cls(now_ms, exists=False, newest_first=[], epoch=epoch, reset=reset)
        length, added, last_generated, max_deleted, held, entries = reply[3:]
        return cls(
            now_ms,
            exists=True,
            newest_first=entries,
            epoch=epoch,
            reset=reset,
            length=length,
            entries_added=added,
            last_generated=parse_message_id(last_generated),
            max_deleted=parse_message_id(max_deleted),
            holds_at_or_before=held > 0,
        )

    def messages(self, limit: int) -> list[bytes]:
        """The newest ``limit`` entries read, oldest first, as payloads."""
        return entry_payloads(self.newest_first[:limit][::-1], self.epoch)

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
