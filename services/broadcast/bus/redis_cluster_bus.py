"""RedisClusterBus: the bus on Redis Cluster (``redis+cluster://``), sharded by channel.

Each channel lives on the shard that owns its slot (redis/cluster.py): its stream, its epoch and
its shard channel share one hash tag, so the publish script appends and ``SPUBLISH``es on that
shard alone. For every primary the bus runs one ``RedisPublisher`` and one ``RedisSubscriber``
(one subscriber connection per primary, ``SSUBSCRIBE`` per channel), each exactly as on one Redis:
pipelined publishes, gapless delivery across reconnects, epochs.

Following the cluster: the slot map is read at start, every few seconds, after a ``MOVED`` reply
and after a shard drops a subscription on its own (``SUNSUBSCRIBE``: the slot migrated). When a
channel's owner changes, its subscription moves: the new shard's subscriber subscribes it and
reads the history after the last message delivered (``RedisSubscriber.adopt``), so nothing is
lost, or a gap notice says so (a failover before replication). A publish or read answered
``MOVED`` is sent again, once, to the new owner.

While a slot is being migrated (``CLUSTER SETSLOT … MIGRATING/IMPORTING``) a channel whose keys
have left the source is answered ``ASK``: the publisher sends the same command once more to the
importing node after ``ASKING`` (``Cluster.ask``; the slot map is not changed), where the script
runs whole since all of the channel's keys share its slot. ``TRYAGAIN`` (the channel's keys are
split between the two nodes for a moment) is retried after a short wait, a few times; then the
publish is refused with BusUnavailable, unacknowledged. Shard channels stay on the source until
the migration ends, so a message published on the importing node reaches the listeners when
their subscription moves (the source's ``SUNSUBSCRIBE``): the new shard's subscriber reads the
history after the last message delivered, in order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import trio

from broadcast.bus.base import BusUnavailable, DeliverBatch, History
from broadcast.bus.keys import CLUSTER
from broadcast.bus.redis_publisher import RedisPublisher
from broadcast.bus.redis_subscriber import PING_INTERVAL, RedisSubscriber
from broadcast.protocol.ids import ZERO_ID, parse_message_id
from broadcast.protocol.limits import HISTORY_LENGTH, HISTORY_MAX_AGE_SECONDS, RECOVERY_LIMIT
from broadcast.redis.cluster import Cluster, Node, SlotMap, channel_slot, parse_cluster_url
from broadcast.redis.errors import Redirected
from broadcast.redis.resp import RedisError
from broadcast.redis.supervise import keep_connected
from broadcast.redis.topology import Standalone

log = logging.getLogger("broadcast.bus.redis")

T = TypeVar("T")

# Probe channel names tried to find one per primary (each owner found in a few tries; a primary
# owning 1/1000 of the slots is missed with odds of e^-20). Done once per slot map.
PROBE_SEARCH_LIMIT = 20_000


async def wait_any(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


class _Shard:
    """The publisher and subscriber of one primary."""

    def __init__(self, bus: RedisClusterBus, node: Node) -> None:
        self.node = node
        address = bus.cluster.config.address(node)
        self.topology = Standalone(address, command_timeout=bus.command_timeout)
        self.publisher = RedisPublisher(
            self.topology,
            history_length=bus.history_length,
            history_max_age=bus.history_max_age,
            command_timeout=bus.command_timeout,
            ping_interval=bus.ping_interval,
            on_change=bus.state_changed,
            keys=CLUSTER,
        )
        self.publisher.on_ask = bus.cluster.ask
        self.subscriber = RedisSubscriber(
            self.topology,
            self.publisher,
            command_timeout=bus.command_timeout,
            ping_interval=bus.ping_interval,
            on_change=bus.state_changed,
            keys=CLUSTER,
            on_dropped=bus.dropped,
        )
        self.scope = trio.CancelScope()
        self.reconnects = 0

    @property
    def up(self) -> bool:
        return self.publisher.status.up and self.subscriber.status.up

    async def run(
        self, deliver: DeliverBatch, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        def reconnected() -> None:
            self.reconnects += 1

        with self.scope:
            async with trio.open_nursery() as nursery:
                self.subscriber.deliver = deliver
                self.subscriber.nursery = nursery
                tried = [trio.Event(), trio.Event()]
                for (role, session), event in zip(
                    (
                        ("publisher", self.publisher.session),
                        ("subscriber", self.subscriber.session),
                    ),
                    tried,
                    strict=True,
                ):
                    nursery.start_soon(
                        partial(
                            keep_connected,
                            f"{role} ({self.node[0]}:{self.node[1]})",
                            self.topology.describe,
                            session,
                            log=log,
                            tried=event.set,
                            reconnected=reconnected,
                        )
                    )
                for event in tried:
                    await event.wait()
                task_status.started()


class RedisClusterBus:
    """The Bus of base.py on Redis Cluster; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        history_length: int = HISTORY_LENGTH,
        history_max_age: float = HISTORY_MAX_AGE_SECONDS,
        command_timeout: float = 5.0,
        ping_interval: float = PING_INTERVAL,
        ssl_context: object = None,
    ) -> None:
        if history_length < 1:
            raise ValueError("history_length must be at least 1")
        if history_max_age <= 0:
            raise ValueError("history_max_age must be positive")
        if ssl_context is not None:
            raise ValueError("TLS is not supported with Redis Cluster yet")
        self.cluster = Cluster(parse_cluster_url(url), command_timeout=command_timeout)
        self.name = self.cluster.name
        self.history_length = history_length
        self.history_max_age = history_max_age
        self.command_timeout = command_timeout
        self.ping_interval = ping_interval
        self._shards: dict[Node, _Shard] = {}
        self._retired: list[_Shard] = []  # shards no longer primaries: their counters still count
        self._channels: dict[str, _Shard | None] = {}  # subscribed channel -> its shard's
        # Channels a shard dropped (SUNSUBSCRIBE), awaiting reassignment -> that shard, whose
        # subscriber knows the last message delivered: the new one refills from there.
        self._left: dict[str, _Shard] = {}
        self._lock = trio.Lock()  # subscriptions are assigned and moved one at a time
        self._changed = trio.Event()
        self._wake = trio.Event()
        self._deliver: DeliverBatch | None = None
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._probe_channels: tuple[SlotMap, str, list[str]] | None = None

    # -- the Bus protocol ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        cluster_map = self.cluster.map
        if cluster_map is None or not self._shards:
            return False
        return cluster_map.primaries <= self._shards.keys() and all(
            self._shards[node].up for node in cluster_map.primaries
        )

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    async def run(
        self,
        deliver: DeliverBatch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._running:
            raise RuntimeError("this RedisClusterBus is already running")
        self._running = True
        self._deliver = deliver
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.cluster.run)
                await self._apply()
                nursery.start_soon(self._follow)
                task_status.started()
        finally:
            self._running = False
            self._nursery = None

    async def publish_message(self, channel: str, body: bytes) -> str:
        return await self._routed(
            channel, lambda shard: shard.publisher.publish_message(channel, body)
        )

    async def publish_event(self, channel: str, payload: bytes) -> None:
        await self._routed(channel, lambda shard: shard.publisher.publish_event(channel, payload))

    async def probe(self, channel: str, payload: bytes) -> None:
        await self._routed(channel, lambda shard: shard.publisher.probe(channel, payload))

    def probe_channels(self, base: str) -> list[str]:
        """One channel per primary: ``base/N`` with the smallest N whose slot it owns, so a
        probe crosses every shard's subscriber connection (a deaf one fails readiness)."""
        cluster_map = self.cluster.map
        if cluster_map is None:
            return [base]
        cached = self._probe_channels
        if cached is not None and cached[0] is cluster_map and cached[1] == base:
            return cached[2]
        found: dict[Node, str] = {}
        wanted = len(cluster_map.primaries)
        for number in range(PROBE_SEARCH_LIMIT):
            channel = f"{base}/{number}"
            owner = cluster_map.owner(channel_slot(channel))
            if owner is not None and owner not in found:
                found[owner] = channel
                if len(found) == wanted:
                    break
        channels = [found[node] for node in sorted(found)]
        self._probe_channels = (cluster_map, base, channels)
        return channels

    @property
    def refused_writes(self) -> int:
        return self._total(lambda shard: shard.publisher.refused_writes)

    async def history(
        self,
        channel: str,
        *,
        after: str | None = None,
        last: int = 0,
        limit: int = RECOVERY_LIMIT,
        epoch: str | None = None,
    ) -> History:
        """As RedisBus.history, on the channel's shard."""
        after_id = None if after is None else parse_message_id(after)
        if last < 0 or limit < 1:
            raise ValueError("last must be at least 0 and limit at least 1")
        if after_id is not None:
            read = await self._routed(
                channel, lambda s: s.publisher.read_stream(channel, after_id, limit + 1, epoch)
            )
            complete = not read.reset and read.complete(after_id, limit)
            return History(read.messages(limit), complete, read.epoch, read.reset)
        wanted = min(last, limit + 1)
        read = await self._routed(
            channel, lambda s: s.publisher.read_stream(channel, ZERO_ID, wanted, epoch)
        )
        return History(read.messages(limit), not read.cut(limit), read.epoch, read.reset)

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            if channel in self._channels:
                return
            shard = self._shard_for(channel)
            self._channels[channel] = shard
            if shard is not None:
                await shard.subscriber.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            shard = self._channels.pop(channel, None)
            left = self._left.pop(channel, None)
            if left is not None:
                left.subscriber.continuity.forget(channel)
            if shard is not None:
                await shard.subscriber.unsubscribe(channel)

    # -- following the cluster -------------------------------------------------------------

    def _shard_for(self, channel: str) -> _Shard | None:
        owner = self.cluster.owner(channel)
        return None if owner is None else self._shards.get(owner)

    async def _routed(self, channel: str, call: Callable[[_Shard], Awaitable[T]]) -> T:
        """``call`` on the channel's shard; after a MOVED reply, the map is read again and the
        call made once more on the new owner (a MOVED command was not executed)."""
        for attempt in (1, 2):
            shard = self._shard_for(channel)
            if shard is None:
                await trio.lowlevel.checkpoint()
                raise BusUnavailable("redis cluster: no primary known for the channel")
            try:
                return await call(shard)
            except BusUnavailable as exc:
                self.cluster.refresh_soon()  # the shard may have failed over, or lost the slot
                moved = isinstance(exc, Redirected) and exc.code == "MOVED"
                if attempt == 2 or not moved:
                    raise
            await self._refresh_now()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh_now(self) -> None:
        try:
            await self.cluster.refresh()
        except RedisError as exc:
            log.debug("redis cluster: %s", exc)
        await self._apply()

    def dropped(self, channel: str) -> None:
        """A shard dropped ``channel``'s subscription on its own: its slot moved."""
        shard = self._channels.get(channel)
        if shard is not None:
            self._channels[channel] = None  # reassigned by the next _apply
            self._left[channel] = shard
        self.cluster.refresh_soon()
        self._wake.set()

    async def _follow(self) -> None:
        while True:
            changed, wake = self.cluster.changed, self._wake
            await wait_any(changed, wake)
            if wake.is_set():  # a shard dropped a subscription: read the map before moving it
                self._wake = trio.Event()
                with contextlib.suppress(RedisError):
                    await self.cluster.refresh()
            await self._apply()

    async def _apply(self) -> None:
        """Make shards and subscriptions match the slot map: start new primaries' shards, move
        channels to their owners, stop the shards of nodes that are primaries no more."""
        cluster_map = self.cluster.map
        if cluster_map is None or self._nursery is None or self._deliver is None:
            return
        async with self._lock:
            for node in sorted(cluster_map.primaries - self._shards.keys()):
                shard = _Shard(self, node)
                self._shards[node] = shard
                await self._nursery.start(shard.run, self._deliver)
            for channel, current in list(self._channels.items()):
                owner = self._shard_for(channel)
                if owner is not None and owner is not current:
                    await self._move(channel, current or self._left.pop(channel, None), owner)
            for node in set(self._shards) - cluster_map.primaries:
                shard = self._shards.pop(node)
                shard.scope.cancel()
                self._retired.append(shard)
        self.state_changed()

    async def _move(self, channel: str, old: _Shard | None, new: _Shard) -> None:
        last = epoch = None
        if old is not None:
            last = old.subscriber.continuity.last(channel)
            epoch = old.subscriber.continuity.epoch(channel)
            await old.subscriber.unsubscribe(channel)
        self._channels[channel] = new
        log.info("channel %s: now on %s:%s", channel, *new.node)
        await new.subscriber.adopt(channel, last, epoch)

    # -- beyond the protocol ---------------------------------------------------------------

    def state_changed(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_ready(self, ready: bool = True) -> None:
        await trio.lowlevel.checkpoint()
        while self.ready != ready:
            await self._changed.wait()

    def shard_of(self, channel: str) -> Node | None:
        """The primary ``channel`` is subscribed on; None while unassigned."""
        shard = self._channels.get(channel)
        return None if shard is None else shard.node

    def _total(self, counter: Callable[[_Shard], int]) -> int:
        return sum(counter(shard) for shard in [*self._shards.values(), *self._retired])

    @property
    def reconnects(self) -> int:
        return self._total(lambda shard: shard.reconnects)

    @property
    def retried(self) -> int:
        """Commands sent again after ``TRYAGAIN`` (a slot's keys half migrated)."""
        return self._total(lambda shard: shard.publisher.retried)

    @property
    def gaps(self) -> int:
        return self._total(lambda shard: shard.subscriber.continuity.gaps)

    @property
    def refilled(self) -> int:
        return self._total(lambda shard: shard.subscriber.continuity.refilled)

    @property
    def resets(self) -> int:
        return self._total(lambda shard: shard.subscriber.continuity.resets)

    @property
    def duplicates(self) -> int:
        return self._total(lambda shard: shard.subscriber.continuity.duplicates)
