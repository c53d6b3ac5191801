"""The bus and presence behind Redis Sentinel: one primary, one replica and three sentinels, all
real processes on loopback ports (tests/support/redis_server.py), failed over under traffic.

What must hold: the bus delivers again soon after the promotion (within 10 s), and every
acknowledged message reaches the listener, or the listener is told (a gap notice) where one may
be lost; presence answers again from the new primary."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from broadcast.bus.base import BusUnavailable
from broadcast.bus.redis_bus import RedisBus
from broadcast.presence import RedisPresence
from broadcast.protocol.ids import gap_payload
from broadcast.redis.sentinel import Sentinel, SentinelConfig, parse_sentinel_url
from tests.support.clients import ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import SentinelSet
from tests.test_bus_contract import Recorder, body

# Failing over takes the sentinels' down-after (1 s), an election and a promotion: a few seconds.
FAILOVER_SECONDS = 20
DELIVERS_AGAIN_WITHIN = 10.0


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    servers = SentinelSet(password="redis pw", sentinel_password="sentinel:pw@")
    servers.start()
    try:
        yield servers
    finally:
        servers.close()


async def start(
    nursery: trio.Nursery, url: str, channel: str | None = None
) -> tuple[RedisBus, Recorder]:
    bus, recorder = RedisBus(url, command_timeout=2.0, ping_interval=0.5), Recorder()
    with trio.fail_after(10):
        await nursery.start(bus.run, recorder.deliver)
    assert bus.ready
    if channel is not None:
        await bus.subscribe(channel)
    return bus, recorder


class Traffic:
    """Publishes one message every few milliseconds, keeping what was acknowledged, and when."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self.acked: list[tuple[float, str]] = []
        self.refused = 0
        self.stop = trio.Event()

    async def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            try:
                message_id = await self.bus.publish_message("general", body("general", str(number)))
            except BusUnavailable:
                self.refused += 1
            else:
                self.acked.append((trio.current_time(), message_id))
            await trio.sleep(0.005)  # paced, not a synchronisation: ~200 messages/s


async def wait_for_port(servers: SentinelSet, unlike: int) -> int:
    """The primary's port once the sentinels name another than ``unlike``."""
    with trio.fail_after(FAILOVER_SECONDS):
        while True:
            port = await trio.to_thread.run_sync(servers.master_port)
            if port is not None and port != unlike:
                return port
            await trio.sleep(0.05)


def check_every_acked_message_arrived_or_was_told(recorder: Recorder, acked: list[str]) -> int:
    """Returns the number of gap notices; each acknowledged message is delivered once, in order,
    unless a gap notice stands where it is missing."""
    delivered = recorder.payloads("general")
    gaps = delivered.count(gap_payload("general"))
    ids = [json.loads(payload)["id"] for payload in delivered if payload != gap_payload("general")]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    missing = set(acked) - set(ids)
    assert not missing or gaps, f"{len(missing)} acknowledged messages lost silently"
    return gaps


@pytest.fixture
async def presence(
    sentinel_set: SentinelSet, nursery: trio.Nursery
) -> AsyncIterator[RedisPresence]:
    store = RedisPresence(
        sentinel_set.url, on_expired=lambda *_: None, ttl=3.0, refresh_interval=0.5
    )
    with trio.fail_after(10):
        await nursery.start(store.run)
    yield store


async def test_a_killed_primary_is_followed_and_nothing_acknowledged_is_lost_silently(
    sentinel_set: SentinelSet, nursery: trio.Nursery, presence: RedisPresence
) -> None:
    publisher, _ = await start(nursery, sentinel_set.url)
    listener, recorder = await start(nursery, sentinel_set.url, "general")
    await presence.enter("general", "gw-a/1", "alice")
    assert await presence.members("general") == ["alice"]
    traffic = Traffic(publisher)
    async with trio.open_nursery() as publishing:
        publishing.start_soon(traffic.run)
        await recorder.wait_for("general", 100)
        old_port = sentinel_set.primary.port
        assert sentinel_set.primary.process is not None
        os.kill(sentinel_set.primary.process.pid, signal.SIGKILL)
        killed_at = trio.current_time()
        await wait_for_port(sentinel_set, unlike=old_port)
        promoted_at = trio.current_time()
        acked_before = len(traffic.acked)
        # Delivering again: a message acknowledged after the promotion reaches the listener.
        with trio.fail_after(DELIVERS_AGAIN_WITHIN):
            while True:
                fresh = [i for t, i in traffic.acked[acked_before:] if t > promoted_at]
                delivered = recorder.payloads("general")
                if fresh and any(fresh[0].encode() in payload for payload in delivered):
                    break
                await recorder.wait_for("general", len(delivered) + 1)
        back_at = trio.current_time()
        await recorder.wait_for("general", len(recorder.payloads("general")) + 50)
        traffic.stop.set()
    acked = [message_id for _, message_id in traffic.acked]
    # Everything acknowledged arrives (the last ones may still be on their way).
    last = acked[-1]
    with trio.fail_after(10):
        while not any(f'"id":"{last}"'.encode() in p for p in recorder.payloads("general")):
            await recorder.wait_for("general", len(recorder.payloads("general")) + 1)
    gaps = check_every_acked_message_arrived_or_was_told(recorder, acked)
    print(
        f"\nfailover: promoted {promoted_at - killed_at:.1f} s after the kill, delivering again"
        f" {back_at - promoted_at:.2f} s after the promotion; {len(acked)} acknowledged,"
        f" {traffic.refused} refused, {gaps} gap notices, {listener.refilled} refilled"
    )
    assert back_at - promoted_at < DELIVERS_AGAIN_WITHIN
    assert publisher.ready and listener.ready and listener.reconnects >= 1
    # Presence follows: its refresh rewrote the entry on the new primary.
    with trio.fail_after(10):
        while True:
            try:
                if await presence.members("general") == ["alice"]:
                    break
            except BusUnavailable:
                pass
            await trio.sleep(0.1)


async def test_a_switchover_reaches_every_connection_and_loses_nothing(
    sentinel_set: SentinelSet, nursery: trio.Nursery
) -> None:
    """``SENTINEL FAILOVER``: the replica is promoted, then the old primary, still up, is made
    its replica. Sentinel does not stop writes meanwhile: what the old primary acknowledged in
    between is lost with it (delivered live, but not in the new history), so the listener may
    get a gap notice; it must not lose anything silently."""
    publisher, _ = await start(nursery, sentinel_set.url)
    _, recorder = await start(nursery, sentinel_set.url, "general")
    traffic = Traffic(publisher)
    async with trio.open_nursery() as publishing:
        publishing.start_soon(traffic.run)
        await recorder.wait_for("general", 50)
        old_port = sentinel_set.primary.port
        await trio.to_thread.run_sync(
            lambda: sentinel_set.sentinel_client().execute_command(
                "SENTINEL", "FAILOVER", sentinel_set.MASTER
            )
        )
        new_port = await wait_for_port(sentinel_set, unlike=old_port)
        assert new_port == sentinel_set.replica.port
        # 50 more delivered after the promotion.
        await recorder.wait_for("general", len(recorder.payloads("general")) + 50)
        traffic.stop.set()
    acked = [message_id for _, message_id in traffic.acked]
    last = acked[-1]
    with trio.fail_after(10):
        while not any(f'"id":"{last}"'.encode() in p for p in recorder.payloads("general")):
            await recorder.wait_for("general", len(recorder.payloads("general")) + 1)
    check_every_acked_message_arrived_or_was_told(recorder, acked)
    # Every connection left the demoted primary: it has no client of ours any more.
    clients = await trio.to_thread.run_sync(lambda: sentinel_set.primary.client().client_list())
    assert not [c for c in clients if c["name"].startswith("broadcast-")]


# -- the URL ------------------------------------------------------------------------------------


def test_the_sentinel_url_names_sentinels_master_db_and_both_passwords() -> None:
    config = parse_sentinel_url(
        "redis+sentinel://user:p%40ss@10.0.0.1,10.0.0.2:26380,[::1]:26381/my%20master/3"
        "?sentinel_password=s%26cret&sentinel_username=watcher"
    )
    assert config == SentinelConfig(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)),
        "my master",
        3,
        "user",
        "p@ss",
        "watcher",
        "s&cret",
    )
    assert config.redacted() == (
        "redis+sentinel://user:***@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381/my%20master/3"
        "?sentinel_password=***"
    )
    assert "p@ss" not in repr(config) and "s&cret" not in repr(config)
    bare = parse_sentinel_url("redis+sentinel://localhost/mymaster")
    assert (bare.sentinels, bare.db, bare.password, bare.sentinel_password) == (
        (("localhost", 26379),),
        0,
        None,
        None,
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://host:26379",  # no master name
        "redis+sentinel://host:26379/",
        "redis+sentinel://host:26379/mymaster/zero",
        "redis+sentinel://host:26379/mymaster/0/extra",
        "redis+sentinel://host:99999/mymaster",
        "redis+sentinel://host:port/mymaster",
        "redis+sentinel://a,,b/mymaster",
    ],
)
def test_bad_sentinel_urls_are_refused_without_quoting_them(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        RedisBus(url.replace("host", "secret-host"))
    assert "secret-host" not in str(refused.value)


class DeafSentinel(Sentinel):
    """A topology that never hears ``+switch-master``: only its poll can find a new primary."""

    async def _listen(self) -> None:
        await trio.sleep_forever()


async def test_a_missed_switch_event_is_caught_by_the_poll(
    sentinel_set: SentinelSet, nursery: trio.Nursery
) -> None:
    topology = DeafSentinel(
        parse_sentinel_url(sentinel_set.url), command_timeout=2.0, poll_interval=0.2
    )
    await nursery.start(topology.run)
    connection = await topology.connect("broadcast-test")
    assert topology.describe().endswith(f"(primary 127.0.0.1:{sentinel_set.primary.port})")
    moved = topology.moved
    await trio.to_thread.run_sync(
        lambda: sentinel_set.sentinel_client().execute_command(
            "SENTINEL", "FAILOVER", sentinel_set.MASTER
        )
    )
    with trio.fail_after(FAILOVER_SECONDS):
        await moved.wait()
    assert topology.switches == 1 and connection.closed  # closed for its user to reconnect
    assert topology.describe().endswith(f"(primary 127.0.0.1:{sentinel_set.replica.port})")
    again = await topology.connect("broadcast-test")  # checked with ROLE: the new primary
    assert (await again.execute("ROLE"))[0] == b"master"
    await again.aclose()


# -- three real gateways behind Sentinel ---------------------------------------------------------


async def readyz(port: int) -> int:
    """The status of a gateway's ``GET /readyz`` (0 when it does not answer)."""
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                head = await stream.receive_some(4096)
    except (OSError, trio.TooSlowError):
        return 0
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


async def test_three_gateways_deliver_again_after_the_primary_is_killed(
    sentinel_set: SentinelSet,
) -> None:
    """The issue's scenario with real gateway processes: every gateway's listener gets every
    acknowledged message, before and after a SIGKILLed primary, and each gateway is ready again
    within 10 s of the promotion."""
    gateways = [
        GatewayProcess(redis_url=sentinel_set.url, node_id=f"gw{number}") for number in range(3)
    ]
    try:
        async with (
            ws_client(gateways[0].url, name="sender") as sender,
            ws_client(gateways[0].url, name="l0") as l0,
            ws_client(gateways[1].url, name="l1") as l1,
            ws_client(gateways[2].url, name="l2") as l2,
        ):
            before = [await sender.publish(f"before {i}") for i in range(10)]
            for listener in (l0, l1, l2):
                assert [m["id"] for m in await listener.messages(10)] == before
            old_port = sentinel_set.primary.port
            assert sentinel_set.primary.process is not None
            os.kill(sentinel_set.primary.process.pid, signal.SIGKILL)
            await wait_for_port(sentinel_set, unlike=old_port)
            promoted_at = trio.current_time()
            with trio.fail_after(DELIVERS_AGAIN_WITHIN):
                for gateway in gateways:
                    while await readyz(gateway.port) != 200:  # noqa: ASYNC110 - another process
                        await trio.sleep(0.05)
            ready_after = trio.current_time() - promoted_at
            after = [await sender.publish(f"after {i}") for i in range(10)]
            for listener in (l0, l1, l2):
                got = await listener.messages(10)
                assert [m["id"] for m in got] == after
                assert all(m["epoch"] == got[0]["epoch"] for m in got)
            print(f"\n3 gateways ready again {ready_after:.2f} s after the promotion")
    finally:
        for gateway in gateways:
            gateway.kill()
