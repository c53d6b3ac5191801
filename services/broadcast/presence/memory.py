"""MemoryPresence: one process, no Redis; nobody else can die and leave entries behind."""

from __future__ import annotations

import trio


class MemoryPresence:
    """The PresenceStore of base.py in two dicts; ``members`` is immediate, nothing expires."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, str]] = {}  # channel -> key -> name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def enter(self, channel: str, key: str, name: str) -> None:
        await trio.lowlevel.checkpoint()
        self._channels.setdefault(channel, {})[key] = name

    async def leave(self, channel: str, key: str) -> None:
        await trio.lowlevel.checkpoint()
        present = self._channels.get(channel)
        if present is not None:
            present.pop(key, None)
            if not present:  # an empty channel costs nothing
                del self._channels[channel]

    async def members(self, channel: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(set(self._channels.get(channel, {}).values()))

    async def channels(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return {channel: len(set(keys.values())) for channel, keys in self._channels.items()}
