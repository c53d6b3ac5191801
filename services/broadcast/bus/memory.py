"""An in-process bus: one gateway, nothing to install. Same ids, payloads and history as
RedisBus, except that its history is trimmed exactly and never lost, so it always knows
whether an answer is complete."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable

import trio

from broadcast.bus.base import DeliverBatch, Delivery, History
from broadcast.protocol.envelope import message_payload
from broadcast.protocol.ids import ZERO_ID, MessageId, format_id, parse_message_id
from broadcast.protocol.limits import HISTORY_LENGTH, HISTORY_MAX_AGE_SECONDS, RECOVERY_LIMIT


class _ChannelLog:
    """One channel's ids and history: a deque trimmed by length and age, exactly."""

    __slots__ = ("entries", "last_id", "trimmed_id")

    def __init__(self) -> None:
        self.entries: deque[tuple[MessageId, bytes]] = deque()
        self.last_id: MessageId = (0, -1)
        self.trimmed_id = ZERO_ID
        """The largest id trimmed away: an ``after`` below it has lost messages."""

    def trim(self, max_length: int, min_ms: int) -> None:
        entries = self.entries
        while entries and (len(entries) > max_length or entries[0][0][0] < min_ms):
            self.trimmed_id = entries.popleft()[0]


class MemoryBus:
    """Orders each channel by handing out ids and delivering synchronously, as Redis would.

    ``clock`` (Unix seconds) drives both the ids and the ageing of the history, so tests can
    age it without waiting. Every channel's epoch is the bus's: a random token made when the bus
    is (once per process start), since the history lives and dies with the process. A channel's
    log is kept once used (a few hundred bytes once its history has aged out): this bus serves
    one process and its channels, not a cluster.
    """

    name = "memory (one process; pass --redis-url to scale out)"

    def __init__(
        self,
        *,
        history_length: int = HISTORY_LENGTH,
        history_max_age: float = HISTORY_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_length < 1:
            raise ValueError("history_length must be at least 1")
        if history_max_age <= 0:
            raise ValueError("history_max_age must be positive")
        self._history_length = history_length
        self._max_age_ms = max(1, round(history_max_age * 1000))
        self._clock = clock
        self._deliver: DeliverBatch | None = None
        self._subscribed: set[str] = set()
        self._channels: dict[str, _ChannelLog] = {}
        self.epoch = secrets.token_hex(8)
        """The epoch of every channel's history on this bus."""

    async def run(
        self,
        deliver: DeliverBatch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._deliver = deliver
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._deliver = None

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _log(self, channel: str) -> _ChannelLog:
        log = self._channels.get(channel)
        if log is None:
            log = self._channels[channel] = _ChannelLog()
        return log

    def _next_id(self, log: _ChannelLog, now_ms: int) -> MessageId:
        """Stream-style ``ms-seq`` ids that increase even if the clock steps back."""
        last_ms, last_seq = log.last_id
        log.last_id = (now_ms, 0) if now_ms > last_ms else (last_ms, last_seq + 1)
        return log.last_id

    async def publish_message(self, channel: str, body: bytes) -> str:
        await trio.lowlevel.checkpoint()
        log = self._log(channel)
        now_ms = self._now_ms()
        message_id = self._next_id(log, now_ms)
        payload = message_payload(format_id(message_id), body, self.epoch)
        log.entries.append((message_id, payload))
        log.trim(self._history_length, now_ms - self._max_age_ms)
        self._hand_over(channel, payload)
        return format_id(message_id)

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._hand_over(channel, payload)

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
        process trimmed nothing of the channel: it then holds everything published since."""
        after_id = None if after is None else parse_message_id(after)
        if last < 0 or limit < 1:
            raise ValueError("last must be at least 0 and limit at least 1")
        await trio.lowlevel.checkpoint()
        reset = bool(epoch) and epoch != self.epoch
        if reset and after_id is not None:
            after_id = ZERO_ID
        log = self._channels.get(channel)
        if log is None:
            # Nothing here can vouch for an id from before (another process, a restart).
            complete = after_id is None or after_id == ZERO_ID
            return History([], complete, self.epoch, reset)
        log.trim(self._history_length, self._now_ms() - self._max_age_ms)
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
