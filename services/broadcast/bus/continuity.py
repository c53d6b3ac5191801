"""Gapless delivery for a subscriber that loses its connection (RedisBus), sans-IO.

Redis pub/sub is at-most-once: what is published while a subscriber reconnects never reaches
it. But every message is also in its channel's stream, under its id, so a subscriber that
remembers the last id it delivered per channel can read what it missed from the history.

- While live, ``admit`` remembers each message's id, sliced from the payload prefix (no JSON
  parsing, not even of the id: Redis delivers a channel in id order, so a live message can only
  be a duplicate of one a refill delivered). For a while after a refill, until a live message
  passes the refilled ones, ids are compared and duplicates dropped.
- After a reconnect, ``begin`` marks each channel with a known id as *filling*: its live
  payloads are held (within one byte budget for all channels) instead of delivered. The bus
  reads the history after the last id and calls ``finish``, which returns the batch to deliver:
  a gap notice if the history could not vouch for everything missed, the missed messages, then
  what was held, minus what the history already had. The channel is then live again.
- A hold that outgrows the budget is dropped, and the highest id dropped is kept: if the
  history did not reach it, the bus reads again from where it got to.

Notices without an id (join, leave, probes) pass through at most once, held in order with
their channel's messages during a fill and dropped only with an overflowing hold.

Ids compare only within an epoch (docs/reliability.md, "Epochs"). Each message payload carries
its channel's epoch right after the id; the epoch of the last delivered message is remembered
with its id. A refill asks for the history of that epoch: when the channel's epoch changed
meanwhile (Redis lost the stream: restarted empty, a failover before replication), the read is
a *reset*: the whole current history, delivered from its start, whatever the ids look like.
After a refill, live payloads are compared with the refilled ids only within the same epoch,
so a message of a new epoch is never dropped as "already seen", even when Redis's clock went
back and its id is below every id delivered before.
"""

from __future__ import annotations

from collections.abc import Iterable

from broadcast.bus.base import Delivery
from broadcast.protocol.ids import (
    MESSAGE_PREFIX,
    ZERO_ID,
    MessageId,
    epoch_after_id,
    format_id,
    gap_payload,
    parse_message_id,
    payload_epoch,
    payload_message_id,
)

_ID_START = len(MESSAGE_PREFIX)
_ID_END = _ID_START + 42  # two 20-digit numbers and a dash

# Held live payloads across all channels being filled. A fill takes one round trip, so this is
# seconds of a busy gateway's traffic (~40,000 typical messages); past it the bus reads the
# history again instead of using more memory.
HOLD_LIMIT_BYTES = 8 << 20


class Fill:
    """One channel being refilled after a reconnect."""

    __slots__ = ("after", "channel", "dropped_max", "epoch", "held", "held_bytes", "overflowed")

    def __init__(self, channel: str, after: MessageId, epoch: bytes | None = None) -> None:
        self.channel = channel
        self.after = after
        """Read the history after this id (the last delivered, then where the last read got)."""
        self.epoch = epoch
        """The epoch ``after`` belongs to; None: unknown (compare ids as they are)."""
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.overflowed = False
        self.dropped_max = ZERO_ID
        """The highest message id dropped since the hold overflowed."""


class Continuity:
    """Per-channel last delivered ids, and the fills of one reconnect; see the module doc."""

    def __init__(self, hold_limit_bytes: int = HOLD_LIMIT_BYTES) -> None:
        self._last: dict[str, bytes] = {}  # the last delivered id per channel, as sent
        self._epochs: dict[str, bytes] = {}  # the epoch of that id, where known
        # After a refill: live ids of the same epoch must pass these.
        self._checking: dict[str, tuple[bytes | None, MessageId]] = {}
        self._fills: dict[str, Fill] = {}
        self._hold_limit = hold_limit_bytes
        self._held_bytes = 0
        # Counters, for logs, metrics and tests.
        self.duplicates = 0
        self.refilled = 0
        self.gaps = 0
        self.resets = 0
        """Refills that found their channel in a new epoch (its history restarted)."""

    @property
    def filling(self) -> frozenset[str]:
        return frozenset(self._fills)

    def last(self, channel: str) -> MessageId | None:
        """The last id delivered (or the baseline) for ``channel``; None if not known."""
        raw = self._last.get(channel)
        if raw is None:
            return None
        try:
            return parse_message_id(raw)
        except ValueError:  # sliced, unchecked, from a payload someone else published
            return None

    def epoch(self, channel: str) -> bytes | None:
        """The epoch of ``last(channel)``; None if not known."""
        return self._epochs.get(channel)

    def _set_last(self, channel: str, message_id: MessageId, epoch: bytes | None) -> None:
        self._last[channel] = format_id(message_id).encode()
        if epoch is None:
            self._epochs.pop(channel, None)
        else:
            self._epochs[channel] = epoch

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def track(self, channel: str, baseline: MessageId | None, epoch: bytes | None = None) -> None:
        """A channel is subscribed; ``baseline`` is its stream's newest id, read while
        subscribing, and ``epoch`` the channel's epoch then: where a reconnect refills from if
        no message was delivered yet (None: unknown, then tracking starts with the first message
        delivered). A message delivered already wins: its id says exactly where delivery got
        to."""
        if baseline is not None and channel not in self._last:
            self._set_last(channel, baseline, epoch)

    def forget(self, channel: str) -> None:
        """The channel is unsubscribed: nothing more is delivered or refilled for it."""
        self._last.pop(channel, None)
        self._epochs.pop(channel, None)
        self._checking.pop(channel, None)
        fill = self._fills.pop(channel, None)
        if fill is not None:
            self._release(fill)

    def admit(self, channel: str, payload: bytes) -> bool:
        """Whether to deliver a live payload of a subscribed channel now (the hot path)."""
        if self._fills:
            fill = self._fills.get(channel)
            if fill is not None:
                self._hold(fill, payload)
                return False
        if not payload.startswith(MESSAGE_PREFIX):
            return True  # a notice
        end = payload.find(b'"', _ID_START, _ID_END)
        if end < 0:
            return True  # malformed: passed on, the gateway drops it
        epoch = epoch_after_id(payload, end)
        if self._checking:
            check = self._checking.get(channel)
            if check is not None:
                floor_epoch, floor = check
                # Another epoch than the refill's is a new history: nothing in it was delivered.
                if epoch is None or epoch == floor_epoch:
                    message_id = payload_message_id(payload)
                    if message_id is None:
                        return True
                    if message_id <= floor:
                        self.duplicates += 1
                        return False
                del self._checking[channel]  # past the refill: ids only increase from here
        self._last[channel] = payload[_ID_START:end]
        if epoch is not None:
            self._epochs[channel] = epoch
        return True

    def begin(self, channels: Iterable[str]) -> list[Fill]:
        """A new connection is subscribing ``channels``: hold their live payloads from now on.
        Fills left by a lost connection start over (their holds are gone with it)."""
        self.abandon()
        for channel in channels:
            after = self.last(channel)
            if after is not None:
                self._checking.pop(channel, None)  # the fill's own end sets it again
                self._fills[channel] = Fill(channel, after, self._epochs.get(channel))
        return list(self._fills.values())

    def begin_one(self, channel: str) -> Fill | None:
        """Hold ``channel``'s live payloads for a refill of its own (it moved here from another
        connection), leaving other fills alone; None when its last id is not known."""
        after = self.last(channel)
        if after is None or channel in self._fills:
            return None
        self._checking.pop(channel, None)
        fill = self._fills[channel] = Fill(channel, after, self._epochs.get(channel))
        return fill

    def filling_with(self, fill: Fill) -> bool:
        """Whether ``fill`` is still wanted (not abandoned with its connection, not forgotten)."""
        return self._fills.get(fill.channel) is fill

    def abandon(self) -> None:
        """The connection was lost: drop the holds; the next ``begin`` refills from ``last``."""
        for fill in self._fills.values():
            self._release(fill)
        self._fills.clear()

    def finish(
        self,
        fill: Fill,
        messages: list[bytes],
        *,
        gap: bool,
        final: bool = True,
        reset: bool = False,
        epoch: bytes | None = None,
    ) -> tuple[list[Delivery], bool]:
        """Apply one history read (``messages`` oldest first; ``gap``: it cannot vouch for all
        that was missed). Returns the batch to deliver and whether the fill is done; when it is
        not, read again after ``fill.after``. ``final``: no further read will be made.

        ``reset``: the channel's epoch is no longer ``fill.epoch``; ``messages`` are then the
        whole history of ``epoch`` (None: the channel has no epoch yet), delivered from its
        start. Without ``reset``, ``epoch`` is ignored: the read was of ``fill.epoch``."""
        channel = fill.channel
        if self._fills.get(channel) is not fill:
            return [], True  # unsubscribed, or the connection was lost, meanwhile
        batch: list[Delivery] = []
        if gap:
            batch.append(Delivery(channel, gap_payload(channel)))
            self.gaps += 1
        if reset:
            self.resets += 1
            fill.after, fill.epoch = ZERO_ID, epoch
        last = fill.after
        for payload in messages:
            message_id = payload_message_id(payload)
            if message_id is not None and message_id > last:
                batch.append(Delivery(channel, payload))
                last = message_id
                self.refilled += 1
        fill.after = last
        # So that a connection lost before the next read resumes here.
        self._set_last(channel, last, fill.epoch)
        if fill.overflowed:
            if fill.dropped_max > last:
                if not final:
                    fill.overflowed, fill.dropped_max = False, ZERO_ID
                    return batch, False  # live messages were dropped: read up to them
                if not gap:
                    batch.append(Delivery(channel, gap_payload(channel)))
                    self.gaps += 1
        else:
            for payload in fill.held:
                message_id = payload_message_id(payload)
                if message_id is None:
                    batch.append(Delivery(channel, payload))
                    continue
                held_epoch = payload_epoch(payload)
                if message_id > last or (held_epoch is not None and held_epoch != fill.epoch):
                    batch.append(Delivery(channel, payload))
                    last = message_id
                    if held_epoch is not None:
                        fill.epoch = held_epoch  # a newer epoch began after the read
                else:
                    self.duplicates += 1
        self._set_last(channel, last, fill.epoch)
        # Live copies of refilled messages may still be on their way on the subscription.
        self._checking[channel] = (fill.epoch, last)
        self._release(fill)
        del self._fills[channel]
        return batch, True

    def _hold(self, fill: Fill, payload: bytes) -> None:
        if not fill.overflowed:
            if self._held_bytes + len(payload) <= self._hold_limit:
                fill.held.append(payload)
                fill.held_bytes += len(payload)
                self._held_bytes += len(payload)
                return
            fill.overflowed = True
            for held in fill.held:
                self._note_dropped(fill, held)
            self._release(fill)
        self._note_dropped(fill, payload)

    @staticmethod
    def _note_dropped(fill: Fill, payload: bytes) -> None:
        message_id = payload_message_id(payload)
        if message_id is not None and message_id > fill.dropped_max:
            fill.dropped_max = message_id

    def _release(self, fill: Fill) -> None:
        self._held_bytes -= fill.held_bytes
        fill.held = []
        fill.held_bytes = 0
