"""The real-time client library (``broadcast.client.connect``) against real gateway processes.

Rules as everywhere (conftest.py): real gateways and a real redis-server on free loopback ports,
every wait bounded by ``fail_after``, no sleeps. A gateway is killed with SIGKILL and a new one
started on the same port, as a supervisor would: the client is never told, and must find its
way back by itself. One gateway (tokens required, 3 messages of history per channel, so that a
gap is easy to make) serves the tests that do not kill theirs, each in its own channel.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from trio_websocket import CloseReason

from broadcast.client import (
    CommandRefused,
    Connected,
    Denied,
    Disconnected,
    Event,
    Gap,
    Message,
    Presence,
    PublishError,
    RealtimeClient,
    Recovered,
    Renamed,
    Unreachable,
    connect,
    realtime,
)
from broadcast.client.connection import drain_hint
from broadcast.security import mint_token
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer, free_port

WAIT_SECONDS = 10  # a busy 2-core CI machine; a correct run never waits this long
# Coming back after a kill: a gateway start, plus the client's backoff (~1 s, then ~2 s, ...).
RECONNECT_SECONDS = 30
HISTORY_LENGTH = 3
SECRET = "a-realtime-test-secret-long-enough-for-hs256"


def token(name: str, channels: list[str] | None = None) -> str:
    return mint_token(SECRET, name, 300, channels)


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    extra = ("--history-length", str(HISTORY_LENGTH), "--auth-secret", SECRET)
    process = GatewayProcess(node_id="rt", extra=extra)
    try:
        yield process
    finally:
        process.terminate()


async def events_until(
    client: RealtimeClient, kind: type, seconds: float = WAIT_SECONDS
) -> list[Event]:
    """The client's events up to and including the next one of ``kind``."""
    seen: list[Event] = []
    with trio.fail_after(seconds):
        async for event in client:
            seen.append(event)
            if isinstance(event, kind):
                return seen
    raise AssertionError(f"the client ended before a {kind.__name__}: {seen}")


async def receive_messages(client: RealtimeClient, count: int, seconds: float) -> list[Event]:
    """Events until ``count`` messages have come (what else came is kept, in order)."""
    seen: list[Event] = []
    with trio.fail_after(seconds):
        while len(messages(seen)) < count:
            seen += await events_until(client, Message, seconds)
    return seen


def messages(events: list[Event]) -> list[Message]:
    return [e for e in events if isinstance(e, Message)]


async def test_a_send_is_acked_and_other_clients_receive_it_in_order(
    gateway: GatewayProcess,
) -> None:
    channel = "rt-chat"
    async with (
        connect(gateway.url, channel=channel, token=token("bob")) as bob,
        connect(gateway.url, channel=channel, token=token("alice"), listen=False) as alice,
    ):
        assert (alice.name, alice.channel, alice.connected) == ("alice", channel, True)
        snapshot = await events_until(bob, Presence)
        assert isinstance(snapshot[0], Connected) and snapshot[0].name == "bob"
        sent = [await alice.send(f"hello {n}") for n in range(3)]
        got = messages(await receive_messages(bob, 3, WAIT_SECONDS))
        assert [(m.id, m.sender, m.text, m.channel) for m in got] == [
            (sent[n], "alice", f"hello {n}", channel) for n in range(3)
        ]
        assert got[0].epoch and got[0].ts > 0
        assert bob.last_message == (sent[-1], got[-1].epoch)
        assert await alice.who() == ["alice", "bob"]
        with pytest.raises(PublishError) as refused:
            await alice.send("x" * 5000)
        assert refused.value.code == "text_too_long"
        # The same idempotency key twice: one message, one id.
        again = [await alice.send("once", idempotency_key="k-1") for _ in range(2)]
        assert again[0] == again[1]
        await alice.send("after")
        later = messages(await receive_messages(bob, 2, WAIT_SECONDS))
        assert [m.text for m in later] == ["once", "after"]
    assert [e async for e in bob] == []  # closed: the iteration ends


async def test_join_moves_and_a_forbidden_channel_is_refused(gateway: GatewayProcess) -> None:
    async with connect(
        gateway.url, channel="rt-a", token=token("carol", ["rt-a", "rt-b"]), listen=False
    ) as carol:
        await carol.join("rt-b")
        assert carol.channel == "rt-b"
        assert await carol.who() == ["carol"]
        with pytest.raises(CommandRefused) as refused:
            await carol.join("rt-c")
        assert refused.value.code == "channel_forbidden"
        assert carol.channel == "rt-b"
        assert await carol.send("still here")


async def test_a_resume_the_history_no_longer_covers_yields_a_gap(
    gateway: GatewayProcess,
) -> None:
    channel = "rt-gap"
    async with connect(gateway.url, channel=channel, token=token("dave"), listen=False) as dave:
        ids = [await dave.send(f"m{n}") for n in range(6)]
        async with connect(
            gateway.url, channel=channel, token=token("erin"), history=1
        ) as erin:  # a first look at the history: only to learn the epoch
            [first] = messages(await events_until(erin, Message))
    # A later run resumes after m0; the gateway keeps only m3..m5.
    async with connect(
        gateway.url, channel=channel, token=token("erin"), since=ids[0], epoch=first.epoch
    ) as erin:
        events = await events_until(erin, Recovered)
    assert isinstance(events[0], Connected) and events[0].resumed
    assert [m.id for m in messages(events)] == ids[-HISTORY_LENGTH:]
    gap, recovered = events[-2:]
    assert gap == Gap(channel, "recovery_incomplete")
    assert isinstance(recovered, Recovered)
    assert (recovered.count, recovered.complete, recovered.reset) == (3, False, False)


async def test_a_bad_token_and_an_unreachable_gateway_raise(gateway: GatewayProcess) -> None:
    with trio.fail_after(WAIT_SECONDS), pytest.raises(Denied) as denied:
        async with connect(gateway.url, token="not-a-token"):
            pass
    assert denied.value.code == "token_invalid"
    with trio.fail_after(WAIT_SECONDS), pytest.raises(Denied) as denied:
        async with connect(gateway.url):
            pass
    assert denied.value.code == "auth_required"
    with trio.fail_after(WAIT_SECONDS), pytest.raises(Unreachable):
        async with connect(f"ws://127.0.0.1:{free_port()}/"):
            pass


def replace(gateway: GatewayProcess, redis_url: str | None = None) -> GatewayProcess:
    """A new gateway on the port of ``gateway``, which was killed: a supervisor's restart."""
    return GatewayProcess(node_id=gateway.node_id + "-2", port=gateway.port, redis_url=redis_url)


async def test_after_a_kill_the_client_comes_back_with_every_message_once_in_order(
    redis_server: RedisServer,
) -> None:
    channel = "rt-crash"
    a = GatewayProcess(node_id="rt-a", redis_url=redis_server.url)
    b = GatewayProcess(node_id="rt-b", redis_url=redis_server.url)
    started = [a, b]
    try:
        async with (
            connect(a.url, name="listener", channel=channel) as listener,
            connect(b.url, name="sender", channel=channel, listen=False) as sender,
        ):
            before = [await sender.send(f"before {n}") for n in range(3)]
            seen = await receive_messages(listener, 3, WAIT_SECONDS)
            a.kill()
            seen += await events_until(listener, Disconnected)
            meanwhile = [await sender.send(f"meanwhile {n}") for n in range(5)]
            started.append(await trio.to_thread.run_sync(replace, a, redis_server.url))
            seen += await events_until(listener, Recovered, RECONNECT_SECONDS)
            after = await sender.send("after")
            seen += await receive_messages(listener, 1, WAIT_SECONDS)
    finally:
        for gateway in started:
            gateway.kill()
    assert [m.id for m in messages(seen)] == [*before, *meanwhile, after]
    [recovered] = [e for e in seen if isinstance(e, Recovered)]
    assert (recovered.count, recovered.complete, recovered.reset) == (5, True, False)
    assert not any(isinstance(e, Gap) for e in seen)
    reconnected = [e for e in seen if isinstance(e, Connected)]
    assert [c.resumed for c in reconnected] == [False, True]


async def test_a_memory_gateway_restart_is_a_history_reset_not_a_gap_and_names_stay() -> None:
    channel = "rt-reset"
    a = GatewayProcess(node_id="rt-m")
    started = [a]
    try:
        async with connect(a.url, name="listener", channel=channel) as listener:
            async with connect(a.url, name="sender", channel=channel, listen=False) as sender:
                sent = await sender.send("before")
            seen = await receive_messages(listener, 1, WAIT_SECONDS)
            await listener.rename("listener 2")
            assert listener.name == "listener 2"
            with pytest.raises(CommandRefused) as refused:
                await listener.rename("*star")
            assert refused.value.code == "bad_name"
            a.kill()
            seen += await events_until(listener, Disconnected)
            started.append(await trio.to_thread.run_sync(replace, a))
            seen += await events_until(listener, Recovered, RECONNECT_SECONDS)
    finally:
        for gateway in started:
            gateway.kill()
    assert [m.id for m in messages(seen)] == [sent]
    recovered = seen[-1]
    assert isinstance(recovered, Recovered)
    assert (recovered.count, recovered.complete, recovered.reset) == (0, True, True)
    assert not any(isinstance(e, Gap) for e in seen)
    assert [e for e in seen if isinstance(e, Renamed)] == [Renamed("listener 2", channel)]
    reconnected = [e for e in seen if isinstance(e, Connected)]
    assert [c.name for c in reconnected] == ["listener", "listener 2"]  # the name is kept


async def test_a_reader_that_falls_behind_holds_the_connection_back_and_loses_nothing(
    gateway: GatewayProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 2 events, 8 messages wait in the connection, not in memory; they all come
    once read, and closing a client whose events wait for room is quiet."""
    monkeypatch.setattr(realtime, "EVENT_BUFFER", 2)
    channel = "rt-behind"
    async with (
        connect(gateway.url, channel=channel, token=token("hal"), announce=False) as hal,
        connect(gateway.url, channel=channel, token=token("ivy"), listen=False) as ivy,
        connect(gateway.url, channel=channel, token=token("jo")),  # never read, closed full
    ):
        sent = [await ivy.send(f"n{n}") for n in range(8)]
        assert [m.id for m in messages(await receive_messages(hal, 8, WAIT_SECONDS))] == sent


def test_a_draining_gateway_names_the_delay_it_drew() -> None:
    reason = CloseReason(1012, "the server is shutting down; reconnect in 1.27 s")
    assert drain_hint(reason) == 1.27
    assert drain_hint(CloseReason(1012, "the server is shutting down")) is None
    assert drain_hint(None) is None
