"""Readiness is proven by probes through the bus, and honest when Redis is there but refuses
writes (``maxmemory`` with ``noeviction``), when it comes back, and on Redis Cluster when one
shard stops answering: a real redis-server (or cluster) each, no mocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from broadcast.bus.base import Bus
from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.bus.redis_cluster_bus import RedisClusterBus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.hub import ChannelHub
from broadcast.gateway.readiness import (
    PROBE_DEADLINE_SECONDS,
    PROBE_INTERVAL_SECONDS,
    RETRY_INTERVAL_SECONDS,
    ReadinessProbe,
)
from broadcast.gateway.server import Gateway
from broadcast.redis.cluster import channel_slot
from broadcast.redis.errors import StorageFull
from tests.support.clients import ws_client
from tests.support.redis_server import ClusterSet, RedisServer
from tests.support.waiting import wait_until
from tests.test_bus_contract import body
from tests.test_bus_sentinel import readyz
from tests.test_redis_bus import admin

WAIT = 20


class Readiness:
    """A bus, a hub and the probe, as the gateway wires them (server.py: ``ready``)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.hub = ChannelHub(bus)
        self.probe = ReadinessProbe(bus, self.hub, "gw-ready")

    @property
    def ready(self) -> bool:
        return self.bus.ready and self.probe.live

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.bus.run, self.hub.deliver)
        nursery.start_soon(self.probe.run)
        await self.until(True)

    async def until(self, ready: bool, within: float = WAIT) -> float:
        """Wait (probe round by probe round) until ``ready``; returns when, in trio time."""
        with trio.fail_after(within):
            while self.ready != ready:
                await self.probe.round_done.wait()
        return trio.current_time()


async def fill(server: RedisServer) -> None:
    """Redis past its memory limit, evicting nothing: every write is refused with OOM."""
    await admin(server, "config_set", "maxmemory-policy", "noeviction")
    await admin(server, "set", "filler", b"x" * 4_000_000)
    await admin(server, "config_set", "maxmemory", "1mb")


async def test_not_ready_while_redis_refuses_writes_and_ready_soon_after(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    readiness = Readiness(RedisBus(redis_server.url, command_timeout=2.0))
    await readiness.start(nursery)
    bus = readiness.bus
    await fill(redis_server)
    # No message was refused yet: the probe's own write finds it out.
    await readiness.until(False, within=PROBE_INTERVAL_SECONDS + PROBE_DEADLINE_SECONDS + 1)
    assert bus.ready and bus.refused_writes == 0  # connected and subscribed: only the probe knows
    await bus.publish_event("general", b"{}")  # PUBLISH alone passes: a probe must write
    with pytest.raises(StorageFull, match="out of memory \\(OOM"):
        await bus.publish_message("general", body("general", "refused"))
    assert bus.refused_writes == 1
    assert (await bus.history("general", last=10)).complete  # reads still work

    await admin(redis_server, "config_set", "maxmemory", "0")
    accepting = trio.current_time()
    await bus.publish_message("general", body("general", "accepted again"))
    back = await readiness.until(True) - accepting
    assert back <= PROBE_INTERVAL_SECONDS
    print(f"ready again {back:.2f} s after Redis accepted writes")


async def test_ready_within_the_retry_of_redis_coming_back(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    readiness = Readiness(RedisBus(redis_server.url, command_timeout=1.0))
    await readiness.start(nursery)
    await trio.to_thread.run_sync(redis_server.stop)
    await readiness.until(False)
    await trio.sleep(5)  # a long outage (real time): the reconnect backoff reaches its cap
    await trio.to_thread.run_sync(redis_server.start)
    answering = trio.current_time()
    back = await readiness.until(True) - answering
    # Reconnect backoff (at most 1.5 s), resubscribe, then a probe as soon as the bus is up.
    assert back <= PROBE_INTERVAL_SECONDS
    print(f"ready again {back:.2f} s after Redis came back")


async def test_a_gateway_on_a_full_redis_refuses_publishes_with_oom_and_readyz_says_so(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    bus = RedisBus(redis_server.url, command_timeout=2.0)
    gateway = Gateway(bus, node_id="gw-full", access=AccessPolicy(message_rate=0))
    await nursery.start(gateway.run)
    await wait_until(lambda: gateway.ready)
    assert await readyz(gateway.port) == 200
    async with ws_client(f"ws://127.0.0.1:{gateway.port}/", name="alice") as alice:
        await fill(redis_server)
        await alice.send_json({"type": "publish", "text": "refused", "ref": "r1"})
        error = await alice.take("error")
        assert error["code"] == "bus_unavailable", error
        assert "out of memory (OOM" in error["message"], error
        await wait_until(lambda: not gateway.ready)
        assert await readyz(gateway.port) == 503
        await admin(redis_server, "config_set", "maxmemory", "0")
        await wait_until(lambda: gateway.ready)
        assert await readyz(gateway.port) == 200
        assert await alice.publish("accepted again")


class RefusingBus(MemoryBus):
    """The in-process bus with a store that refused ``refusals`` messages so far: what a
    Redis hovering at its limit looks like when the probe's own write gets through."""

    refusals = 0

    @property
    def refused_writes(self) -> int:
        return self.refusals


async def test_messages_refused_since_the_last_round_fail_readiness(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    bus = RefusingBus()
    readiness = Readiness(bus)
    await readiness.start(nursery)
    bus.refusals += 3
    await readiness.until(False, within=PROBE_INTERVAL_SECONDS + 0.1)
    bus.refusals += 1  # still refusing
    await readiness.probe.round_done.wait()
    assert not readiness.ready
    refused_last = trio.current_time()
    # Nothing refused for one round: ready again within the retry interval.
    assert await readiness.until(True) - refused_last <= RETRY_INTERVAL_SECONDS + 0.01


# -- Redis Cluster: a probe per primary ------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[ClusterSet]:
    servers = ClusterSet(3)
    servers.start()
    try:
        yield servers
    finally:
        servers.close()


async def cluster_admin(server: RedisServer, *command: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: server.client().execute_command(*command))


async def test_the_probe_covers_every_shard_and_a_paused_one_fails_readiness(
    cluster: ClusterSet, nursery: trio.Nursery
) -> None:
    bus = RedisBus(cluster.url)
    assert isinstance(bus, RedisClusterBus)
    readiness = Readiness(bus)
    await readiness.start(nursery)
    channels = bus.probe_channels(readiness.probe.channel)
    owners = [
        await trio.to_thread.run_sync(cluster.owner, channel_slot(channel)) for channel in channels
    ]
    assert len(channels) == 3 and {owner.port for owner in owners} == {
        server.port for server in cluster.servers
    }
    # A shard that a single probe (the base channel's) would never have crossed.
    base_owner = await trio.to_thread.run_sync(cluster.owner, channel_slot(readiness.probe.channel))
    paused = next(server for server in cluster.servers if server.port != base_owner.port)
    pause_ms = round((PROBE_INTERVAL_SECONDS + PROBE_DEADLINE_SECONDS + 3) * 1000)
    await cluster_admin(paused, "CLIENT", "PAUSE", pause_ms, "ALL")
    paused_at = trio.current_time()
    told = await readiness.until(False, within=PROBE_INTERVAL_SECONDS + PROBE_DEADLINE_SECONDS + 1)
    assert told - paused_at < pause_ms / 1000  # while still paused
    back = await readiness.until(True)
    told, back = told - paused_at, back - paused_at
    print(f"{pause_ms} ms pause: not ready after {told:.2f} s, ready again at {back:.2f} s")
