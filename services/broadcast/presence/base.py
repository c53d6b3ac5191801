"""The contract every presence store keeps, so the gateway never knows which one it runs on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

OnExpired = Callable[[str, str, str], None]
"""``(channel, key, name)``: an entry another gateway left behind expired (that gateway died).

Called at most once per entry across the whole cluster, so the gateway can publish one leave
notice for it. Synchronous and must not block: it runs in the store's refresh loop.
"""


class PresenceStore(Protocol):
    """Who is in which channel, cluster-wide: one entry per client connection in a channel.

    ``key`` is ``"<node>/<conn>"``, unique per client connection, so two clients with the same
    display name are two entries; ``members`` lists each name once.
    """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: keep the store's connection, refresh this gateway's own entries and
        sweep expired ones. Calls ``task_status.started()`` promptly, even when Redis is down."""
        ...

    async def enter(self, channel: str, key: str, name: str) -> None:
        """``key`` is present in ``channel`` as ``name`` (again ``enter`` with a new name renames).

        Never raises for an unreachable store: the entry is remembered and written later.
        """
        ...

    async def leave(self, channel: str, key: str) -> None:
        """``key`` left ``channel``. Never raises for an unreachable store."""
        ...

    async def members(self, channel: str) -> list[str]:
        """The display names present in ``channel`` on every gateway, sorted, each once.

        Raises ``broadcast.bus.base.BusUnavailable`` when the store cannot answer.
        """
        ...

    async def channels(self) -> dict[str, int]:
        """Every channel with someone present, on every gateway, and how many distinct names
        are in it (the server API's ``/api/channels``). Raises ``BusUnavailable`` as ``members``.
        """
        ...
