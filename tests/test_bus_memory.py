"""MemoryBus has a memory ceiling: all channels' history together stays under a byte budget,
the least recently published channels are forgotten first, and nothing is kept of a channel
whose history is gone (docs/reliability.md, "Memory")."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broadcast.bus.memory import CHANNEL_OVERHEAD, ENTRY_OVERHEAD, MemoryBus
from broadcast.protocol.ids import parse_message_id
from tests.test_bus_contract import Recorder, body
from tests.test_bus_history import Clock

BUDGET = 1024 * 1024


def counted(bus: MemoryBus) -> int:
    """The budget's count, recomputed from what the bus holds."""
    return sum(
        CHANNEL_OVERHEAD + sum(len(payload) + ENTRY_OVERHEAD for _, payload in log.entries)
        for log in bus._channels.values()
    )


async def test_many_channels_stay_under_the_budget_oldest_forgotten_first() -> None:
    bus = MemoryBus(history_bytes=BUDGET)
    last_ids: dict[str, str] = {}
    for number in range(2000):
        channel = f"room-{number}"
        for index in range(50):
            last_ids[channel] = await bus.publish_message(channel, body(channel, f"m{index}"))
        assert bus.stored_bytes <= BUDGET
    assert counted(bus) == bus.stored_bytes <= BUDGET
    # ~50 messages of ~170 bytes cost ~17 KB a channel: the newest ~50 channels are kept whole.
    kept = bus.channel_count
    assert 30 <= kept <= 80
    assert bus.evicted == bus.forgotten == 2000 - kept
    newest = await bus.history("room-1999", after="0-0")
    assert (len(newest.messages), newest.complete) == (50, False)  # "0-0": something was forgotten
    assert (await bus.history("room-1999", last=50)).complete
    # An evicted channel vouches for nothing: a client resuming into it is told.
    evicted = await bus.history("room-0", after=last_ids["room-0"])
    assert (evicted.messages, evicted.complete) == ([], False)
    assert bus.channel_count == kept  # reading it made no bookkeeping
    # Its ids go on increasing past the forgotten ones, and a resume from before reads incomplete.
    again = await bus.publish_message("room-0", body("room-0", "back"))
    assert parse_message_id(again) > parse_message_id(last_ids["room-0"])
    resumed = await bus.history("room-0", after=last_ids["room-0"])
    assert (len(resumed.messages), resumed.complete) == (1, False)
    assert (await bus.history("room-0", after=again)).complete


async def test_one_channel_past_the_budget_keeps_its_newest_messages() -> None:
    bus = MemoryBus(history_bytes=64 * 1024, history_length=10_000)
    text = "x" * 4000
    ids = [await bus.publish_message("big", body("big", text)) for _ in range(40)]
    assert counted(bus) == bus.stored_bytes <= 64 * 1024
    history = await bus.history("big", after=ids[0])
    assert 10 <= len(history.messages) < 39 and not history.complete
    assert (await bus.history("big", after=ids[-5])).complete


async def test_an_aged_out_channel_is_forgotten_and_an_unsubscribed_one_leaves_nothing() -> None:
    clock = Clock()
    bus = MemoryBus(history_max_age=60, clock=clock)
    for number in range(100):
        await bus.subscribe(f"old-{number}")
        await bus.publish_message(f"old-{number}", body(f"old-{number}", "hi"))
        await bus.unsubscribe(f"old-{number}")
    assert bus.channel_count == 100 and bus._subscribed == set()
    clock.now += 61
    await bus.publish_message("new", body("new", "hi"))  # publishing sweeps the aged-out ones
    assert bus.channel_count == 1 and bus.forgotten == 100 and bus.evicted == 0
    assert counted(bus) == bus.stored_bytes
    clock.now += 61
    assert (await bus.history("new", after="0-0")).messages == []  # reading one forgets it
    assert bus.channel_count == 0 and bus.stored_bytes == 0


async def test_the_running_bus_sweeps_aged_out_channels_without_publishes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    clock = Clock()
    bus = MemoryBus(history_max_age=60, clock=clock)
    await nursery.start(bus.run, Recorder().deliver)
    for number in range(10):
        await bus.publish_message(f"room-{number}", body(f"room-{number}", "hi"))
    clock.now += 61
    await trio.sleep(61)  # the mock clock: one sweep interval
    assert bus.channel_count == 0 and bus.stored_bytes == 0 and bus.forgotten == 10


def test_a_budget_too_small_for_one_channel_is_refused() -> None:
    with pytest.raises(ValueError, match="history_bytes"):
        MemoryBus(history_bytes=1000)
