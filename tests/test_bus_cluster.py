"""The bus and presence on Redis Cluster (``redis+cluster://``): three primaries on loopback
ports (tests/support/redis_server.py), channels spread over them by hash tag, sharded pub/sub,
and a slot migrated while clients listen."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator

import pytest
import trio

from broadcast.bus.base import BusUnavailable
from broadcast.bus.redis_bus import RedisBus
from broadcast.bus.redis_cluster_bus import RedisClusterBus
from broadcast.presence import RedisPresence
from broadcast.presence.redis_cluster_presence import ClusterPresence, cluster_presence_key
from broadcast.protocol.ids import gap_payload
from broadcast.redis.cluster import ClusterConfig, channel_slot, key_slot, parse_cluster_url
from tests.support.clients import ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import ClusterSet, RedisServer
from tests.test_bus_contract import Recorder, body

WAIT = 10


@pytest.fixture
def cluster() -> Iterator[ClusterSet]:
    servers = ClusterSet(3)
    servers.start()
    try:
        yield servers
    finally:
        servers.close()


async def start(nursery: trio.Nursery, url: str) -> tuple[RedisClusterBus, Recorder]:
    bus, recorder = RedisBus(url, command_timeout=2.0, ping_interval=0.5), Recorder()
    assert isinstance(bus, RedisClusterBus)
    with trio.fail_after(WAIT):
        await nursery.start(bus.run, recorder.deliver)
        await bus.wait_ready()
    return bus, recorder


def ids(payloads: list[bytes]) -> list[str]:
    return [json.loads(payload)["id"] for payload in payloads]


async def test_channels_spread_over_the_shards_each_in_one_order(
    cluster: ClusterSet, nursery: trio.Nursery
) -> None:
    publisher, _ = await start(nursery, cluster.url)
    listener, recorder = await start(nursery, cluster.url)
    channels = [f"room-{number}" for number in range(100)]
    for channel in channels:
        await listener.subscribe(channel)
    sent: dict[str, list[str]] = {channel: [] for channel in channels}

    async def send(channel: str) -> None:
        for number in range(5):
            sent[channel].append(
                await publisher.publish_message(channel, body(channel, str(number)))
            )

    async with trio.open_nursery() as senders:
        for channel in channels:
            senders.start_soon(send, channel)
    with trio.fail_after(WAIT):
        for channel in channels:
            assert ids(await recorder.wait_for(channel, 5)) == sent[channel]
    # Every shard holds its share of the channels, and each channel's keys are on its owner.
    per_shard = {server.port: 0 for server in cluster.servers}
    for channel in channels:
        owner = await trio.to_thread.run_sync(cluster.owner, channel_slot(channel))
        per_shard[owner.port] += 1
        exists = await trio.to_thread.run_sync(
            lambda o=owner, c=channel: o.client().exists(
                f"broadcast:history:{{{c}}}", f"broadcast:epoch:{{{c}}}"
            )
        )
        assert exists == 2
    assert all(count >= 20 for count in per_shard.values()), per_shard
    # Sharded pub/sub: each shard knows only the shard channels it owns.
    for server in cluster.servers:
        names = await trio.to_thread.run_sync(
            lambda s=server: s.client().execute_command("PUBSUB", "SHARDCHANNELS")
        )
        assert len(names) == per_shard[server.port]
        for name in names:
            assert (await trio.to_thread.run_sync(cluster.owner, key_slot(name))) is server
    history = await listener.history("room-7", last=10)
    assert ids(history.messages) == sent["room-7"] and history.complete and history.epoch
    print(f"\nchannels per shard: {sorted(per_shard.values())}")


async def migrate(cluster: ClusterSet, channel: str, to: RedisServer) -> RedisServer:
    """Move ``channel``'s slot, keys included, to ``to`` (redis-cli --cluster reshard's steps)."""
    slot = channel_slot(channel)
    source = await trio.to_thread.run_sync(cluster.owner, slot)
    assert source is not to

    def move() -> None:
        ids = {
            server: server.client().execute_command("CLUSTER", "MYID").decode()
            for server in (source, to)
        }
        to.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to])
        while keys := source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.client().execute_command(
                "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys
            )
        for server in cluster.servers:
            server.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])

    await trio.to_thread.run_sync(move)
    return source


async def test_a_migrated_slot_moves_its_subscription_and_loses_nothing(
    cluster: ClusterSet, nursery: trio.Nursery
) -> None:
    publisher, _ = await start(nursery, cluster.url)
    listener, recorder = await start(nursery, cluster.url)
    await listener.subscribe("general")
    before = [
        await publisher.publish_message("general", body("general", f"b{i}")) for i in range(5)
    ]
    await recorder.wait_for("general", 5)
    owner = await trio.to_thread.run_sync(cluster.owner, channel_slot("general"))
    target = next(server for server in cluster.servers if server is not owner)
    await migrate(cluster, "general", target)
    # The publisher learns of the move from MOVED; the listener from its shard's SUNSUBSCRIBE.
    after = [await publisher.publish_message("general", body("general", f"a{i}")) for i in range(5)]
    delivered = await recorder.wait_for("general", 10)
    assert ids(delivered) == before + after
    with trio.fail_after(WAIT):
        while listener.shard_of("general") != ("127.0.0.1", target.port):  # noqa: ASYNC110
            await trio.sleep(0.05)
    with trio.fail_after(WAIT):
        await listener.wait_ready()
    assert listener.gaps == 0
    history = await listener.history("general", after=before[0])
    assert ids(history.messages) == before[1:] + after and history.complete


def same_slot_channels() -> tuple[str, str]:
    """Two channel names whose keys share one slot (different hash tags, same CRC16)."""
    seen: dict[int, str] = {}
    for number in range(100_000):
        name = f"ask-{number}"
        other = seen.setdefault(channel_slot(name), name)
        if other != name:
            return other, name
    raise AssertionError("no two names share a slot")


async def test_a_slot_in_migration_follows_ask_and_tryagain_and_loses_nothing(
    cluster: ClusterSet, nursery: trio.Nursery
) -> None:
    """Mid-migration (SETSLOT IMPORTING/MIGRATING), one channel's keys already moved (its
    commands are answered ASK), another's still on the source, then split for a moment (its
    script is answered TRYAGAIN): publishes, history reads and presence go on, nothing lost,
    one order."""
    moved, stays = same_slot_channels()
    slot = channel_slot(moved)
    publisher, _ = await start(nursery, cluster.url)
    listener, recorder = await start(nursery, cluster.url)
    presence = ClusterPresence(cluster.url, on_expired=lambda *_: None, refresh_interval=0.2)
    with trio.fail_after(WAIT):
        await nursery.start(presence.run)
    await presence.enter(moved, "gw/1", "alice")
    sent: dict[str, list[str]] = {moved: [], stays: []}

    async def publish(channel: str, label: str, count: int) -> None:
        for number in range(count):
            message = body(channel, f"{label}{number}")
            sent[channel].append(await publisher.publish_message(channel, message))

    for channel in (moved, stays):
        await listener.subscribe(channel)
        await publish(channel, "before", 3)
        await recorder.wait_for(channel, 3)
    source = await trio.to_thread.run_sync(cluster.owner, slot)
    target = next(server for server in cluster.servers if server is not source)
    ids_of = {
        server: server.client().execute_command("CLUSTER", "MYID").decode()
        for server in (source, target)
    }

    def keys(channel: str) -> list[str]:
        return [f"broadcast:history:{{{channel}}}", f"broadcast:epoch:{{{channel}}}"]

    def move(*names: str) -> None:
        source.client().execute_command(
            "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *names
        )

    def begin() -> None:
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids_of[source])
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids_of[target])
        move(*keys(moved), cluster_presence_key(moved))

    def count(server: RedisServer) -> int:
        return int(server.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))

    await trio.to_thread.run_sync(begin)
    assert await trio.to_thread.run_sync(count, source) == 2  # only `stays` is left there
    # `moved`: the source answers ASK, the importing node runs the script after ASKING (its
    # script cache is flushed first: NOSCRIPT there falls back to EVAL).
    await trio.to_thread.run_sync(lambda: target.client().script_flush())
    await publish(moved, "during", 5)
    await publish(stays, "during", 5)
    await presence.enter(moved, "gw/2", "bob")
    assert await presence.members(moved) == ["alice", "bob"]
    assert await trio.to_thread.run_sync(count, source) == 2
    assert await trio.to_thread.run_sync(count, target) == 3
    for channel in (moved, stays):
        history = await listener.history(channel, last=20)
        assert ids(history.messages) == sent[channel] and history.complete
        resumed = await listener.history(channel, after=sent[channel][0])
        assert ids(resumed.messages) == sent[channel][1:] and resumed.complete
    assert ids(await recorder.wait_for(stays, 8)) == sent[stays]  # live, from the source
    # `stays` split: its stream moved, its epoch not yet. The script is answered TRYAGAIN until
    # the epoch follows; the publish waits for it.
    await trio.to_thread.run_sync(move, keys(stays)[0])
    async with trio.open_nursery() as waiting:
        waiting.start_soon(publish, stays, "split", 1)
        with trio.fail_after(WAIT):
            while publisher.retried == 0:  # noqa: ASYNC110
                await trio.sleep(0.005)
        await trio.to_thread.run_sync(move, keys(stays)[1])
    assert len(sent[stays]) == 9
    # Finish the migration: the listener's subscriptions move (SUNSUBSCRIBE from the source)
    # and it reads what it did not hear, in order.
    await trio.to_thread.run_sync(
        lambda: [
            server.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids_of[target])
            for server in cluster.servers
        ]
    )
    await publish(moved, "after", 3)
    await publish(stays, "after", 3)
    for channel in (moved, stays):
        assert ids(await recorder.wait_for(channel, len(sent[channel]))) == sent[channel]
        history = await publisher.history(channel, last=50)
        assert ids(history.messages) == sent[channel] and history.complete
    assert listener.shard_of(moved) == listener.shard_of(stays) == ("127.0.0.1", target.port)
    assert listener.gaps == 0 and len(recorder.payloads(moved)) == 11
    assert await presence.members(moved) == ["alice", "bob"]


def test_the_cluster_url_names_seeds_and_the_password() -> None:
    config = parse_cluster_url("redis+cluster://:p%40ss@10.0.0.1,10.0.0.2:7000,[::1]:7001")
    assert config == ClusterConfig(
        (("10.0.0.1", 6379), ("10.0.0.2", 7000), ("::1", 7001)), None, "p@ss"
    )
    assert config.redacted() == "redis+cluster://:***@10.0.0.1:6379,10.0.0.2:7000,[::1]:7001"
    for bad in ("redis+cluster://h:1/3", "redis+cluster://h:99999", "redis+cluster://a,,b"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


def test_slots_are_redis_cluster_slots() -> None:
    assert key_slot("123456789") == 0x31C3 % 16384 and key_slot("foo") == 12182
    assert key_slot("broadcast:history:{general}") == channel_slot("general")
    assert key_slot("{a}x") == key_slot("{a}y") == key_slot("a")


async def test_presence_on_the_cluster(cluster: ClusterSet, nursery: trio.Nursery) -> None:
    expired: list[tuple[str, str, str]] = []
    stores = []
    for _ in range(2):
        store = RedisPresence(
            cluster.url, on_expired=lambda *e: expired.append(e), ttl=2.0, refresh_interval=0.3
        )
        assert isinstance(store, ClusterPresence)
        with trio.fail_after(WAIT):
            await nursery.start(store.run)
        stores.append(store)
    a, b = stores
    channels = [f"room-{number}" for number in range(12)]  # on every shard
    assert len({channel_slot(c) // 5462 for c in channels}) == 3
    for number, channel in enumerate(channels):
        await a.enter(channel, f"gw-a/{number}", "alice")
        await b.enter(channel, f"gw-b/{number}", "bob")
    for channel in channels:
        assert await b.members(channel) == ["alice", "bob"]
    assert await a.channels() == dict.fromkeys(channels, 2)
    await a.leave(channels[0], "gw-a/0")
    assert await b.members(channels[0]) == ["bob"]
    assert a.ready and b.ready
    # Keys live on their channels' shards, under the hash tag.
    owner = await trio.to_thread.run_sync(cluster.owner, channel_slot("room-3"))
    key = "broadcast:presence:{room-3}"
    assert await trio.to_thread.run_sync(lambda: owner.client().zcard(key)) == 2


async def test_a_killed_primary_is_replaced_by_its_replica(nursery: trio.Nursery) -> None:
    """SIGKILL the primary of a channel's shard under traffic: once its replica is promoted the
    bus delivers again, and every acknowledged message arrives or a gap notice says so."""
    servers = ClusterSet(3, replicas=1)
    servers.start()
    try:
        publisher, _ = await start(nursery, servers.url)
        listener, recorder = await start(nursery, servers.url)
        await listener.subscribe("general")
        presence = RedisPresence(
            servers.url, on_expired=lambda *_: None, ttl=2.0, refresh_interval=0.3
        )
        with trio.fail_after(WAIT):
            await nursery.start(presence.run)
        await presence.enter("general", "gw-a/1", "alice")
        slot = channel_slot("general")
        victim = await trio.to_thread.run_sync(servers.owner, slot)
        witness = next(s for s in servers.servers if s is not victim)
        with trio.fail_after(WAIT):  # the replicas have their data before the kill
            for server in servers.servers:
                while (  # noqa: ASYNC110 - a process's state
                    await trio.to_thread.run_sync(lambda s=server: s.client().info("replication"))
                ).get("master_link_status", "up") != "up":
                    await trio.sleep(0.05)
        acked: list[str] = []
        acked_at: list[float] = []
        refused = 0
        stop = trio.Event()

        async def traffic() -> None:
            nonlocal refused
            while not stop.is_set():
                try:
                    acked.append(await publisher.publish_message("general", body("general", "m")))
                    acked_at.append(trio.current_time())
                except BusUnavailable:
                    refused += 1
                await trio.sleep(0.005)  # paced, not a synchronisation

        async with trio.open_nursery() as publishing:
            publishing.start_soon(traffic)
            await recorder.wait_for("general", 50)
            assert victim.process is not None
            os.kill(victim.process.pid, signal.SIGKILL)
            with trio.fail_after(20):
                while (  # noqa: ASYNC110 - another process's state
                    await trio.to_thread.run_sync(servers.owner, slot, witness)
                ) is victim:
                    await trio.sleep(0.05)
            promoted_at = trio.current_time()
            count = len(acked)
            with trio.fail_after(10):
                while len(acked) < count + 50:  # noqa: ASYNC110 - paced traffic
                    await trio.sleep(0.05)
            back_after = min(t for t in acked_at if t > promoted_at) - promoted_at
            stop.set()
        delivered = recorder.payloads("general")
        with trio.fail_after(WAIT):
            while acked[-1] not in ids([p for p in delivered if b'"message"' in p]):
                delivered = await recorder.wait_for("general", len(delivered) + 1)
        got = ids([p for p in delivered if p != gap_payload("general")])
        assert len(got) == len(set(got))
        missing = set(acked) - set(got)
        assert not missing or gap_payload("general") in delivered
        assert back_after < 10
        # Presence follows: the refresh wrote the entry on the promoted replica.
        with trio.fail_after(WAIT):
            while True:
                with contextlib.suppress(BusUnavailable):
                    if await presence.members("general") == ["alice"]:
                        break
                await trio.sleep(0.1)
        print(
            f"\ncluster failover: acknowledging again {back_after:.2f} s after the promotion;"
            f" {len(acked)} acknowledged, {refused} refused, {len(missing)} missing,"
            f" {listener.gaps} gap notices"
        )
    finally:
        servers.close()


async def test_three_gateways_on_the_cluster_keep_one_order_per_channel(
    cluster: ClusterSet,
) -> None:
    """Real gateway processes: a listener per channel on every gateway, senders spread over
    the gateways, channels spread over the shards; every listener sees its channel's order."""
    gateways = [GatewayProcess(redis_url=cluster.url, node_id=f"gw{n}") for n in range(3)]
    channels = [f"room-{number}" for number in range(6)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            listeners = {
                (channel, n): await stack.enter_async_context(
                    ws_client(gateway.url, name=f"l{n}", channel=channel)
                )
                for channel in channels
                for n, gateway in enumerate(gateways)
            }
            sent: dict[str, list[str]] = {}

            async def send(number: int, channel: str) -> None:
                url = gateways[number % 3].url
                async with ws_client(url, name=f"s{number}", channel=channel) as sender:
                    sent[channel] = [await sender.publish(f"{channel} {i}") for i in range(10)]

            async with trio.open_nursery() as senders:
                for number, channel in enumerate(channels):
                    senders.start_soon(send, number, channel)
            for (channel, _), listener in listeners.items():
                assert [m["id"] for m in await listener.messages(10)] == sent[channel]
    finally:
        for gateway in gateways:
            gateway.kill()
    shards = {await trio.to_thread.run_sync(cluster.owner, channel_slot(c)) for c in channels}
    assert len(shards) >= 2  # the channels really were on different shards
