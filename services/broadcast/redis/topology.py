"""Where the Redis primary is, for every connection the bus and presence open.

``Standalone`` (``redis://``, ``rediss://``) always connects to one address; ``Sentinel``
(``redis+sentinel://``, sentinel.py) asks Sentinel, and closes every connection it opened when
the primary moves: their users then fail their current call, reconnect through ``connect`` and
reach the new primary.
"""

from __future__ import annotations

import ssl
from typing import Protocol

import trio

from broadcast.redis.resp import RedisAddress, RedisConnection, open_connection, parse_url
from broadcast.redis.sentinel import SCHEME, Sentinel, parse_sentinel_url


class Topology(Protocol):
    name: str
    """The URL for logs, password redacted."""
    moved: trio.Event
    """Set (and replaced) when the primary moves: reconnect loops then retry at once."""

    def describe(self) -> str:
        """The Redis connections go to now, for logs (redacted)."""
        ...

    async def connect(self, client_name: str) -> RedisConnection:
        """A new connection to the primary, set up (AUTH, SELECT, CLIENT SETNAME)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the primary until cancelled (nothing to follow for one address)."""
        ...


class Standalone:
    """One Redis at one address."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        command_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.name = address.redacted()
        self.moved = trio.Event()  # never set: one address does not move
        self._command_timeout = command_timeout
        self._ssl_context = ssl_context

    def describe(self) -> str:
        return self.name

    async def connect(self, client_name: str) -> RedisConnection:
        return await open_connection(
            self.address,
            command_timeout=self._command_timeout,
            client_name=client_name,
            ssl_context=self._ssl_context,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


def topology_for(
    url: str, *, command_timeout: float, ssl_context: ssl.SSLContext | None = None
) -> Topology:
    """The topology a ``--redis-url`` names: ``redis://``/``rediss://`` (resp.parse_url) or
    ``redis+sentinel://`` (sentinel.py); ValueError (never quoting the URL) for anything else."""
    if url.startswith(SCHEME + "://"):
        config = parse_sentinel_url(url)
        return Sentinel(config, command_timeout=command_timeout, ssl_context=ssl_context)
    return Standalone(parse_url(url), command_timeout=command_timeout, ssl_context=ssl_context)
