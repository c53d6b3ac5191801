"""The Bus contract of bus/base.py, checked the same way on MemoryBus and RedisBus."""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable

import pytest
import trio

from broadcast.bus.base import Bus, Delivery
from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.protocol.envelope import event_payload, message_body, message_payload, parse_id

# Generous for a loaded CI machine, short enough that a lost message fails the test quickly.
WAIT = 5


class Recorder:
    """A ``deliver`` that keeps every batch and lets a test wait for what it expects."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.batches = 0
        self._changed = trio.Event()

    def deliver(self, batch: list[Delivery]) -> None:
        self.deliveries.extend(batch)
        self.batches += 1
        self._changed.set()
        self._changed = trio.Event()

    def payloads(self, channel: str) -> list[bytes]:
        return [payload for name, payload in self.deliveries if name == channel]

    async def wait_for(self, channel: str, count: int) -> list[bytes]:
        with trio.fail_after(WAIT):
            while len(self.payloads(channel)) < count:
                await self._changed.wait()
        return self.payloads(channel)


Gateway = tuple[Bus, Recorder]
StartGateway = Callable[[], Awaitable[Gateway]]


@pytest.fixture(params=["memory", "redis"])
async def start_gateway(request: pytest.FixtureRequest, nursery: trio.Nursery) -> StartGateway:
    """Starts a bus in the test's nursery, as a gateway would; for Redis, each call is one more
    gateway on the same private redis-server."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    async def start() -> Gateway:
        bus: Bus = MemoryBus() if url is None else RedisBus(url)
        recorder = Recorder()
        await nursery.start(bus.run, recorder.deliver)
        assert bus.ready
        return bus, recorder

    return start


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture
async def gateways(start_gateway: StartGateway, gateway: Gateway) -> list[Gateway]:
    """Two gateways on Redis; one for the in-process bus, which cannot be shared."""
    if isinstance(gateway[0], MemoryBus):
        return [gateway]
    return [gateway, await start_gateway()]


def body(channel: str, text: str, origin: str = "gw-test/1") -> bytes:
    return message_body(channel, "alice", text, 1732435200.123, origin)


async def test_ids_increase_within_a_channel_in_delivery_order(gateway: Gateway) -> None:
    bus, recorder = gateway
    await bus.subscribe("general")
    ids = [await bus.publish_message("general", body("general", f"m{i}")) for i in range(50)]
    assert all(parse_id(a) < parse_id(b) for a, b in itertools.pairwise(ids))
    delivered = await recorder.wait_for("general", 50)
    assert [json.loads(payload)["id"] for payload in delivered] == ids


async def test_the_payload_is_exactly_the_envelope(gateway: Gateway) -> None:
    bus, recorder = gateway
    await bus.subscribe("general")
    text = 'quotes " and \\ backslash, tab\t, unicode é ✓ 😀, {"json": "inside"}'
    sent = body("general", text)
    message_id = await bus.publish_message("general", sent)
    (delivered,) = await recorder.wait_for("general", 1)
    epoch = (await bus.history("general")).epoch
    assert epoch  # made by the first message
    assert delivered == message_payload(message_id, sent, epoch)
    assert json.loads(delivered) == {
        "type": "message",
        "id": message_id,
        "epoch": epoch,
        "channel": "general",
        "sender": "alice",
        "text": text,
        "ts": 1732435200.123,
        "origin": "gw-test/1",
    }


async def test_events_are_delivered_verbatim_without_an_id(gateway: Gateway) -> None:
    bus, recorder = gateway
    await bus.subscribe("general")
    join = event_payload("join", "general", "bob ✓", 1732435201.5, "gw-b/3")
    await bus.publish_event("general", join)
    assert await recorder.wait_for("general", 1) == [join]


async def test_only_subscribed_channels_are_delivered(gateway: Gateway) -> None:
    bus, recorder = gateway
    await bus.subscribe("kept")
    await bus.subscribe("dropped")
    await bus.unsubscribe("dropped")
    await bus.unsubscribe("never-subscribed")  # harmless
    await bus.publish_message("dropped", body("dropped", "lost"))
    await bus.publish_message("never", body("never", "lost"))
    await bus.publish_event("dropped", event_payload("join", "dropped", "x", 1.0, "gw/1"))
    # Redis delivers to one connection in publish order, so once this arrives, nothing sent
    # before it on another channel is still on its way.
    await bus.publish_message("kept", body("kept", "marker"))
    await recorder.wait_for("kept", 1)
    assert {channel for channel, _ in recorder.deliveries} == {"kept"}


async def test_channels_are_isolated(gateway: Gateway) -> None:
    bus, recorder = gateway
    for channel in ("a", "b", "c"):
        await bus.subscribe(channel)
    for i in range(21):
        channel = "abc"[i % 3]
        await bus.publish_message(channel, body(channel, f"{channel}{i}"))
    for channel in ("a", "b", "c"):
        events = [json.loads(payload) for payload in await recorder.wait_for(channel, 7)]
        expected = [f"{channel}{i}" for i in range(21) if "abc"[i % 3] == channel]
        assert [event["text"] for event in events] == expected
        assert {event["channel"] for event in events} == {channel}


async def test_concurrent_publishers_see_one_order_everywhere(gateways: list[Gateway]) -> None:
    publishers, per_publisher = 8, 25
    total = publishers * per_publisher
    for bus, _ in gateways:
        await bus.subscribe("general")
    returned: dict[int, list[str]] = {}

    async def publish(number: int) -> None:
        bus, _ = gateways[number % len(gateways)]
        returned[number] = [
            await bus.publish_message("general", body("general", f"{number}:{i}", f"p/{number}"))
            for i in range(per_publisher)
        ]

    async with trio.open_nursery() as publishing:
        for number in range(publishers):
            publishing.start_soon(publish, number)

    orders = [await recorder.wait_for("general", total) for _, recorder in gateways]
    assert all(order == orders[0] for order in orders)  # byte for byte, in the same order
    events = [json.loads(payload) for payload in orders[0]]
    ids = [parse_id(event["id"]) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == total
    assert {event["id"] for event in events} == {i for ids in returned.values() for i in ids}
    for number in range(publishers):  # each publisher's messages keep their order
        mine = [event["text"] for event in events if event["origin"] == f"p/{number}"]
        assert mine == [f"{number}:{i}" for i in range(per_publisher)]
