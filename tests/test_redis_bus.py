"""RedisBus against a real redis-server that tests stop, freeze, restart and meddle with."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from broadcast.bus.base import BusUnavailable
from broadcast.bus.redis_bus import RedisBus
from broadcast.protocol.envelope import event_payload, message_payload, parse_id
from tests.support.redis_server import RedisServer
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
    assert "redis connection lost (subscriber:" in caplog.text
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
    assert '"1" "broadcast:history:general" "broadcast:channel:general" "1000"' in evalsha
    (publish,) = [line for line in lines if '"PUBLISH"' in line]
    assert "[0 lua]" in publish
    quoted = publish.split('"PUBLISH" "broadcast:channel:general" ', 1)[1]
    assert quoted.startswith('"{\\"type\\":\\"message\\",\\"id\\":\\"')
    payload = quoted[1:-1].replace('\\"', '"').encode()  # redis-cli escapes only the quotes here
    assert payload == message_payload(message_id, sent)


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
