"""Bus.history: the same contract on MemoryBus and RedisBus, then what each does on its own
(MemoryBus knows exactly; RedisBus trims approximately, expires streams, and answers
"incomplete" when its stream cannot vouch for the requested id)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from broadcast.bus.base import Bus, BusUnavailable
from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.protocol.envelope import message_payload, parse_id
from tests.support.redis_server import RedisServer
from tests.test_bus_contract import WAIT, Recorder, body
from tests.test_redis_bus import admin

MakeBus = Callable[..., Awaitable[Bus]]
Published = list[tuple[str, bytes]]  # (id, payload) in publish order


@pytest.fixture(params=["memory", "redis"])
async def make_bus(request: pytest.FixtureRequest, nursery: trio.Nursery) -> MakeBus:
    """Starts a bus of the test's kind with the given options."""
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    async def make(**options: Any) -> Bus:
        bus: Bus = MemoryBus(**options) if server is None else RedisBus(server.url, **options)
        with trio.fail_after(WAIT):
            await nursery.start(bus.run, Recorder().deliver)
        assert bus.ready
        return bus

    return make


async def publish(bus: Bus, count: int, channel: str = "general") -> Published:
    published = []
    for i in range(count):
        sent = body(channel, f"m{i}")
        message_id = await bus.publish_message(channel, sent)
        published.append((message_id, sent))
    epoch = (await bus.history(channel)).epoch  # the same for every message: nothing was lost
    assert epoch
    return [
        (message_id, message_payload(message_id, sent, epoch)) for message_id, sent in published
    ]


def payloads(published: Published) -> list[bytes]:
    return [payload for _, payload in published]


# -- the contract, on both buses -----------------------------------------------------------


async def test_after_gives_the_newer_messages_oldest_first(make_bus: MakeBus) -> None:
    bus = await make_bus()
    published = await publish(bus, 10)
    await publish(bus, 3, channel="other")  # channels do not mix
    history = await bus.history("general", after=published[3][0])
    assert history[:2] == (payloads(published[4:]), True)
    assert (await bus.history("general", after=published[-1][0]))[:2] == ([], True)


async def test_last_gives_the_newest(make_bus: MakeBus) -> None:
    bus = await make_bus()
    published = await publish(bus, 6)
    assert (await bus.history("general", last=3))[:2] == (payloads(published[3:]), True)
    assert (await bus.history("general", last=100))[:2] == (payloads(published), True)
    assert (await bus.history("general"))[:2] == ([], True)  # last=0
    assert (await bus.history("never-used", last=5))[:2] == ([], True)


async def test_the_limit_keeps_the_newest_and_says_so(make_bus: MakeBus) -> None:
    bus = await make_bus()
    published = await publish(bus, 10)
    first = published[0][0]
    assert (await bus.history("general", after=first, limit=3))[:2] == (
        payloads(published[7:]),
        False,
    )
    exactly = await bus.history("general", after=published[6][0], limit=3)
    assert exactly[:2] == (payloads(published[7:]), True)
    assert (await bus.history("general", last=5, limit=3))[:2] == (payloads(published[7:]), False)
    assert (await bus.history("general", last=3, limit=3))[:2] == (payloads(published[7:]), True)


async def test_after_wins_over_last(make_bus: MakeBus) -> None:
    bus = await make_bus()
    published = await publish(bus, 4)
    history = await bus.history("general", after=published[1][0], last=1)
    assert history[:2] == (payloads(published[2:]), True)


@pytest.mark.parametrize(
    "after",
    ["yesterday", "", "1", "1-", "-1", "1-2-3", " 1-0", "1-0 ", "+1-0", "1_0-0", "١-0",
     "18446744073709551616-0", "0-18446744073709551616", "123456789012345678901-0"],
)  # fmt: skip
async def test_a_malformed_id_is_a_value_error(make_bus: MakeBus, after: str) -> None:
    bus = await make_bus()
    with pytest.raises(ValueError):
        await bus.history("general", after=after)


async def test_bad_counts_are_value_errors(make_bus: MakeBus) -> None:
    bus = await make_bus()
    with pytest.raises(ValueError):
        await bus.history("general", last=-1)
    with pytest.raises(ValueError):
        await bus.history("general", last=1, limit=0)


async def test_the_largest_possible_id_has_nothing_after_it(make_bus: MakeBus) -> None:
    bus = await make_bus()
    await publish(bus, 2)
    history = await bus.history("general", after="18446744073709551615-18446744073709551615")
    assert history.messages == []


async def test_trimmed_by_length_reads_as_incomplete(
    make_bus: MakeBus, request: pytest.FixtureRequest
) -> None:
    if "redis" in request.node.callspec.id:
        # MAXLEN ~ trims whole stream nodes: make them small so 30 messages are trimmed.
        await admin(
            request.getfixturevalue("redis_server"), "config_set", "stream-node-max-entries", 5
        )
    bus = await make_bus(history_length=10)
    published = await publish(bus, 30)
    history = await bus.history("general", after=published[0][0])
    kept = len(history.messages)
    assert 10 <= kept < 29 and not history.complete
    assert history.messages == payloads(published[-kept:])
    oldest_kept = published[-kept][0]
    assert (await bus.history("general", after=oldest_kept))[:2] == (
        payloads(published[1 - kept :]),
        True,
    )
    assert (await bus.history("general", last=100)).messages == payloads(published[-kept:])


# -- MemoryBus: exact, with a clock the test drives -----------------------------------------


class Clock:
    """Unix seconds that only move when the test says so."""

    def __init__(self, now: float = 1732435200.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_memory_ages_its_history_exactly() -> None:
    clock = Clock()
    bus = MemoryBus(history_max_age=60, clock=clock)
    old = await publish(bus, 3)
    clock.now += 30
    recent = await publish(bus, 2)
    assert (await bus.history("general", after=old[0][0])).complete
    clock.now += 31  # the first three are now 61 s old: gone, even without a publish
    history = await bus.history("general", after=old[0][0])
    assert history[:2] == (payloads(recent), False)
    assert (await bus.history("general", after=old[-1][0]))[:2] == (payloads(recent), True)
    clock.now += 60
    # All of it aged out: the channel is forgotten, and vouches for nothing any more (as a
    # Redis stream that expired; tests/test_bus_memory.py).
    assert (await bus.history("general", after=recent[0][0]))[:2] == ([], False)
    assert (await bus.history("general", after=recent[-1][0]))[:2] == ([], False)


async def test_memory_trims_by_length_exactly() -> None:
    bus = MemoryBus(history_length=5)
    published = await publish(bus, 12)
    assert (await bus.history("general", last=100))[:2] == (payloads(published[-5:]), True)
    # The last trimmed id itself: nothing after it was lost.
    assert (await bus.history("general", after=published[-6][0]))[:2] == (
        payloads(published[-5:]),
        True,
    )
    assert (await bus.history("general", after=published[-7][0]))[:2] == (
        payloads(published[-5:]),
        False,
    )


async def test_memory_ids_compare_as_numbers() -> None:
    clock = Clock(9.999)
    bus = MemoryBus(clock=clock)
    (first,) = await publish(bus, 1)
    clock.now = 10.0
    second = await publish(bus, 12)  # one millisecond: sequence numbers 0..11
    assert first[0] == "9999-0" and second[0][0] == "10000-0" and second[-1][0] == "10000-11"
    assert (await bus.history("general", after="9999-0"))[:2] == (payloads(second), True)
    assert (await bus.history("general", after="10000-9"))[:2] == (payloads(second[10:]), True)


async def test_memory_ids_increase_when_the_clock_steps_back() -> None:
    clock = Clock()
    bus = MemoryBus(clock=clock)
    first = await publish(bus, 2)
    clock.now -= 5
    later = await publish(bus, 2)
    ids = [parse_id(message_id) for message_id, _ in first + later]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert (await bus.history("general", after=first[-1][0]))[:2] == (payloads(later), True)


async def test_memory_vouches_only_for_ids_its_history_reaches_back_to() -> None:
    """A restarted single gateway must not claim a complete replay for ids of its past life."""
    bus = MemoryBus()
    published = await publish(bus, 2)
    assert (await bus.history("general", after="0-0"))[:2] == (payloads(published), True)
    assert (await bus.history("general", after="1-0"))[:2] == (payloads(published), False)
    assert (await bus.history("unused", after="1-0"))[:2] == ([], False)
    assert (await bus.history("unused", after="0-0"))[:2] == ([], True)


# -- RedisBus: approximate trims, expiry, and a stream that cannot vouch ---------------------

StartRedisBus = Callable[..., Awaitable[RedisBus]]


@pytest.fixture
async def start_redis_bus(redis_server: RedisServer, nursery: trio.Nursery) -> StartRedisBus:
    async def start(**options: Any) -> RedisBus:
        bus = RedisBus(redis_server.url, **options)
        with trio.fail_after(WAIT):
            await nursery.start(bus.run, Recorder().deliver)
        return bus

    return start


KEY = "broadcast:history:general"


async def publish_until_redis_time_passes(bus: RedisBus, ms: int) -> Published:
    """Publish until Redis's clock (the ms part of a new id) is past ``ms``; the age trim runs
    in the publish script, so this is also what makes it happen."""
    published: Published = []
    with trio.fail_after(WAIT):
        while not published or parse_id(published[-1][0])[0] <= ms:
            published += await publish(bus, 1)
            await trio.sleep(0.01)  # polling a clock: nothing to wait on but time itself
    return published


async def test_redis_trims_by_age_with_minid(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    await admin(redis_server, "config_set", "stream-node-max-entries", 2)
    bus = await start_redis_bus(history_max_age=0.3)
    old = await publish(bus, 4)  # two full nodes
    assert await admin(redis_server, "xlen", KEY) == 4
    recent = await publish_until_redis_time_passes(bus, parse_id(old[-1][0])[0] + 300)
    entries = await admin(redis_server, "xrange", KEY)
    stored = [entry_id.decode() for entry_id, _ in entries]
    assert not set(stored) & {message_id for message_id, _ in old}  # XTRIM MINID took them
    assert stored == [message_id for message_id, _ in recent][-len(stored) :]
    history = await bus.history("general", after=old[0][0])
    assert history[:2] == (payloads(recent[-len(stored) :]), False)


async def test_redis_streams_expire_with_their_history(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    default = await start_redis_bus()
    await publish(default, 1, channel="kept")
    ttl = await admin(redis_server, "pttl", "broadcast:history:kept")
    assert 3_590_000 < ttl <= 3_600_000

    bus = await start_redis_bus(history_max_age=0.2)
    published = await publish(bus, 3)
    ttl = await admin(redis_server, "pttl", KEY)
    assert 0 < ttl <= 200 or ttl == -2  # expiring, or already gone (-1 would be no expiry)
    with trio.fail_after(WAIT):
        while await admin(redis_server, "exists", KEY):  # noqa: ASYNC110 - Redis expires it
            await trio.sleep(0.01)  # on its own: there is nothing to wait on but the key
    # The stream is gone: it cannot vouch for an id from it (or know of anything before it).
    assert (await bus.history("general", after=published[0][0]))[:2] == ([], False)
    assert (await bus.history("general", after="0-0"))[:2] == ([], True)
    assert (await bus.history("general", last=10))[:2] == ([], True)


async def test_redis_answers_incomplete_for_an_id_its_stream_cannot_vouch_for(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    bus = await start_redis_bus()
    before = await publish(bus, 3)
    await admin(redis_server, "delete", KEY)  # as after a Redis restart without its data
    after = await publish(bus, 2)
    assert (await bus.history("general", after=before[-1][0]))[:2] == (payloads(after), False)
    assert (await bus.history("general", after=after[0][0]))[:2] == (payloads(after[1:]), True)
    assert (await bus.history("general", after="0-0"))[:2] == (payloads(after), True)
    newest = parse_id(after[-1][0])
    future = f"{newest[0] + 1000}-0"  # not from this stream
    assert (await bus.history("general", after=future))[:2] == ([], False)


async def test_redis_is_conservative_about_a_trimmed_id(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    """MemoryBus knows nothing after its last trimmed id was lost; Redis only knows that id is
    gone, so it says incomplete (the gateway tells the client it "may" have lost messages)."""
    await admin(redis_server, "config_set", "stream-node-max-entries", 5)
    bus = await start_redis_bus(history_length=10)
    published = await publish(bus, 30)
    kept = len((await bus.history("general", last=100)).messages)
    last_trimmed = published[-kept - 1][0]
    assert (await bus.history("general", after=last_trimmed))[:2] == (
        payloads(published[-kept:]),
        False,
    )


async def test_redis_ids_compare_as_numbers(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    bus = await start_redis_bus()
    for entry_id in ("9999-0", "9999-9", "9999-10", "10000-0"):
        await admin(redis_server, "xadd", KEY, {"m": f'"text":"{entry_id}"}}'}, id=entry_id)
    history = await bus.history("general", after="9999-9")
    assert history[:2] == (
        [message_payload(i, f'"text":"{i}"}}'.encode()) for i in ("9999-10", "10000-0")],
        True,
    )


async def test_redis_history_survives_a_flushed_script_cache(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    bus = await start_redis_bus()
    published = await publish(bus, 3)
    await admin(redis_server, "script_flush")
    assert (await bus.history("general", after=published[0][0]))[:2] == (
        payloads(published[1:]),
        True,
    )
    assert bus.reconnects == 0


async def test_redis_reads_use_the_publisher_connection(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    bus = await start_redis_bus()
    published = await publish(bus, 3)
    opened = (await admin(redis_server, "info", "stats"))["total_connections_received"]
    async with trio.open_nursery() as readers:
        for _ in range(20):
            readers.start_soon(lambda: bus.history("general", after=published[0][0]))
            readers.start_soon(lambda: bus.history("general", last=2))
    # One more: the admin client's own connection for this INFO.
    assert (await admin(redis_server, "info", "stats"))["total_connections_received"] <= opened + 1


async def test_redis_history_fails_fast_when_redis_is_down(
    redis_server: RedisServer, start_redis_bus: StartRedisBus
) -> None:
    bus = await start_redis_bus(command_timeout=1.0)
    redis_server.stop()
    with trio.fail_after(WAIT):
        await bus.wait_ready(False)
    started = trio.current_time()
    with pytest.raises(BusUnavailable):
        await bus.history("general", after="1-0")
    with pytest.raises(BusUnavailable):
        await bus.history("general", last=3)
    assert trio.current_time() - started < 1.0
