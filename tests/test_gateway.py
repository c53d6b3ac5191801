"""One gateway in the test's own trio run, on a real port, over each bus.

Behaviour every bus must give the same way; cluster behaviour lives in test_cluster.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

from broadcast.bus.memory import MemoryBus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.server import Gateway
from broadcast.protocol.envelope import parse_id
from broadcast.protocol.limits import (
    MAX_FRAME_BYTES,
    MAX_LINE_BYTES,
    MAX_TEXT_BYTES,
    OUTBOX_LIMIT_BYTES,
)
from tests.support.clients import WAIT_SECONDS, line_client, ws_client
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until


def _make_bus(kind: str, request: pytest.FixtureRequest):
    if kind == "memory":
        return MemoryBus()
    from broadcast.bus.redis_bus import RedisBus

    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisBus(server.url)


@pytest.fixture(params=["memory", "redis"])
async def gateway(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[Gateway]:
    bus = _make_bus(request.param, request)
    # No rate limit here: some tests publish in bursts (rate limiting: test_gateway_faults.py).
    access = AccessPolicy(message_rate=0)
    gateway = await nursery.start(Gateway(bus, node_id="gw-test", access=access).run)
    await wait_until(lambda: gateway.ready)
    yield gateway
    nursery.cancel_scope.cancel()


def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/"


async def test_two_websocket_clients_see_each_other_but_not_themselves(gateway: Gateway) -> None:
    async with (
        ws_client(url(gateway), name="alice") as alice,
        ws_client(url(gateway), name="bob") as bob,
    ):
        diff = await alice.expect("presence_diff", skip=("presence",))
        assert "bob" in diff["joined"] and diff["left"] == []
        first = await alice.publish("hello bob")
        second = await bob.publish("hello alice")
        got_by_bob = await bob.expect("message")
        got_by_alice = await alice.expect("message")
        assert (got_by_bob["sender"], got_by_bob["text"], got_by_bob["id"]) == (
            "alice",
            "hello bob",
            first,
        )
        assert (got_by_alice["sender"], got_by_alice["text"], got_by_alice["id"]) == (
            "bob",
            "hello alice",
            second,
        )
        assert parse_id(second) > parse_id(first)
        # Neither saw its own message: a ping answered next proves nothing else is queued.
        for client in (alice, bob):
            await client.send_json({"type": "ping"})
            assert (await client.expect("pong", skip=("presence",))) == {"type": "pong"}


async def test_echo_asks_for_own_messages(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="me", echo="1") as me:
        message_id = await me.publish("to myself")
        event = await me.expect("message")
        assert (event["id"], event["text"]) == (message_id, "to myself")


async def test_line_and_websocket_clients_on_one_port_see_each_other(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="web") as web, line_client(gateway.port) as nc:
        await nc.send_line("/name terminal")
        assert await nc.line() == "* you are now terminal"
        await nc.send_line("hello from nc")
        event = await web.expect("message")
        assert (event["sender"], event["text"]) == ("terminal", "hello from nc")
        await web.publish("hello from the web")
        assert await nc.line_not_starting("* ") == "web: hello from the web"


async def test_plain_text_frame_is_published_as_text(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="a") as a, ws_client(url(gateway), name="b") as b:
        await a.ws.send_message("just words, no JSON")
        ack = await a.expect("ack")
        event = await b.expect("message")
        assert (event["text"], event["id"]) == ("just words, no JSON", ack["id"])


async def test_clients_in_other_channels_hear_nothing(gateway: Gateway) -> None:
    async with (
        ws_client(url(gateway), name="a", channel="one") as a,
        ws_client(url(gateway), name="b", channel="two") as b,
        ws_client(url(gateway), name="c", channel="one") as c,
    ):
        await a.publish("for one")
        assert (await c.expect("message"))["text"] == "for one"
        await b.send_json({"type": "ping"})
        assert (await b.expect("pong", skip=("presence",)))["type"] == "pong"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_command"),  # not starting with { : published as text? no: see below
        ('{"type": "shout", "text": "x"}', "bad_command"),
        ('{"type": "publish"}', "bad_text"),
        ('{"type": "publish", "text": "bell\\u0007"}', "bad_text"),
        ('{"type": "publish", "text": "' + "x" * (MAX_TEXT_BYTES + 1) + '"}', "text_too_long"),
        ('{"type": "hello", "name": ""}', "bad_name"),
        ('{"type": "hello", "channel": "no spaces"}', "bad_channel"),
    ],
)
async def test_bad_frames_get_a_clear_error_and_the_connection_stays(
    gateway: Gateway, frame: str, code: str
) -> None:
    async with (
        ws_client(url(gateway), name="bad") as bad,
        ws_client(url(gateway), name="good") as good,
    ):
        await bad.ws.send_message(frame)
        if frame.startswith("["):
            # Text that is not a JSON object is just text: published, acknowledged.
            await bad.expect("ack")
            assert (await good.expect("message"))["text"] == frame
            return
        error = await bad.expect("error")
        assert error["code"] == code
        assert error["message"]
        await bad.publish("still here")
        assert (await good.expect("message"))["text"] == "still here"


async def test_error_for_a_refused_publish_carries_its_ref(gateway: Gateway) -> None:
    async with ws_client(url(gateway)) as client:
        await client.send_json({"type": "publish", "text": "", "ref": "mine"})
        error = await client.expect("error")
        assert (error["code"], error["ref"]) == ("bad_text", "mine")


async def test_binary_frame_is_refused(gateway: Gateway) -> None:
    async with ws_client(url(gateway)) as client:
        await client.ws.send_message(b"\x00\x01")
        assert (await client.expect("error"))["code"] == "binary_not_supported"
        await client.publish("text is fine")


async def test_oversized_frame_closes_that_client_only(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="good") as good:
        async with open_websocket_url(url(gateway), max_message_size=10 * MAX_FRAME_BYTES) as big:
            await big.send_message("x" * (MAX_FRAME_BYTES + 1))
            with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await big.get_message()
            assert closed.value.reason.code == 1009
        async with ws_client(url(gateway), name="other") as other:
            await other.publish("after the big one")
            assert (await good.expect("message"))["text"] == "after the big one"


async def test_bad_lines_get_errors_and_the_line_client_stays(gateway: Gateway) -> None:
    async with line_client(gateway.port) as nc, ws_client(url(gateway), name="web") as web:
        assert await nc.line() in ("* web joined #general", "* guest-1, web joined #general")
        await nc.send_line(b"x" * (MAX_LINE_BYTES + 10))
        assert (await nc.line()).startswith("! line_too_long:")
        await nc.send_line(b"caf\xe9")
        assert (await nc.line()).startswith("! invalid_utf8:")
        await nc.send_line("/bogus")
        assert (await nc.line()).startswith("! bad_command:")
        await nc.send_line("tab\tis fine")
        event = await web.expect("message")
        assert event["text"] == "tab\tis fine"


async def test_line_client_quits(gateway: Gateway) -> None:
    async with line_client(gateway.port) as nc:
        await nc.send_line("/quit")
        assert (await nc.closed()).endswith(b"* bye\n")


async def test_silent_tcp_client_is_greeted_as_a_line_client(gateway: Gateway) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        with trio.fail_after(WAIT_SECONDS):
            assert (await stream.receive_some(1000)).startswith(b"* welcome")


async def test_client_that_disconnects_mid_stream_is_removed(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="stays") as stays:
        async with ws_client(url(gateway), name="goes") as goes:
            await goes.publish("bye now")
            assert (await stays.expect("message"))["text"] == "bye now"
            while "goes" not in (await stays.take("presence_diff"))["joined"]:
                pass
        while "goes" not in (await stays.take("presence_diff"))["left"]:
            pass
        await wait_until(lambda: gateway.hub.member_count() == 1)
        async with line_client(gateway.port) as nc:
            await nc.send_line("still flowing")
            assert (await stays.expect("message"))["text"] == "still flowing"


async def test_slow_client_is_disconnected_and_others_get_everything(gateway: Gateway) -> None:
    """A client that never reads is cut off at its outbox limit; the fast one loses nothing."""
    text = "y" * 4000
    count = (OUTBOX_LIMIT_BYTES * 3) // len(text)  # far more than the kernel and outbox hold
    slow = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with (
        slow,
        ws_client(url(gateway), name="fast") as fast,
        ws_client(url(gateway)) as sender,
    ):
        await slow.send_all(b"\n")  # a line client that will never read again
        received: list[str] = []

        async def read_fast() -> None:
            while len(received) < count:
                received.append((await fast.expect("message"))["text"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            for _ in range(count):
                await sender.publish(text)
        assert len(received) == count
        assert gateway.stats.slow_disconnects == 1
        await wait_until(lambda: gateway.stats.connections_open == 2)


async def test_health_endpoints(gateway: Gateway) -> None:
    for path, status, body in [
        ("/healthz", b"200", b"ok\n"),
        ("/readyz", b"200", b"ready\n"),
        ("/nope", b"404", b"not found"),
    ]:
        stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            reply = b""
            with trio.fail_after(WAIT_SECONDS):
                while chunk := await stream.receive_some(4096):
                    reply += chunk
        head, _, content = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == status
        assert content.startswith(body)


async def test_drain_tells_clients_to_reconnect(gateway: Gateway) -> None:
    async with open_websocket_url(url(gateway)) as ws, line_client(gateway.port) as nc:
        json.loads(await ws.get_message())
        gateway.stop("going for maintenance")
        with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason.code == 1012
        assert re.fullmatch(
            r"going for maintenance; reconnect in \d+\.\d\d s", closed.value.reason.reason
        )
        last = (await nc.closed()).decode().splitlines()[-1]
        assert re.fullmatch(r"\* going for maintenance; reconnect in \d+\.\d\d s", last)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = b""
        with trio.fail_after(WAIT_SECONDS):
            while chunk := await stream.receive_some(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_parse_as_prometheus_text_and_count(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="a") as a, ws_client(url(gateway), name="b") as b:
        await a.publish("counted")
        await b.expect("message")
        await a.send_json({"type": "nope"})
        await a.expect("error")
    status, body = await http_get(gateway.port, "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("broadcast_messages_published_total", ())] == 1
    assert samples[("broadcast_deliveries_total", ())] >= 1
    assert samples[("broadcast_client_errors_total", (("code", "bad_command"),))] == 1
    assert samples[("broadcast_ready", ())] == 1
    assert samples[("broadcast_delivery_lag_seconds_count", ())] >= 1


async def test_one_shot_clients_can_skip_join_and_leave_notices(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="watcher") as watcher:
        async with ws_client(url(gateway), name="script", announce="0") as script:
            await script.publish("from a script")
        async with ws_client(url(gateway), name="person") as person:
            await person.publish("from a person")
            seen = [await watcher.event()]
            while not any("person" in e.get("joined", ()) for e in seen):
                seen.append(await watcher.event())
        while not any("person" in e.get("left", ()) for e in seen):
            seen.append(await watcher.event())
        assert [e["sender"] for e in seen if e["type"] == "message"] == ["script", "person"]
        named = [n for e in seen for n in (*e.get("joined", ()), *e.get("left", ()))]
        assert "script" not in named


async def test_reconnecting_client_recovers_what_it_missed(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="sender") as sender:
        ids = [await sender.publish(f"m{i}") for i in range(5)]
        async with ws_client(url(gateway), name="late", since=ids[1]) as late:
            replayed = await late.messages(3)
            assert [m["id"] for m in replayed] == ids[2:]
            recovered = await late.expect("recovered")
            assert (recovered["count"], recovered["complete"]) == (3, True)
            live_id = await sender.publish("live")
            assert (await late.expect("message"))["id"] == live_id


async def test_new_client_may_ask_for_the_last_messages(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="sender") as sender:
        for i in range(4):
            await sender.publish(f"m{i}")
        async with ws_client(url(gateway), name="new", history="2") as new:
            assert [m["text"] for m in await new.messages(2)] == ["m2", "m3"]
            assert (await new.expect("recovered"))["count"] == 2


async def test_bad_recovery_request_gets_an_error(gateway: Gateway) -> None:
    async with ws_client(url(gateway), since="yesterday") as client:
        assert (await client.expect("error"))["code"] == "bad_command"
        await client.publish("still works")


async def test_recovery_under_traffic_keeps_one_order_without_gaps_or_duplicates(
    gateway: Gateway,
) -> None:
    """While history is replayed, live messages are held back and merged by id."""
    total = 150
    async with ws_client(url(gateway), name="sender") as sender:
        first = await sender.publish("m0")
        published = [first]

        async def keep_publishing() -> None:
            for i in range(1, total):
                published.append(await sender.publish(f"m{i}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_publishing)
            await wait_until(lambda: len(published) > total // 3)
            async with ws_client(url(gateway), name="joiner", since=first) as joiner:
                seen: list[str] = []
                recovered = None
                while len(seen) < total - 1:
                    event = await joiner.event()
                    if event["type"] == "message":
                        seen.append(event["id"])
                    elif event["type"] == "recovered":
                        recovered = event
        assert recovered is not None and recovered["complete"]
        assert seen == published[1:]


async def test_presence_snapshot_who_and_line_who(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="alice") as alice:
        assert alice.presence == ["alice"]
        async with ws_client(url(gateway), name="bob") as bob, line_client(gateway.port) as nc:
            assert bob.presence == ["alice", "bob"]
            await nc.send_line("/name carol")
            assert await nc.line() == "* you are now carol"
            await nc.send_line("/who")
            assert await nc.line_not_starting("* you", "* alice", "* bob") == (
                "* here in #general: alice, bob, carol"
            )
            await alice.send_json({"type": "who"})
            presence = await alice.expect("presence")
            assert (presence["channel"], presence["members"]) == (
                "general",
                ["alice", "bob", "carol"],
            )
        await alice.send_json({"type": "who"})
        assert (await alice.expect("presence"))["members"] == ["alice"]


async def test_line_client_switches_channel(gateway: Gateway) -> None:
    async with (
        ws_client(url(gateway), name="here", channel="general") as here,
        ws_client(url(gateway), name="there", channel="other") as there,
        line_client(gateway.port) as nc,
    ):
        await nc.send_line("/join other")
        assert await nc.line_not_starting("* here") == "* you are now in #other"
        await nc.send_line("hello other")
        assert (await there.expect("message"))["text"] == "hello other"
        await here.publish("general only")
        await there.publish("other only")
        assert await nc.line_not_starting("* ") == "there: other only"
        await nc.send_line("/join no spaces")
        assert (await nc.line()).startswith("! bad_channel:")
    await wait_until(lambda: gateway.hub.channel_count() == 0)
