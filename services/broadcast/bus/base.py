"""The contract every bus keeps, so the gateway never knows which one it runs on."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import trio


class Delivery(NamedTuple):
    """One payload that came back from the bus for a channel, exactly as published."""

    channel: str
    payload: bytes


DeliverBatch = Callable[[list[Delivery]], None]
"""Called with each batch in bus order. Must not block: it only queues bytes for clients."""


class BusUnavailable(Exception):
    """The bus cannot take a publish right now (Redis down, or no answer in time)."""


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

    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel``; returns once payloads published after it will arrive."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``."""
        ...

    @property
    def ready(self) -> bool:
        """True while publishing and the subscription both work."""
        ...
