"""An in-process bus: one gateway, nothing to install. Same ids, payloads and history as
RedisBus, except that its history is trimmed exactly and never lost while it is held, so it
knows whether an answer is complete.

Memory has a ceiling: all channels' history together stays under a byte budget
(``history_bytes``). Past it, whole channels are forgotten, the least recently published first,
and a channel whose history aged out is forgotten too: nothing is kept per channel once its
history is gone (docs/reliability.md, "Memory")."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import trio

from broadcast.bus.base import DeliverBatch, Delivery, History
from broadcast.protocol.envelope import message_payload
from broadcast.protocol.ids import ZERO_ID, MessageId, format_id, parse_message_id
from broadcast.protocol.limits import HISTORY_LENGTH, HISTORY_MAX_AGE_SECONDS, RECOVERY_LIMIT

# The default budget for all channels' history together: 64 MiB holds the full history (1,000
# messages of ~250 bytes) of ~150 busy channels, or the last few messages of tens of thousands.
HISTORY_BYTES = 64 * 1024 * 1024
# Below this a budget could not hold one channel's full history of the largest messages.
MIN_HISTORY_BYTES = 64 * 1024
# What one stored message costs beyond its payload, measured with tracemalloc on CPython 3.11:
# the (id, payload) tuple, the id tuple and its integers, the bytes header, a deque slot.
ENTRY_OVERHEAD = 160
# What one channel with history costs beyond its messages: its log, its deque's first block,
# its name and its place in the ordered dict.
CHANNEL_OVERHEAD = 1000
# Aged-out channels are also swept this often, so a bus nobody publishes to frees them too.
SWEEP_INTERVAL_SECONDS = 60.0

_UNKNOWN: MessageId = (-1, -1)
"""``trimmed_id`` of a log made after the bus forgot some channel: matches no ``after``, so
the log vouches only for ids it holds (the channel may have had an older, forgotten history)."""


class _ChannelLog:
    """One channel's ids and history: a deque trimmed by length and age, exactly."""

    __slots__ = ("entries", "last_id", "size", "trimmed_id")

    def __init__(self, last_id: MessageId, trimmed_id: MessageId) -> None:
        self.entries: deque[tuple[MessageId, bytes]] = deque()
        self.last_id = last_id
        self.trimmed_id = trimmed_id
        """The largest id trimmed away: an ``after`` below it has lost messages."""
        self.size = CHANNEL_OVERHEAD
        """What this log costs, as the budget counts it."""

    def trim(self, max_length: int, min_ms: int) -> None:
        entries = self.entries
        while entries and (len(entries) > max_length or entries[0][0][0] < min_ms):
            self.drop_oldest()

    def drop_oldest(self) -> None:
        message_id, payload = self.entries.popleft()
        self.trimmed_id = message_id
        self.size -= len(payload) + ENTRY_OVERHEAD


class MemoryBus:
    """Orders each channel by handing out ids and delivering synchronously, as Redis would.

    ``clock`` (Unix seconds) drives both the ids and the ageing of the history, so tests can
    age it without waiting. Every channel's epoch is the bus's: a random token made when the bus
    is (once per process start), since the history lives and dies with the process.
    ``history_bytes`` bounds all channels' history together (see the module docstring).
    """

    name = "memory (one process; pass --redis-url to scale out)"

    def __init__(
        self,
        *,
        history_length: int = HISTORY_LENGTH,
        history_max_age: float = HISTORY_MAX_AGE_SECONDS,
        history_bytes: int = HISTORY_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_length < 1:
            raise ValueError("history_length must be at least 1")
        if history_max_age <= 0:
            raise ValueError("history_max_age must be positive")
        if history_bytes < MIN_HISTORY_BYTES:
            raise ValueError(f"history_bytes must be at least {MIN_HISTORY_BYTES}")
        self._history_length = history_length
        self._max_age_ms = max(1, round(history_max_age * 1000))
        self._budget = history_bytes
        self._clock = clock
        self._deliver: DeliverBatch | None = None
        self._subscribed: set[str] = set()
        # Least recently published first: the order channels are forgotten in.
        self._channels: OrderedDict[str, _ChannelLog] = OrderedDict()
        self._stored = 0
        self._forgot_below = ZERO_ID
        """Above every id of every forgotten channel: a new log's ids start past it, so a
        channel's ids keep increasing across its being forgotten, whatever the clock does."""
        self.forgotten = 0
        """Channels forgotten (history aged out, or evicted for the budget); for metrics."""
        self.evicted = 0
        """Of those, channels evicted for the budget while they still had history."""
        self.epoch = secrets.token_hex(8)
        """The epoch of every channel's history on this bus."""

    @property
    def stored_bytes(self) -> int:
        """What the history costs now as the budget counts it (payloads and overheads)."""
        return self._stored

    @property
    def channel_count(self) -> int:
        """Channels with history held."""
        return len(self._channels)

    async def run(
        self,
        deliver: DeliverBatch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._deliver = deliver
        try:
            task_status.started()
            while True:
                await trio.sleep(SWEEP_INTERVAL_SECONDS)
                self._sweep(self._now_ms() - self._max_age_ms)
        finally:
            self._deliver = None

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _log(self, channel: str) -> _ChannelLog:
        log = self._channels.get(channel)
        if log is None:
            trimmed = ZERO_ID if self.forgotten == 0 else _UNKNOWN
            log = self._channels[channel] = _ChannelLog((self._forgot_below[0], -1), trimmed)
            self._stored += log.size
        else:
            self._channels.move_to_end(channel)
        return log

    def _forget(self, channel: str, *, evicted: bool = False) -> None:
        log = self._channels.pop(channel)
        self._stored -= log.size
        self._forgot_below = max(self._forgot_below, (log.last_id[0] + 1, 0))
        self.forgotten += 1
        self.evicted += evicted

    def _trim(self, channel: str, log: _ChannelLog, now_ms: int) -> None:
        before = log.size
        log.trim(self._history_length, now_ms - self._max_age_ms)
        self._stored += log.size - before

    def _sweep(self, min_ms: int) -> None:
        """Forget the channels whose newest message aged out. They are the least recently
        published, so they are at the front; stops at the first that still has history."""
        channels = self._channels
        while channels:
            channel, log = next(iter(channels.items()))
            if log.last_id[0] >= min_ms:
                return
            self._forget(channel)

    def _keep_budget(self, channel: str) -> None:
        """Evict the least recently published channels until the budget holds; if ``channel``
        (the newest) alone is past it, trim its oldest messages."""
        channels = self._channels
        while self._stored > self._budget:
            oldest = next(iter(channels))
            if oldest != channel:
                self._forget(oldest, evicted=True)
                continue
            log = channels[channel]
            while self._stored > self._budget and log.entries:
                before = log.size
                log.drop_oldest()
                self._stored += log.size - before
            return

    def _next_id(self, log: _ChannelLog, now_ms: int) -> MessageId:
        """Stream-style ``ms-seq`` ids that increase even if the clock steps back."""
        last_ms, last_seq = log.last_id
        log.last_id = (now_ms, 0) if now_ms > last_ms else (last_ms, last_seq + 1)
        return log.last_id

    async def publish_message(self, channel: str, body: bytes) -> str:
        await trio.lowlevel.checkpoint()
        now_ms = self._now_ms()
        self._sweep(now_ms - self._max_age_ms)
        log = self._log(channel)
        message_id = self._next_id(log, now_ms)
        payload = message_payload(format_id(message_id), body, self.epoch)
        log.entries.append((message_id, payload))
        log.size += len(payload) + ENTRY_OVERHEAD
        self._stored += len(payload) + ENTRY_OVERHEAD
        self._trim(channel, log, now_ms)
        self._keep_budget(channel)
        self._hand_over(channel, payload)
        return format_id(message_id)

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._hand_over(channel, payload)

    async def probe(self, channel: str, payload: bytes) -> None:
        """See base.py: nothing here can refuse a write (the budget evicts instead)."""
        await self.publish_event(channel, payload)

    def probe_channels(self, base: str) -> list[str]:
        return [base]

    @property
    def refused_writes(self) -> int:
        return 0

    def _hand_over(self, channel: str, payload: bytes) -> None:
        if self._deliver is not None and channel in self._subscribed:
            self._deliver([Delivery(channel, payload)])

    async def history(
        self,
        channel: str,
        *,
        after: str | None = None,
        last: int = 0,
        limit: int = RECOVERY_LIMIT,
        epoch: str | None = None,
    ) -> History:
        """See base.py. A reset answer (``epoch`` from another process) is complete when this
        process trimmed nothing of the channel: it then holds everything published since. A
        channel that was forgotten (aged out, or evicted for the budget) vouches for nothing
        from before: resuming into it reads ``complete: false``."""
        after_id = None if after is None else parse_message_id(after)
        if last < 0 or limit < 1:
            raise ValueError("last must be at least 0 and limit at least 1")
        await trio.lowlevel.checkpoint()
        reset = bool(epoch) and epoch != self.epoch
        if reset and after_id is not None:
            after_id = ZERO_ID
        log = self._channels.get(channel)
        if log is not None:
            self._trim(channel, log, self._now_ms())
            if not log.entries:
                self._forget(channel)
                log = None
        if log is None:
            # Nothing here can vouch for an id from before (another process, a restart, a
            # forgotten history), nor for "from the start" once anything was forgotten.
            complete = after_id is None or (after_id == ZERO_ID and self.forgotten == 0)
            return History([], complete, self.epoch, reset)
        newest_first: list[bytes] = []
        if after_id is None:
            wanted = min(last, limit + 1)  # one more tells whether the limit cut anything
            for _, payload in reversed(log.entries):
                if len(newest_first) == wanted:
                    break
                newest_first.append(payload)
            complete = True
        else:
            for message_id, payload in reversed(log.entries):
                if message_id <= after_id or len(newest_first) > limit:
                    break
                newest_first.append(payload)
            # Complete only if the log reaches back to ``after``: it still holds an entry at or
            # before it, or ``after`` is exactly the last one trimmed (as RedisBus decides).
            reaches_back = bool(log.entries) and log.entries[0][0] <= after_id
            complete = reaches_back or log.trimmed_id == after_id
        if len(newest_first) > limit:
            del newest_first[limit:]
            complete = False
        newest_first.reverse()
        return History(newest_first, complete, self.epoch, reset)

    async def subscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint()
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint()
        self._subscribed.discard(channel)

    @property
    def ready(self) -> bool:
        return self._deliver is not None
