"""An in-process bus: one gateway, nothing to install. Same ids and payloads as RedisBus."""

from __future__ import annotations

import time

import trio

from broadcast.bus.base import DeliverBatch, Delivery
from broadcast.protocol.envelope import message_payload


class MemoryBus:
    """Orders each channel by handing out ids and delivering synchronously, as Redis would."""

    name = "memory (one process; pass --redis-url to scale out)"

    def __init__(self) -> None:
        self._deliver: DeliverBatch | None = None
        self._subscribed: set[str] = set()
        self._last_id: dict[str, tuple[int, int]] = {}

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

    def _next_id(self, channel: str) -> str:
        """Stream-style ``ms-seq`` ids that increase even if the wall clock steps back."""
        now_ms = time.time_ns() // 1_000_000
        last_ms, last_seq = self._last_id.get(channel, (0, -1))
        new = (now_ms, 0) if now_ms > last_ms else (last_ms, last_seq + 1)
        self._last_id[channel] = new
        return f"{new[0]}-{new[1]}"

    async def publish_message(self, channel: str, body: bytes) -> str:
        await trio.lowlevel.checkpoint()
        message_id = self._next_id(channel)
        self._hand_over(channel, message_payload(message_id, body))
        return message_id

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._hand_over(channel, payload)

    def _hand_over(self, channel: str, payload: bytes) -> None:
        if self._deliver is not None and channel in self._subscribed:
            self._deliver([Delivery(channel, payload)])

    async def subscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint()
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint()
        self._subscribed.discard(channel)

    @property
    def ready(self) -> bool:
        return self._deliver is not None
