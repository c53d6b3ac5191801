"""Channel epochs (docs/reliability.md, "Epochs"): ids compare only within one epoch, so a Redis
that comes back empty with its clock behind loses no new message anywhere, and a client resuming
across the change is told its history restarted.

The clock behind is made without touching any clock: before the restart the test appends one
entry with an explicit id a minute ahead (``XADD``), so the stream's ids, and those of every
message published after it, run a minute ahead of Redis's clock, exactly as if Redis's clock had
been a minute ahead then and is right now."""

from __future__ import annotations

import json

import pytest
import trio

from broadcast.bus.continuity import Continuity
from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.protocol.envelope import message_payload, parse_id
from broadcast.protocol.ids import gap_payload, payload_epoch
from tests.support.redis_server import RedisServer
from tests.test_bus_contract import WAIT, Recorder, body
from tests.test_redis_bus import StartBus, admin, message_ids, publish, start_bus

__all__ = ["start_bus"]  # the fixture, imported for pytest

AHEAD_MS = 60_000


async def run_ahead(server: RedisServer, bus: RedisBus, channel: str) -> list[str]:
    """Make ``channel``'s ids run AHEAD_MS ahead of Redis's clock; returns the ids published."""
    first = await bus.publish_message(channel, body(channel, "first"))  # makes the epoch
    ahead = f"{parse_id(first)[0] + AHEAD_MS}-0"
    await admin(server, "xadd", f"broadcast:history:{channel}", {"m": b"{}"}, id=ahead)
    return [first, *await publish(bus, channel, 3, "ahead")]


async def restart_empty(server: RedisServer, *buses: RedisBus) -> None:
    server.stop()
    with trio.fail_after(WAIT):
        for bus in buses:
            await bus.wait_ready(False)
    server.start()
    with trio.fail_after(2 * WAIT):
        for bus in buses:
            await bus.wait_ready()


async def test_a_redis_back_empty_with_its_clock_behind_drops_no_new_message(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    """The loss of issue 14: without epochs every gateway took the new, lower ids for messages
    it had delivered already, and dropped them all."""
    publisher, _ = await start_bus()
    listeners = [await start_bus() for _ in range(2)]
    for bus, _ in listeners:
        await bus.subscribe("general")
    before = await run_ahead(redis_server, publisher, "general")
    for _, recorder in listeners:
        assert message_ids(await recorder.wait_for("general", 4)) == before
    old_epoch = payload_epoch((await recorder.wait_for("general", 4))[-1])
    assert old_epoch is not None

    await restart_empty(redis_server, publisher, *(bus for bus, _ in listeners))
    after = await publish(publisher, "general", 20, "after")
    assert parse_id(after[-1]) < parse_id(before[-1])  # the new ids are behind the old
    for bus, recorder in listeners:
        delivered = await recorder.wait_for("general", 4 + 1 + 20)
        # What the old Redis held and this gateway had not received is unknowable: a gap notice.
        assert delivered[4] == gap_payload("general")
        assert message_ids(delivered[:4]) == before and message_ids(delivered[5:]) == after
        new_epoch = {payload_epoch(payload) for payload in delivered[5:]}
        assert len(new_epoch) == 1 and old_epoch not in new_epoch
        assert (bus.gaps, bus.resets, bus.duplicates) == (1, 1, 0)


async def test_messages_of_a_new_epoch_published_during_the_refill_are_delivered(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    """Published while the listener is still away: its refill finds the new epoch and delivers
    its history from the start, then the live ones, each once."""
    publisher, _ = await start_bus()
    listener, recorder = await start_bus()
    await listener.subscribe("general")
    before = await run_ahead(redis_server, publisher, "general")
    await recorder.wait_for("general", 4)
    redis_server.stop()
    with trio.fail_after(WAIT):
        await listener.wait_ready(False)
    # Keep the listener away (its reconnect lacks the password) while the publisher, started
    # on the new Redis, publishes in the new epoch.
    redis_server.password = "later"
    redis_server.start()
    new_publisher = RedisBus(redis_server.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(new_publisher.run, Recorder().deliver)
        missed = await publish(new_publisher, "general", 5, "missed")
        await admin(redis_server, "config_set", "requirepass", "")
        redis_server.password = None
        with trio.fail_after(2 * WAIT):
            await listener.wait_ready()
        live = await publish(new_publisher, "general", 5, "live")
        delivered = await recorder.wait_for("general", 4 + 1 + 10)
        assert message_ids(delivered[:4]) == before
        assert delivered[4] == gap_payload("general")
        assert message_ids(delivered[5:]) == missed + live
        assert (listener.resets, listener.refilled, listener.duplicates) == (1, 5, 0)
        nursery.cancel_scope.cancel()


async def test_a_client_resuming_across_the_restart_gets_a_reset(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, _ = await start_bus()
    before = await run_ahead(redis_server, bus, "general")
    old = await bus.history("general", after=before[1])
    assert (old.messages, old.complete, old.reset) == (old.messages, True, False)
    assert message_ids(old.messages) == before[2:] and old.epoch

    await restart_empty(redis_server, bus)
    empty = await bus.history("general", after=before[-1], epoch=old.epoch)
    assert (empty.messages, empty.complete, empty.epoch, empty.reset) == ([], False, "", True)
    after = await publish(bus, "general", 5, "after")
    history = await bus.history("general", after=before[-1], epoch=old.epoch)
    assert message_ids(history.messages) == after  # the whole new epoch, from its start
    assert history.reset and not history.complete  # the old Redis's tail may be lost
    assert history.epoch not in ("", old.epoch)
    assert all(payload_epoch(payload) == history.epoch.encode() for payload in history.messages)
    # In the current epoch, ids compare as always.
    same = await bus.history("general", after=after[1], epoch=history.epoch)
    assert (message_ids(same.messages), same.complete, same.reset) == (after[2:], True, False)
    # A client that does not send its epoch cannot be told: its id looks newer than everything.
    blind = await bus.history("general", after=before[-1])
    assert (blind.messages, blind.complete, blind.reset) == ([], False, False)
    # The limit still bounds a reset.
    cut = await bus.history("general", after=before[-1], epoch=old.epoch, limit=2)
    assert (message_ids(cut.messages), cut.complete, cut.reset) == (after[-2:], False, True)


async def test_an_epoch_outlives_its_expired_stream(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    """A stream that merely expired keeps its epoch: its ids go on increasing, and a resuming
    client reads "incomplete", not "restarted"."""
    bus, _ = await start_bus(history_max_age=0.2)
    first = await bus.publish_message("general", body("general", "first"))
    epoch = (await bus.history("general")).epoch
    assert 86_000_000 < await admin(redis_server, "pttl", "broadcast:epoch:general") <= 86_400_000
    await admin(redis_server, "delete", "broadcast:history:general")  # as its expiry would
    second = await bus.publish_message("general", body("general", "second"))
    history = await bus.history("general", after=first, epoch=epoch)
    assert (message_ids(history.messages), history.epoch, history.reset) == ([second], epoch, False)


async def test_a_lost_epoch_key_starts_a_new_epoch_and_keeps_the_stream(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, recorder = await start_bus()
    await bus.subscribe("general")
    first = await bus.publish_message("general", body("general", "first"))
    old = (await bus.history("general")).epoch
    await admin(redis_server, "delete", "broadcast:epoch:general")
    second = await bus.publish_message("general", body("general", "second"))
    delivered = await recorder.wait_for("general", 2)
    new = payload_epoch(delivered[1])
    assert new is not None and new.decode() != old and payload_epoch(delivered[0]) == old.encode()
    history = await bus.history("general", after=first, epoch=old)
    assert message_ids(history.messages) == [first, second] and history.reset


# -- MemoryBus: one epoch per process ---------------------------------------------------------


async def test_memory_epochs_are_per_process_and_a_reset_is_complete_when_nothing_was_trimmed(
    nursery: trio.Nursery,
) -> None:
    old = MemoryBus()
    old_id = await old.publish_message("general", body("general", "old"))
    assert (await old.history("general")).epoch == old.epoch
    new = MemoryBus(history_length=3)  # the process restarted
    assert new.epoch != old.epoch and len(new.epoch) == 16
    empty = await new.history("general", after=old_id, epoch=old.epoch)
    assert (empty.messages, empty.complete, empty.epoch, empty.reset) == ([], True, new.epoch, True)
    ids = [await new.publish_message("general", body("general", f"m{i}")) for i in range(3)]
    whole = await new.history("general", after=old_id, epoch=old.epoch)
    assert (message_ids(whole.messages), whole.complete, whole.reset) == (ids, True, True)
    payload = message_payload(ids[0], body("general", "m0"), new.epoch)
    assert whole.messages[0] == payload and json.loads(payload)["epoch"] == new.epoch
    await new.publish_message("general", body("general", "trims m0"))
    trimmed = await new.history("general", after=old_id, epoch=old.epoch)
    assert (len(trimmed.messages), trimmed.complete, trimmed.reset) == (3, False, True)
    same = await new.history("general", after=ids[1], epoch=new.epoch)
    assert (len(same.messages), same.complete, same.reset) == (2, True, False)
    # Without ``after`` the reset is only told; ``last`` works as always.
    told = await new.history("general", last=1, epoch=old.epoch)
    assert (len(told.messages), told.complete, told.reset) == (1, True, True)


# -- the continuity tracker and epochs (sans-IO) ----------------------------------------------


def message(ms: int, epoch: str, seq: int = 0) -> bytes:
    return message_payload(f"{ms}-{seq}", body("general", f"{ms}-{seq}"), epoch)


def test_after_a_refill_only_ids_of_the_same_epoch_can_be_duplicates() -> None:
    continuity = Continuity()
    assert continuity.admit("general", message(9, "e1"))
    assert continuity.epoch("general") == b"e1"
    (fill,) = continuity.begin(["general"])
    assert (fill.after, fill.epoch) == ((9, 0), b"e1")
    batch, done = continuity.finish(fill, [message(10, "e1")], gap=False)
    assert done and [payload for _, payload in batch] == [message(10, "e1")]
    assert not continuity.admit("general", message(10, "e1"))  # a live copy: dropped
    assert continuity.admit("general", message(1, "e2"))  # a new epoch: never "already seen"
    assert continuity.last("general") == (1, 0) and continuity.epoch("general") == b"e2"
    assert continuity.duplicates == 1


def test_a_reset_refill_delivers_the_new_epoch_from_its_start() -> None:
    continuity = Continuity()
    continuity.admit("general", message(9, "e1"))
    (fill,) = continuity.begin(["general"])
    assert not continuity.admit("general", message(3, "e2"))  # held during the fill
    new_history = [message(1, "e2"), message(2, "e2")]
    batch, done = continuity.finish(fill, new_history, gap=True, reset=True, epoch=b"e2")
    assert done and [payload for _, payload in batch] == [
        gap_payload("general"),
        *new_history,
        message(3, "e2"),
    ]
    assert (continuity.last("general"), continuity.epoch("general")) == ((3, 0), b"e2")
    assert not continuity.admit("general", message(2, "e2"))  # a live copy of a refilled one
    assert continuity.resets == 1


def test_a_reset_to_no_epoch_yet_takes_the_next_epoch_whole() -> None:
    """Redis came back empty and nothing was published yet: the read finds no epoch."""
    continuity = Continuity()
    continuity.admit("general", message(9, "e1"))
    (fill,) = continuity.begin(["general"])
    assert not continuity.admit("general", message(1, "e2"))  # published after the read
    batch, _ = continuity.finish(fill, [], gap=True, reset=True, epoch=None)
    assert [payload for _, payload in batch] == [gap_payload("general"), message(1, "e2")]
    assert continuity.admit("general", message(2, "e2"))


@pytest.mark.parametrize("epoch", ["", "e1"])
def test_payload_epochs_are_read_from_their_place(epoch: str) -> None:
    payload = message(5, epoch)
    assert payload_epoch(payload) == (epoch.encode() or None)
    assert payload_epoch(b'{"type":"message","id":"1-0","epoch":"' + b"x" * 65 + b'"}') is None
