"""RedisBus: the cluster bus, on two raw RESP connections, one to publish and one to subscribe.

- ``RedisPublisher`` (redis_publisher.py): publishes and history reads, pipelined on one
  connection through one Lua script per message (stream append, epoch, publish).
- ``RedisSubscriber`` (redis_subscriber.py): the SUBSCRIBE connection, and gapless delivery
  across its reconnects (continuity.py).
- Where Redis is, and how connections are kept up, is ``broadcast.redis``: a topology
  (one address, or Sentinel) and the reconnect loop shared with presence.

Startup: ``run()`` reports started once both connections have made their first attempt. With
Redis up, ``ready`` is then True; with Redis down it is False, publishes fail fast with
BusUnavailable, and both connections keep retrying in the background (``wait_ready`` waits).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio

from broadcast.bus.base import DeliverBatch, History
from broadcast.bus.redis_publisher import RedisPublisher
from broadcast.bus.redis_subscriber import PING_INTERVAL, RedisSubscriber
from broadcast.protocol.ids import ZERO_ID, format_id, parse_message_id
from broadcast.protocol.limits import HISTORY_LENGTH, HISTORY_MAX_AGE_SECONDS, RECOVERY_LIMIT
from broadcast.redis.cluster import SCHEME as CLUSTER_SCHEME
from broadcast.redis.supervise import Session, keep_connected
from broadcast.redis.topology import topology_for

log = logging.getLogger("broadcast.bus.redis")


class RedisBus:
    """The Bus of base.py on Redis; see the module docstring for the design.

    ``RedisBus("redis+cluster://…")`` makes a RedisClusterBus (redis_cluster_bus.py) instead,
    which keeps the same interface, so callers need not know which Redis they were given."""

    def __new__(cls, url: str, **options: Any) -> Any:
        if url.startswith(CLUSTER_SCHEME + "://"):
            from broadcast.bus.redis_cluster_bus import RedisClusterBus

            return RedisClusterBus(url, **options)
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        *,
        history_length: int = HISTORY_LENGTH,
        history_max_age: float = HISTORY_MAX_AGE_SECONDS,
        command_timeout: float = 5.0,
        ping_interval: float = PING_INTERVAL,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if history_length < 1:
            raise ValueError("history_length must be at least 1")
        if history_max_age <= 0:
            raise ValueError("history_max_age must be positive")
        self._topology = topology_for(url, command_timeout=command_timeout, ssl_context=ssl_context)
        self.name = self._topology.name
        self._changed = trio.Event()
        self._publisher = RedisPublisher(
            self._topology,
            history_length=history_length,
            history_max_age=history_max_age,
            command_timeout=command_timeout,
            ping_interval=ping_interval,
            on_change=self._state_changed,
        )
        self._subscriber = RedisSubscriber(
            self._topology,
            self._publisher,
            command_timeout=command_timeout,
            ping_interval=ping_interval,
            on_change=self._state_changed,
        )
        self._running = False

        self.reconnects = 0
        """Connections (publisher or subscriber) re-established after a loss; for metrics."""

    # -- the Bus protocol ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._publisher.status.up and self._subscriber.status.up

    @property
    def channels(self) -> frozenset[str]:
        """The channels this bus subscribes to (and resubscribes after a reconnect)."""
        return self._subscriber.channels

    async def run(
        self,
        deliver: DeliverBatch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._running:
            raise RuntimeError("this RedisBus is already running")
        self._running = True
        self._subscriber.deliver = deliver
        try:
            async with trio.open_nursery() as nursery:
                self._subscriber.nursery = nursery
                await nursery.start(self._topology.run)
                publisher_tried, subscriber_tried = trio.Event(), trio.Event()
                for role, session, tried in (
                    ("publisher", self._publisher.session, publisher_tried),
                    ("subscriber", self._subscriber.session, subscriber_tried),
                ):
                    nursery.start_soon(self._keep_connected, role, session, tried)
                await publisher_tried.wait()
                await subscriber_tried.wait()
                task_status.started()
        finally:
            self._running = False
            self._subscriber.deliver = None
            self._subscriber.nursery = None

    async def _keep_connected(self, role: str, session: Session, tried: trio.Event) -> None:
        def reconnected() -> None:
            self.reconnects += 1

        await keep_connected(
            role,
            self._topology.describe,
            session,
            log=log,
            tried=tried.set,
            reconnected=reconnected,
            wake=lambda: self._topology.moved,
        )

    async def publish_message(self, channel: str, body: bytes) -> str:
        return await self._publisher.publish_message(channel, body)

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await self._publisher.publish_event(channel, payload)

    async def probe(self, channel: str, payload: bytes) -> None:
        await self._publisher.probe(channel, payload)

    def probe_channels(self, base: str) -> list[str]:
        return [base]  # one subscriber connection: one probe crosses it

    @property
    def refused_writes(self) -> int:
        return self._publisher.refused_writes

    async def history(
        self,
        channel: str,
        *,
        after: str | None = None,
        last: int = 0,
        limit: int = RECOVERY_LIMIT,
        epoch: str | None = None,
    ) -> History:
        """See base.py; completeness is decided as redis_history.py explains (conservative:
        a stream that cannot vouch for ``after`` answers incomplete, and so does every reset:
        what the lost stream held past ``after`` cannot be known). One script call, which
        also reads the epoch, even for ``last=0``."""
        after_id = None if after is None else parse_message_id(after)
        if last < 0 or limit < 1:
            raise ValueError("last must be at least 0 and limit at least 1")
        if after_id is not None:
            read = await self._publisher.read_stream(channel, after_id, limit + 1, epoch)
            complete = not read.reset and read.complete(after_id, limit)
            return History(read.messages(limit), complete, read.epoch, read.reset)
        wanted = min(last, limit + 1)  # one more tells whether the limit cut anything
        read = await self._publisher.read_stream(channel, ZERO_ID, wanted, epoch)
        return History(read.messages(limit), not read.cut(limit), read.epoch, read.reset)

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed, or at once while disconnected (redis_subscriber.py)."""
        await self._subscriber.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        await self._subscriber.unsubscribe(channel)

    # -- beyond the protocol ---------------------------------------------------------------

    def _state_changed(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_ready(self, ready: bool = True) -> None:
        """Wait until ``self.ready == ready`` (to log readiness, or in tests)."""
        await trio.lowlevel.checkpoint()
        while self.ready != ready:
            await self._changed.wait()

    def last_delivered(self, channel: str) -> str | None:
        """Where a reconnect would refill ``channel`` from: the last id delivered, or the
        stream's newest id when it was subscribed; None while unknown."""
        message_id = self._subscriber.continuity.last(channel)
        return None if message_id is None else format_id(message_id)

    def epoch(self, channel: str) -> str | None:
        """The epoch of ``last_delivered(channel)``; None while unknown."""
        epoch = self._subscriber.continuity.epoch(channel)
        return None if epoch is None else epoch.decode()

    @property
    def gaps(self) -> int:
        """Gap notices delivered (history that could not be recovered after a reconnect)."""
        return self._subscriber.continuity.gaps

    @property
    def refilled(self) -> int:
        """Messages delivered from the history after reconnects, instead of being lost."""
        return self._subscriber.continuity.refilled

    @property
    def resets(self) -> int:
        """Refills that found their channel's history restarted (a new epoch)."""
        return self._subscriber.continuity.resets

    @property
    def duplicates(self) -> int:
        """Messages dropped because they were already delivered (live and refilled)."""
        return self._subscriber.continuity.duplicates
