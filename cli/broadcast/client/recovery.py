"""Recovering what was missed while disconnected, and never showing a message twice.

Every chat message has an id that increases within its channel (docs/protocol.md). The client
remembers the newest id it has seen, its own acked messages included, and reconnects with
``since=<that id>``; the gateway replays what came after it, then sends ``recovered``. A message
may still arrive twice (after a ``hello`` with ``since``, or from a sloppy server), so recent ids
are kept and a repeat is dropped.

Only recent ids are kept: a replay starts right after the newest id we saw, so a duplicate can
only be one of the last messages, and a long-running client must not grow without bound.

Ids compare only within one history, which the gateway names by its ``epoch`` (on every message).
A message of another epoch means the history restarted (a gateway or Redis came back empty): the
ids seen so far say nothing about the new ones, so they are forgotten, and the epoch of the last
message seen goes back to the gateway with ``since``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broadcast.protocol.ids import parse_message_id

if TYPE_CHECKING:
    from broadcast.client.connection import Frame

# Ids remembered for spotting repeats: far more than a replay overlaps by in practice.
REMEMBERED_IDS = 2000

MessageId = tuple[int, int]


def message_id(value: object) -> MessageId | None:
    """``"1732435200123-0"`` as ``(1732435200123, 0)``; None for anything else (a bad server)."""
    if not isinstance(value, str):
        return None
    try:
        return parse_message_id(value)
    except ValueError:
        return None


class SeenMessages:
    """The ids of the last ``capacity`` messages seen, and the newest of all.

    A deque remembers the order ids arrived in, so the oldest is forgotten first; a set beside
    it answers "seen?" in constant time. Both hold at most ``capacity`` ids.
    """

    def __init__(self, capacity: int = REMEMBERED_IDS) -> None:
        self._capacity = capacity
        self._order: deque[MessageId] = deque()
        self._ids: set[MessageId] = set()
        self._newest: MessageId | None = None
        self.newest_text: str | None = None
        """The newest id seen, as the server wrote it: where to resume after a reconnect."""
        self.epoch: str | None = None
        """The epoch of the messages seen (None from a gateway that does not say)."""

    def __len__(self) -> int:
        return len(self._ids)

    def admit(self, frame: Frame) -> bool:
        """Note the id a frame carries; False for a ``message`` already seen, to be dropped.

        An ``ack`` carries the id of our own message, which the server does not send back to
        us live: noting it keeps a replay from showing our own line a second time.
        """
        if frame.kind not in ("message", "ack"):
            return True
        epoch = frame.event.get("epoch")
        if isinstance(epoch, str) and epoch and epoch != self.epoch:
            if self.epoch is not None:  # a new history: its ids start afresh
                self._order.clear()
                self._ids.clear()
                self._newest = self.newest_text = None
            self.epoch = epoch
        raw = frame.event.get("id")
        key = message_id(raw)
        if key is None:  # no usable id: show it, but it cannot be deduplicated or resumed from
            return True
        if key in self._ids:
            return frame.kind != "message"
        self._remember(key)
        if self._newest is None or key > self._newest:
            self._newest = key
            self.newest_text = str(raw)  # a str: message_id parsed it
        return True

    def resume_from(self, message_id: str, epoch: str | None = None) -> None:
        """Start as if ``message_id`` of ``epoch`` were the newest message seen: a client
        that kept its place (in a file, say) resumes there instead of asking for history."""
        key = parse_message_id(message_id)  # ValueError for anything but an id
        self._remember(key)
        self._newest, self.newest_text, self.epoch = key, message_id, epoch

    def _remember(self, key: MessageId) -> None:
        if len(self._order) >= self._capacity:
            self._ids.discard(self._order.popleft())
        self._order.append(key)
        self._ids.add(key)


@dataclass(slots=True)
class Replay:
    """The replay a connection asked for: messages after ``since``, or the last ``history``.

    The Link counts in ``shown`` the replayed messages it let through (not those seen before),
    so the ``recovered`` event that ends the replay can be told as what the person got.
    """

    since: str | None
    history: int = 0
    shown: int = 0
    over: bool = False  # ``recovered`` arrived: what follows is live

    @property
    def resumed(self) -> bool:
        """A recovery after a reconnect, not a first look at the history."""
        return self.since is not None

    def note(self, frame: Frame) -> None:
        """Count a new message of the replay, until the ``recovered`` event that ends it."""
        if self.over:
            return
        if frame.kind == "message":
            self.shown += 1
        elif frame.kind == "recovered":
            self.over = True
