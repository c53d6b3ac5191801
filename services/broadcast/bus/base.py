"""The contract every bus keeps, so the gateway never knows which one it runs on."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import trio

from broadcast.protocol.limits import RECOVERY_LIMIT
from broadcast.redis.errors import StorageFull, Unavailable


class Delivery(NamedTuple):
    """One payload that came back from the bus for a channel, exactly as published."""

    channel: str
    payload: bytes


DeliverBatch = Callable[[list[Delivery]], None]
"""Called with each batch in bus order. Must not block: it only queues bytes for clients."""


BusUnavailable = Unavailable
"""The bus (or presence) cannot take a publish or answer a read right now (Redis down, or no
answer in time). One class with ``broadcast.redis.errors.Unavailable``. Its subclass
``StorageFull`` says the store is out of memory (Redis ``OOM``): nothing was stored."""

__all__ = ["Bus", "BusUnavailable", "DeliverBatch", "Delivery", "History", "StorageFull"]


class History(NamedTuple):
    """The answer to a history read."""

    messages: list[bytes]
    """Complete message payloads (exactly ``envelope.message_payload(id, body)``), oldest first."""
    complete: bool
    """False when a message that belongs in the answer is, or may be, gone: trimmed by length or
    age, cut by ``limit``, or lost with the stream itself (see ``Bus.history``)."""
    epoch: str = ""
    """The channel's current epoch (docs/reliability.md, "Epochs"): ids compare only within one.
    Empty when the channel has none yet (RedisBus: no message since Redis started empty)."""
    reset: bool = False
    """The caller's ``epoch`` is not the current one: the history restarted, and ``messages``
    are the newest of the current epoch from its start, whatever ``after`` said."""


class Bus(Protocol):
    """A totally ordered, per-channel publish/subscribe service shared by all gateways.

    Every payload for a channel reaches every subscribed gateway in one order, the
    publishing gateway included: gateways deliver what comes back, never a local shortcut.
    """

    name: str
    """How the bus describes itself in logs, e.g. ``memory`` or ``redis://127.0.0.1:6379/0``."""

    async def run(
        self,
        deliver: DeliverBatch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the bus connected until cancelled, handing received batches to ``deliver``.

        Calls ``task_status.started()`` once publishing and subscribing are possible.
        """
        ...

    async def publish_message(self, channel: str, body: bytes) -> str:
        """Store and publish a chat message; returns its id (increasing within ``channel``).

        ``body`` is the message JSON without its opening: ``"channel":…,"origin":…}``. The bus
        prepends ``{"type":"message","id":"<id>",`` so the published payload is the client frame.
        Raises BusUnavailable when the message was not accepted.
        """
        ...

    async def publish_event(self, channel: str, payload: bytes) -> None:
        """Publish a complete JSON event (join, leave) that gets no id and no history."""
        ...

    async def probe(self, channel: str, payload: bytes) -> None:
        """Publish ``payload`` as ``publish_event`` does, after a write to the store on the
        channel's shard (RedisBus: a key that expires at once), so that it raises BusUnavailable
        whenever the store refuses writes (Redis at ``maxmemory``) and messages would be refused
        too. The readiness probe's message (gateway/readiness.py)."""
        ...

    def probe_channels(self, base: str) -> list[str]:
        """Channel names made from ``base`` whose probes together cross every connection that
        delivers: ``[base]`` on one Redis or in process; on Redis Cluster one per primary."""
        ...

    @property
    def refused_writes(self) -> int:
        """Messages refused so far because the store is full (Redis ``OOM``): readiness is lost
        while this grows, even when a probe's write happens to get through."""
        ...

    async def history(
        self,
        channel: str,
        *,
        after: str | None = None,
        last: int = 0,
        limit: int = RECOVERY_LIMIT,
        epoch: str | None = None,
    ) -> History:
        """Read the channel's stored messages (what a reconnecting client missed, or a backlog).

        With ``after`` (a message id): the messages with a larger id, oldest first; when there
        are more than ``limit``, the newest ``limit`` of them, incomplete. ``complete`` is True
        only when the bus can vouch that nothing after ``after`` is missing: RedisBus says False
        when it cannot (the stream no longer reaches back to ``after``, or it was lost and
        recreated); MemoryBus knows exactly. Without ``after``: the newest ``last`` messages (at
        most ``limit``), complete unless ``limit`` cut them.

        Ids compare as ``(ms, seq)`` integer pairs, and only within one epoch. ``epoch`` is the
        epoch ``after`` belongs to (from the client; None or empty: not known, ``after`` is taken
        as an id of the current epoch). When it is not the channel's current epoch, the answer
        is a *reset*: ``reset=True`` and, with ``after``, the newest ``limit`` messages of the
        current epoch from its start. A reset answer is ``complete`` only when the bus can vouch
        for the whole current epoch and for nothing lost at the end of the old one: MemoryBus
        says True when nothing was trimmed since its process started; RedisBus always says False
        (the old Redis's tail may have been lost). Without ``after``, ``reset`` only tells that
        the epoch changed; ``last`` and ``complete`` mean what they always do. Every answer
        carries the current ``epoch``.

        A malformed ``after``, a negative ``last`` or a ``limit`` below 1 raises ValueError;
        BusUnavailable when the bus cannot answer.
        """
        ...

    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel``; returns once payloads published after it will arrive.

        Each message of a subscribed channel reaches ``deliver`` at most once, in id order. A bus
        that may lose its subscription (RedisBus) refills what it missed from the history when it
        is back, and where it cannot, delivers a gap notice (``ids.gap_payload``) in its place.
        """
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``."""
        ...

    @property
    def ready(self) -> bool:
        """True while publishing and the subscription both work."""
        ...
