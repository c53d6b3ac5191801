"""Recovery always completes for a client that reads, and a storm of recoveries shares reads.

Real gateways (in-process, on real sockets) on the in-process bus and on a real Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.gateway.server import Gateway
from broadcast.protocol.limits import OUTBOX_LIMIT_BYTES
from tests.support.clients import ws_client
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until


@pytest.fixture(params=["memory", "redis"])
async def gateway(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[Gateway]:
    server: RedisServer | None = None
    bus: MemoryBus | RedisBus
    if request.param == "memory":
        bus = MemoryBus()
    else:
        server = RedisServer()
        server.start()
        bus = RedisBus(server.url)
    gateway = Gateway(bus, node_id=f"gw-replay-{request.param}")
    gateway.access.message_rate = 0  # the sender fills the history as fast as it can
    await nursery.start(gateway.run)
    await wait_until(lambda: gateway.ready)
    try:
        yield gateway
    finally:
        nursery.cancel_scope.cancel()
        if server is not None:
            server.close()


def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/"


async def fill(gateway: Gateway, count: int, size: int) -> list[str]:
    async with ws_client(url(gateway), name="filler", announce="0") as filler:
        return [await filler.publish(f"{i:05d}" + "x" * (size - 5)) for i in range(count)]


async def test_a_replay_of_a_megabyte_and_more_completes_for_a_reader(gateway: Gateway) -> None:
    """1,000 messages of 1,100 bytes: the whole replay is over the 1 MiB outbox limit."""
    ids = await fill(gateway, 1000, 1100)
    assert OUTBOX_LIMIT_BYTES < 1000 * 1100
    async with ws_client(url(gateway), name="back", history="1000") as back:
        replayed = await back.messages(1000)
        recovered = await back.expect("recovered")
    assert [m["id"] for m in replayed] == ids
    assert (recovered["count"], recovered["complete"]) == (1000, True)


async def test_a_replay_with_live_traffic_meanwhile_loses_nothing(gateway: Gateway) -> None:
    """While a big replay goes out, the channel keeps going; the client gets both, in order,
    once each."""
    ids = await fill(gateway, 600, 2000)
    live: list[str] = []
    async with ws_client(url(gateway), name="sender", announce="0") as sender:

        async def keep_sending() -> None:
            for i in range(300):
                live.append(await sender.publish(f"live {i} " + "y" * 3000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            async with ws_client(url(gateway), name="back", since=ids[0]) as back:
                seen: list[str] = []
                while len(seen) < 599 + 300:
                    event = await back.take("message")
                    if event["id"] not in seen:
                        seen.append(event["id"])
    assert seen == ids[1:] + live


async def test_a_storm_of_recoveries_shares_history_reads(gateway: Gateway) -> None:
    ids = await fill(gateway, 50, 100)
    reads_before = gateway.context.replays.reads

    async def recover(i: int) -> None:
        async with ws_client(url(gateway), name=f"r{i}", since=ids[10], announce="0") as client:
            assert [m["id"] for m in await client.messages(39)] == ids[11:]
            assert (await client.expect("recovered"))["complete"] is True

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(recover, i)
    reads = gateway.context.replays.reads - reads_before
    assert reads < 30, f"{reads} history reads served 60 recovering clients"


async def test_a_slow_websocket_client_is_told_4008(gateway: Gateway) -> None:
    """A client that stops reading is cut at the outbox limit, and once it reads again it finds
    the close frame (4008) after whole frames, not a reset (1006)."""
    from trio_websocket import ConnectionClosed, open_websocket_url

    async with open_websocket_url(url(gateway) + "?name=slow&announce=0") as slow:
        async with ws_client(url(gateway), name="sender", announce="0") as sender:
            while gateway.stats.slow_disconnects == 0:
                await sender.publish("z" * 4000)
        with trio.fail_after(20), pytest.raises(ConnectionClosed) as closed:
            while True:
                await slow.get_message()
    assert closed.value.reason.code == 4008
