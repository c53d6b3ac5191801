"""RedisBus against a real redis-server that tests stop, freeze, restart and meddle with."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from broadcast.bus.base import BusUnavailable
from broadcast.bus.continuity import Continuity
from broadcast.bus.redis_bus import RedisBus
from broadcast.protocol.envelope import event_payload, message_payload, parse_id
from broadcast.protocol.ids import gap_payload, payload_message_id
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until
from tests.test_bus_contract import WAIT, Recorder, body

StartBus = Callable[..., Awaitable[tuple[RedisBus, Recorder]]]


@pytest.fixture
async def start_bus(redis_server: RedisServer, nursery: trio.Nursery) -> StartBus:
    """Starts a RedisBus (options as keywords; ``url`` defaults to the test's server)."""

    async def start(url: str | None = None, **options: Any) -> tuple[RedisBus, Recorder]:
        bus = RedisBus(url or redis_server.url, **options)
        recorder = Recorder()
        with trio.fail_after(WAIT):
            await nursery.start(bus.run, recorder.deliver)
        return bus, recorder

    return start


async def admin(server: RedisServer, method: str, *args: Any, **kwargs: Any) -> Any:
    """One redis-py call, off the trio thread."""
    return await trio.to_thread.run_sync(lambda: getattr(server.client(), method)(*args, **kwargs))


async def test_redis_down_fails_fast_then_heals_with_its_channels(
    redis_server: RedisServer, start_bus: StartBus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broadcast.bus.redis")
    bus, recorder = await start_bus(command_timeout=1.0)
    await bus.subscribe("general")
    assert bus.ready

    redis_server.stop()
    with trio.fail_after(WAIT):
        await bus.wait_ready(False)
    started = trio.current_time()
    with pytest.raises(BusUnavailable):
        await bus.publish_message("general", body("general", "not accepted"))
    with pytest.raises(BusUnavailable):
        await bus.publish_event("general", event_payload("join", "general", "x", 1.0, "gw/1"))
    assert trio.current_time() - started < 1.0  # at once, not after the command timeout
    with trio.fail_after(WAIT):
        await bus.subscribe("later")  # while down: remembered for the next connection

    redis_server.start()
    with trio.fail_after(2 * WAIT):
        await bus.wait_ready()
    assert bus.reconnects == 2  # the publisher and the subscriber
    assert bus.channels == {"general", "later"}
    for channel in ("general", "later"):
        await bus.publish_message(channel, body(channel, "back"))
        (payload,) = await recorder.wait_for(channel, 1)
        assert json.loads(payload)["text"] == "back"
    assert "redis subscriber connection lost (" in caplog.text
    assert "resubscribed 2 channels" in caplog.text


async def test_starting_while_redis_is_down(redis_server: RedisServer, start_bus: StartBus) -> None:
    redis_server.stop()
    bus, recorder = await start_bus()  # started() promptly, not ready
    assert not bus.ready
    with pytest.raises(BusUnavailable):
        await bus.publish_message("general", body("general", "too early"))
    await bus.subscribe("general")

    redis_server.start()
    with trio.fail_after(2 * WAIT):
        await bus.wait_ready()
    assert bus.reconnects == 0  # first connections, not reconnections
    message_id = await bus.publish_message("general", body("general", "hello"))
    (payload,) = await recorder.wait_for("general", 1)
    assert json.loads(payload)["id"] == message_id


async def test_a_killed_subscriber_is_detected_and_healed(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, recorder = await start_bus()
    await bus.subscribe("general")
    assert await admin(redis_server, "client_kill_filter", _type="pubsub") == 1

    with trio.fail_after(WAIT):
        # Reconnecting takes network round trips, so the unready spell cannot be missed.
        await bus.wait_ready(False)
        await bus.wait_ready()
    assert bus.reconnects == 1
    numsub = await admin(redis_server, "pubsub_numsub", "broadcast:channel:general")
    assert numsub == [(b"broadcast:channel:general", 1)]
    await bus.publish_message("general", body("general", "after the kill"))
    await recorder.wait_for("general", 1)


async def test_a_frozen_redis_is_detected_and_healed(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, recorder = await start_bus(command_timeout=0.5, ping_interval=0.2)
    await bus.subscribe("general")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        with trio.fail_after(WAIT):
            await bus.wait_ready(False)  # PINGs go unanswered
        with trio.fail_after(WAIT), pytest.raises(BusUnavailable):
            await bus.publish_message("general", body("general", "frozen"))
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    with trio.fail_after(2 * WAIT):
        await bus.wait_ready()
    await bus.publish_message("general", body("general", "thawed"))
    payloads = await recorder.wait_for("general", 1)
    assert json.loads(payloads[-1])["text"] == "thawed"


async def test_the_history_stream_is_capped(redis_server: RedisServer, start_bus: StartBus) -> None:
    bus, _ = await start_bus(history_length=50)
    returned: list[tuple[str, bytes]] = []

    async def publish(number: int) -> None:
        for i in range(100):
            sent = body("general", f"{number}:{i}")
            returned.append((await bus.publish_message("general", sent), sent))

    async with trio.open_nursery() as publishing:
        for number in range(10):
            publishing.start_soon(publish, number)

    key = "broadcast:history:general"
    length = await admin(redis_server, "xlen", key)
    assert 50 <= length <= 50 + 100  # MAXLEN ~ trims whole stream nodes (100 entries each)
    ((newest_id, fields),) = await admin(redis_server, "xrevrange", key, "+", "-", 1)
    last_id, last_body = max(returned, key=lambda item: parse_id(item[0]))
    assert (newest_id.decode(), fields) == (last_id, {b"m": last_body})


async def test_a_flushed_script_cache_is_loaded_again(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, recorder = await start_bus()
    await bus.subscribe("general")
    ids = [await bus.publish_message("general", body("general", "before"))]
    await admin(redis_server, "script_flush")
    ids += [await bus.publish_message("general", body("general", f"after {i}")) for i in range(2)]
    assert parse_id(ids[0]) < parse_id(ids[1]) < parse_id(ids[2])
    payloads = await recorder.wait_for("general", 3)
    assert [json.loads(payload)["id"] for payload in payloads] == ids


async def test_a_refused_publish_fails_alone(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, _ = await start_bus()
    await admin(redis_server, "set", "broadcast:history:broken", "not a stream")
    accepted: list[str] = []

    async def good() -> None:
        accepted.append(await bus.publish_message("general", body("general", "fine")))

    async def bad() -> None:
        with pytest.raises(BusUnavailable, match="WRONGTYPE"):
            await bus.publish_message("broken", body("broken", "refused"))

    async with trio.open_nursery() as publishing:  # likely in one pipelined batch
        for i in range(20):
            publishing.start_soon(bad if i % 5 == 0 else good)
    assert len(accepted) == 16
    assert bus.ready and bus.reconnects == 0


async def test_monitor_shows_readable_json(redis_server: RedisServer, start_bus: StartBus) -> None:
    bus, _ = await start_bus()
    argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(redis_server.port), "monitor"]
    monitor = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    assert monitor.stdout is not None
    try:
        seen = b""
        with trio.fail_after(WAIT):
            while b"OK\n" not in seen:
                seen += await monitor.stdout.receive_some()
            sent = body("general", "hello monitor")
            message_id = await bus.publish_message("general", sent)
            while b'"PUBLISH"' not in seen or not seen.endswith(b"\n"):
                seen += await monitor.stdout.receive_some()
    finally:
        monitor.kill()
        await monitor.wait()
    lines = seen.decode().splitlines()
    (evalsha,) = [line for line in lines if '"EVALSHA"' in line]
    keys = '"2" "broadcast:history:general" "broadcast:epoch:general" "broadcast:channel:general"'
    assert f'{keys} "1000" "3600000" "86400000"' in evalsha
    # The channel's first message makes its epoch (Redis's TIME in hex, the gateway's tag).
    epoch = (await admin(redis_server, "get", "broadcast:epoch:general")).decode()
    assert len(epoch) == 17 and f'"86400000" "{epoch[-4:]}" ' in evalsha
    (make_epoch,) = [line for line in lines if '"SET"' in line]
    assert make_epoch.endswith(f'"SET" "broadcast:epoch:general" "{epoch}" "PX" "86400000"')
    # The first message of a millisecond also trims by age and renews the expiries (an hour for
    # the history, a day for the epoch).
    (trim,) = [line for line in lines if '"XTRIM"' in line]
    oldest = int(trim.rsplit('"MINID" "~" ', 1)[1].strip('"'))
    assert oldest == parse_id(message_id)[0] - 3_600_000 and "[0 lua]" in trim
    expires = [line.split('"PEXPIRE" ', 1)[1] for line in lines if '"PEXPIRE"' in line]
    assert expires == [
        '"broadcast:history:general" "3600000"',
        '"broadcast:epoch:general" "86400000"',
    ]
    (publish,) = [line for line in lines if '"PUBLISH"' in line]
    assert "[0 lua]" in publish
    quoted = publish.split('"PUBLISH" "broadcast:channel:general" ', 1)[1]
    assert quoted.startswith('"{\\"type\\":\\"message\\",\\"id\\":\\"')
    payload = quoted[1:-1].replace('\\"', '"').encode()  # redis-cli escapes only the quotes here
    assert payload == message_payload(message_id, sent, epoch)


async def test_the_password_stays_out_of_names_and_logs(
    start_bus: StartBus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="broadcast.bus.redis")
    server = RedisServer(password="right-horse-battery")
    server.start()
    try:
        wrong = server.url.replace("right-horse", "wrong-horse")
        bus, _ = await start_bus(wrong)
        assert not bus.ready
        assert "WRONGPASS" in caplog.text
        right, _ = await start_bus(server.url)
        assert right.ready
        await right.publish_message("general", body("general", "authenticated"))
    finally:
        server.close()
    for text in (bus.name, right.name, caplog.text):
        assert "horse" not in text


# -- gapless delivery across subscriber reconnects -------------------------------------------

KEY = "broadcast:history:general"
LOCK = "locked-out"


def message_ids(payloads: list[bytes]) -> list[str]:
    return [json.loads(payload)["id"] for payload in payloads]


async def publish(bus: RedisBus, channel: str, count: int, text: str = "m") -> list[str]:
    return [await bus.publish_message(channel, body(channel, f"{text}{i}")) for i in range(count)]


@contextlib.asynccontextmanager
async def subscriber_locked_out(server: RedisServer, bus: RedisBus) -> AsyncIterator[Any]:
    """Kill ``bus``'s subscription and keep it from coming back until the block ends: Redis
    is given a password, which new connections lack while existing ones (every publisher)
    stay authenticated. Yields a redis-py client that stays usable meanwhile."""
    held = server.client()
    await trio.to_thread.run_sync(held.ping)
    await trio.to_thread.run_sync(held.config_set, "requirepass", LOCK)
    try:
        assert await trio.to_thread.run_sync(lambda: held.client_kill_filter(_type="pubsub")) == 1
        with trio.fail_after(WAIT):
            await bus.wait_ready(False)
        yield held
    finally:
        await trio.to_thread.run_sync(held.config_set, "requirepass", "")


async def test_a_killed_subscriber_misses_nothing_while_others_publish(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, recorder = await start_bus()
    other, _ = await start_bus()
    await bus.subscribe("general")
    published: list[str] = []
    stop = trio.Event()

    async def keep_publishing() -> None:
        while not stop.is_set():
            published.append(await other.publish_message("general", body("general", "m")))
            # Paced (not a synchronisation): unpaced, one publisher makes ~10,000 messages/s,
            # so a reconnect (up to 0.1 s of backoff jitter) may miss more than the history
            # keeps, which is a gap (tested below), not what this test is about.
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_publishing)
        await recorder.wait_for("general", 20)
        assert await admin(redis_server, "client_kill_filter", _type="pubsub") == 1
        with trio.fail_after(WAIT):
            await bus.wait_ready(False)
            await bus.wait_ready()
        await recorder.wait_for("general", len(published) + 20)  # and on after the reconnect
        stop.set()
    delivered = await recorder.wait_for("general", len(published))
    assert message_ids(delivered) == published  # each once, in order: none lost, none twice
    assert (bus.reconnects, bus.gaps) == (1, 0)


async def test_what_is_published_while_the_subscriber_is_away_is_refilled(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    bus, recorder = await start_bus()
    other, _ = await start_bus()
    await bus.subscribe("general")
    await bus.subscribe("fresh")  # nothing delivered before the outage: refilled from subscribe
    await wait_until(lambda: bus.last_delivered("fresh") == "0-0")  # read in the background
    before = await publish(other, "general", 3)
    await recorder.wait_for("general", 3)
    async with subscriber_locked_out(redis_server, bus):
        missed = {channel: await publish(other, channel, 30) for channel in ("general", "fresh")}
        # Notices have no id and no history: at most once, so this one is lost.
        await other.publish_event("general", event_payload("join", "general", "x", 1.0, "gw/1"))
    with trio.fail_after(2 * WAIT):
        await bus.wait_ready()
    assert bus.refilled == 60
    live = {channel: await publish(other, channel, 3, "live") for channel in ("general", "fresh")}
    expected = {"general": before + missed["general"] + live["general"]}
    expected["fresh"] = missed["fresh"] + live["fresh"]
    for channel, ids in expected.items():
        assert message_ids(await recorder.wait_for(channel, len(ids))) == ids
    assert (bus.reconnects, bus.gaps) == (1, 0)


async def test_a_history_trimmed_during_the_outage_delivers_a_gap(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    await admin(redis_server, "config_set", "stream-node-max-entries", 5)  # small trims
    bus, recorder = await start_bus()
    other, _ = await start_bus(history_length=10)
    await bus.subscribe("general")
    before = await publish(other, "general", 3)
    await recorder.wait_for("general", 3)
    async with subscriber_locked_out(redis_server, bus) as held:
        await publish(other, "general", 50)
        entries = await trio.to_thread.run_sync(held.xrange, KEY)
    kept = [entry_id.decode() for entry_id, _ in entries]
    assert 10 <= len(kept) < 50
    with trio.fail_after(2 * WAIT):
        await bus.wait_ready()
    live = await publish(other, "general", 2, "live")
    delivered = await recorder.wait_for("general", 3 + 1 + len(kept) + 2)
    assert message_ids(delivered[:3]) == before
    assert delivered[3] == gap_payload("general") == b'{"type":"gap","channel":"general"}'
    assert message_ids(delivered[4:]) == kept + live
    assert bus.gaps == 1


async def test_a_redis_restart_without_its_data_delivers_a_gap_and_no_duplicates(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    """Redis restarted empty: the stream is gone, so what this gateway may have missed just
    before the restart cannot be told from nothing. Channels that had messages get a gap
    notice; a channel that never had any has nothing to lose and gets none."""
    bus, recorder = await start_bus()
    await bus.subscribe("general")
    await bus.subscribe("quiet")
    before = await publish(bus, "general", 5)
    await recorder.wait_for("general", 5)
    redis_server.stop()
    with trio.fail_after(WAIT):
        await bus.wait_ready(False)
    redis_server.start()
    with trio.fail_after(2 * WAIT):
        await bus.wait_ready()
    after = await publish(bus, "general", 5, "after")
    await bus.publish_message("quiet", body("quiet", "first"))
    delivered = await recorder.wait_for("general", 11)
    assert message_ids(delivered[:5]) == before
    assert delivered[5] == gap_payload("general")
    assert message_ids(delivered[6:]) == after
    ids = [parse_id(message_id) for message_id in before + after]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    (quiet,) = await recorder.wait_for("quiet", 1)
    assert json.loads(quiet)["text"] == "first"
    assert bus.gaps == 1


async def test_a_stream_that_expired_while_quiet_is_no_gap(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    """Nothing a subscriber that listened until moments ago can have missed was in a stream
    that expired (no message for the max age), so its absence is not reported as a loss."""
    # The PINGs keep "last heard from Redis" recent, as the default interval does for an hour's
    # history; the margins (~0.3 s of outage against 1 s of age) hold on a loaded machine.
    bus, recorder = await start_bus(history_max_age=1.0, ping_interval=0.1)
    await bus.subscribe("general")
    first = await bus.publish_message("general", body("general", "first"))
    await recorder.wait_for("general", 1)
    with trio.fail_after(WAIT):
        while await admin(redis_server, "exists", KEY):  # noqa: ASYNC110 - Redis expires it
            await trio.sleep(0.01)  # on its own: there is nothing to wait on but the key
    assert await admin(redis_server, "client_kill_filter", _type="pubsub") == 1
    with trio.fail_after(WAIT):
        await bus.wait_ready(False)
        await bus.wait_ready()
    second = await bus.publish_message("general", body("general", "second"))
    assert message_ids(await recorder.wait_for("general", 2)) == [first, second]
    assert bus.gaps == 0


# -- the continuity tracker on its own (sans-IO) ------------------------------------------------


def message(ms: int, seq: int = 0, channel: str = "general") -> bytes:
    return message_payload(f"{ms}-{seq}", body(channel, f"{ms}-{seq}"))


JOIN = event_payload("join", "general", "bob", 1.0, "gw-b/3")


def test_payload_ids_are_read_from_the_prefix() -> None:
    assert payload_message_id(message(1732435200123, 7)) == (1732435200123, 7)
    for payload in (JOIN, b'{"type":"message","id":"12', b'{"type":"message","id":"x-1"}', b""):
        assert payload_message_id(payload) is None


def test_gap_payload_escapes_the_channel() -> None:
    assert json.loads(gap_payload('a"b\\é')) == {"type": "gap", "channel": 'a"b\\é'}


def test_live_duplicates_of_refilled_messages_are_dropped() -> None:
    continuity = Continuity()
    continuity.track("general", (1, 0))
    (fill,) = continuity.begin(["general"])
    batch, _ = continuity.finish(fill, [message(2), message(3)], gap=False)
    assert [payload for _, payload in batch] == [message(2), message(3)]
    # Live copies of what the refill delivered may still arrive on the new subscription.
    admitted = [
        continuity.admit("general", payload)
        for payload in (message(2), JOIN, message(3), message(4), JOIN, message(5))
    ]
    assert admitted == [False, True, False, True, True, True]
    assert continuity.duplicates == 2 and continuity.last("general") == (5, 0)
    # Past the refilled ids, Redis's per-channel order is trusted: no comparison per message.
    assert continuity.admit("general", message(3))


def test_a_refill_comes_before_what_was_held_without_duplicates() -> None:
    continuity = Continuity()
    continuity.track("general", None)  # unknown until the first message
    assert continuity.admit("general", message(1))
    (fill,) = continuity.begin(["general", "untracked"])
    held = [message(3), JOIN, message(4)]
    assert not any(continuity.admit("general", payload) for payload in held)
    assert continuity.held_bytes == sum(map(len, held))
    batch, done = continuity.finish(fill, [message(2), message(3)], gap=False)
    assert done and continuity.held_bytes == 0 and not continuity.filling
    assert continuity.last("general") == (4, 0)
    assert [payload for _, payload in batch] == [message(2), message(3), JOIN, message(4)]
    assert not continuity.admit("general", message(4)) and continuity.admit("general", message(5))
    assert (continuity.refilled, continuity.duplicates) == (2, 2)


def test_a_gap_goes_where_the_lost_messages_were() -> None:
    continuity = Continuity()
    continuity.track("general", (1, 0))
    (fill,) = continuity.begin(["general"])
    continuity.admit("general", message(9))
    batch, done = continuity.finish(fill, [message(7), message(8)], gap=True)
    assert done and [payload for _, payload in batch] == [
        gap_payload("general"),
        message(7),
        message(8),
        message(9),
    ]
    assert continuity.gaps == 1


def test_an_overflowing_hold_is_read_again_from_the_history() -> None:
    continuity = Continuity(hold_limit_bytes=2 * len(message(10)))
    continuity.track("general", (1, 0))
    (fill,) = continuity.begin(["general"])
    for ms in (3, 4, 5):  # the third does not fit: the hold is dropped, 5 remembered
        continuity.admit("general", message(ms))
    assert continuity.held_bytes == 0
    batch, done = continuity.finish(fill, [message(2), message(3)], gap=False, final=False)
    assert not done and fill.after == (3, 0)  # 4 and 5 were dropped: read again after 3
    continuity.admit("general", message(6))  # held again, in the budget
    batch, done = continuity.finish(fill, [message(4), message(5), message(6)], gap=False)
    assert done and [payload for _, payload in batch] == [message(4), message(5), message(6)]
    assert continuity.gaps == 0 and continuity.last("general") == (6, 0)


def test_an_overflow_the_last_read_did_not_reach_is_a_gap() -> None:
    continuity = Continuity(hold_limit_bytes=1)
    continuity.track("general", (1, 0))
    (fill,) = continuity.begin(["general"])
    continuity.admit("general", message(5))
    batch, done = continuity.finish(fill, [message(2)], gap=False, final=True)
    assert done and [payload for _, payload in batch] == [message(2), gap_payload("general")]
    assert continuity.admit("general", message(6))


def test_an_overflow_the_read_covered_is_no_gap() -> None:
    continuity = Continuity(hold_limit_bytes=1)
    continuity.track("general", (1, 0))
    (fill,) = continuity.begin(["general"])
    continuity.admit("general", message(2))
    batch, done = continuity.finish(fill, [message(2), message(3)], gap=False, final=True)
    assert done and [payload for _, payload in batch] == [message(2), message(3)]


def test_a_fill_of_a_forgotten_or_lost_subscription_delivers_nothing() -> None:
    continuity = Continuity()
    continuity.track("general", (1, 0))
    continuity.track("other", (1, 0))
    fills = continuity.begin(["general", "other"])
    continuity.admit("general", message(3))
    continuity.forget("general")
    assert continuity.finish(fills[0], [message(2)], gap=True) == ([], True)
    continuity.abandon()  # the connection was lost
    assert continuity.finish(fills[1], [message(2)], gap=True) == ([], True)
    assert continuity.held_bytes == 0 and continuity.last("general") is None
    assert continuity.last("other") == (1, 0)
    (again,) = continuity.begin(["other"])  # the next connection starts over from the last id
    assert again.after == (1, 0)


def test_a_connection_lost_between_reads_resumes_where_the_refill_got() -> None:
    continuity = Continuity(hold_limit_bytes=1)
    continuity.track("general", (1, 0))
    (fill,) = continuity.begin(["general"])
    continuity.admit("general", message(9))  # overflows: another read will be needed
    batch, done = continuity.finish(fill, [message(2), message(3)], gap=False, final=False)
    assert not done and len(batch) == 2
    continuity.abandon()
    (again,) = continuity.begin(["general"])
    assert again.after == (3, 0)  # not (1, 0): 2 and 3 were delivered already


def test_a_foreign_payload_with_a_bad_id_does_not_break_tracking() -> None:
    continuity = Continuity()
    continuity.track("general", (1, 0))
    assert continuity.admit("general", b'{"type":"message","id":"oops","text":"?"}')
    assert continuity.last("general") is None  # unknown again: no refill rather than a crash
    assert continuity.begin(["general"]) == []


async def test_a_primary_demoted_behind_our_back_is_left(
    redis_server: RedisServer, start_bus: StartBus
) -> None:
    """``REPLICAOF`` turns our Redis into a replica: writes answer READONLY. The publish fails
    (not acknowledged) and the publisher drops the connection to look for the primary again,
    rather than staying on a server that refuses every write."""
    bus, _ = await start_bus()
    await bus.publish_message("general", body("general", "before"))
    other = RedisServer()
    other.start()
    try:
        await admin(redis_server, "replicaof", "127.0.0.1", other.port)
        with pytest.raises(BusUnavailable, match="read-only"):
            await bus.publish_message("general", body("general", "refused"))
        with trio.fail_after(WAIT):
            await bus.wait_ready(False)
        await admin(redis_server, "replicaof", "no", "one")
        with trio.fail_after(2 * WAIT):
            await bus.wait_ready()
        await bus.publish_message("general", body("general", "after"))
        assert bus.reconnects >= 1
    finally:
        other.close()
