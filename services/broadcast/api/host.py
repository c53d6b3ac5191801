"""What the server API needs from the gateway it runs in; the Gateway satisfies it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from broadcast.bus.base import Bus
from broadcast.presence.base import PresenceStore


class ChannelWatcher(Protocol):
    """The part of ``broadcast.gateway.hub.ChannelHub`` the API uses."""

    def watch(self, channel: str, callback: Callable[[bytes], None]) -> None:
        """Hand every payload of ``channel`` (one no client can join) to ``callback``."""
        ...


class ApiHost(Protocol):
    """The gateway, as the server API sees it.

    - ``node_id``: this gateway's name in the cluster (``--node-id``).
    - ``bus``: publishes go through it like a client's (one order, history, recovery); the API
      also uses ``publish_event``/``subscribe`` on its control channel ``api:control``, a name
      no client can join (``check_channel`` refuses ``:``).
    - ``presence``: ``members(channel)`` and ``channels()`` (every channel with members,
      cluster-wide, and how many distinct names each has).
    - ``hub``: ``watch(channel, callback)`` delivers the control channel's payloads.
    - ``connection_count()``: client connections open on this gateway now.
    - ``disconnect_local(name, code, reason)``: close this gateway's client sessions whose
      display name is ``name`` with WebSocket close ``code`` (line clients get ``! reason``
      and are closed), and return how many were closed. Synchronous: it only starts the closes.
    """

    node_id: str
    bus: Bus
    presence: PresenceStore

    @property
    def hub(self) -> ChannelWatcher: ...

    def connection_count(self) -> int: ...

    def disconnect_local(self, name: str, code: int, reason: str) -> int: ...
