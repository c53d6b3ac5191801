"""What a session may use of its gateway: a small immutable context instead of the Gateway.

Sessions publish, join and count through this; they never see the accept loop, the drain or
the other sessions, so the gateway's modules import in one direction only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broadcast.bus.base import Bus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.budget import AddressAllowances, ClientBudget
from broadcast.gateway.hub import ChannelHub
from broadcast.gateway.presence_notices import PresenceNotices
from broadcast.gateway.replay import ReplayReads
from broadcast.gateway.stats import GatewayStats
from broadcast.presence import PresenceStore

PublishOnce = Callable[[str | None, str, bytes], Awaitable[str]]
"""``(key, channel, body) -> id``: publish at most once per key within the window."""


@dataclass(frozen=True, slots=True)
class SessionContext:
    bus: Bus
    hub: ChannelHub
    presence: PresenceStore
    notices: PresenceNotices
    """Who came and went, told per channel per interval; member lists shared by many."""
    replays: ReplayReads
    """History reads shared by the clients recovering a channel at once."""
    access: AccessPolicy
    stats: GatewayStats
    node_id: str
    default_channel: str
    idle_timeout: float
    """A WebSocket client is pinged after a third of it and closed after all of it."""
    line_idle_timeout: float
    """A line client (which cannot answer pings) is asked to speak, then closed, after it."""
    clock: Callable[[], float]
    address_allowances: AddressAllowances | None = None
    publish_once: PublishOnce | None = None
    """The server API's idempotent publish (its key store, in Redis with a cluster), for a
    ``publish`` with an ``idempotency_key``; None: such keys are ignored."""

    def budget(self, address: str) -> ClientBudget:
        shared = None if self.address_allowances is None else self.address_allowances.get(address)
        return ClientBudget(self.access.rates, self.clock, shared)
