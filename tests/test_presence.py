"""Presence stores: the contract on MemoryPresence and RedisPresence, then RedisPresence against a
real redis-server shared by several "gateways" (stores), which tests kill, stop and freeze."""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from broadcast.bus.base import BusUnavailable
from broadcast.presence import MemoryPresence, PresenceStore, RedisPresence
from broadcast.presence.entries import PENDING_LIMIT, LocalEntries
from broadcast.presence.scripts import decode_member, encode_member, presence_key
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

# Small values keep the expiry tests to about a second; a refresh is still 5x within the TTL,
# so a live store's entries survive a busy CI machine's scheduling hiccups.
TTL = 1.0
REFRESH = 0.2
# Generous: a reconnect may wait out a backoff of up to 5 s after Redis comes back.
WAIT = 10

Expiry = tuple[str, str, str]  # channel, key, name


class Expiries:
    """One ``on_expired`` recorder shared by several stores, each reporting under its label."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Expiry]] = []
        self._changed = trio.Event()

    def callback(self, label: str) -> Callable[[str, str, str], None]:
        return functools.partial(self._record, label)

    def _record(self, label: str, channel: str, key: str, name: str) -> None:
        self.seen.append((label, (channel, key, name)))
        self._changed.set()
        self._changed = trio.Event()

    def entries(self) -> list[Expiry]:
        return [entry for _, entry in self.seen]

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(WAIT):
            while len(self.seen) < count:
                await self._changed.wait()


@dataclass
class Running:
    """A store running in the test's nursery; ``kill()`` cancels it as SIGKILL would end it:
    no leave, nothing cleaned up."""

    store: RedisPresence
    scope: trio.CancelScope
    ended: trio.Event

    async def kill(self) -> None:
        self.scope.cancel()
        with trio.fail_after(WAIT):
            await self.ended.wait()


StartStore = Callable[..., Awaitable[Running]]


@pytest.fixture
def expiries() -> Expiries:
    return Expiries()


@pytest.fixture
async def start_store(
    redis_server: RedisServer, nursery: trio.Nursery, expiries: Expiries
) -> StartStore:
    """Starts one more RedisPresence ("gateway") on the test's redis-server."""

    async def start(label: str, url: str | None = None, **options: Any) -> Running:
        options = {"ttl": TTL, "refresh_interval": REFRESH} | options
        store = RedisPresence(
            url or redis_server.url, on_expired=expiries.callback(label), **options
        )
        scope, ended = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                with scope:
                    await store.run(task_status=task_status)
            finally:
                ended.set()

        with trio.fail_after(WAIT):
            await nursery.start(run)
        return Running(store, scope, ended)

    return start


async def admin(server: RedisServer, method: str, *args: Any) -> Any:
    """One redis-py call, off the trio thread."""
    return await trio.to_thread.run_sync(lambda: getattr(server.client(), method)(*args))


async def members_when_up(store: PresenceStore, channel: str) -> list[str] | None:
    try:
        return await store.members(channel)
    except BusUnavailable:
        return None


async def wait_for_members(store: PresenceStore, channel: str, expected: list[str]) -> None:
    """Poll until ``members`` answers ``expected``: expiry and healing offer no event."""
    with trio.fail_after(WAIT):
        while await members_when_up(store, channel) != expected:  # noqa: ASYNC110 - Redis state
            await trio.sleep(0.02)


async def wait_for_rounds(*stores: RedisPresence, rounds: int) -> None:
    """Wait until each store completed ``rounds`` more refresh-and-sweep rounds."""
    targets = [(store, store.refreshes + rounds) for store in stores]
    await wait_until(lambda: all(store.refreshes >= target for store, target in targets))


# -- the contract, on both stores --------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, nursery: trio.Nursery) -> PresenceStore:
    """A store running in the test's nursery; for Redis on the test's private redis-server."""
    if request.param == "memory":
        store: PresenceStore = MemoryPresence()
    else:
        url = request.getfixturevalue("redis_server").url
        store = RedisPresence(
            url, on_expired=Expiries().callback("a"), ttl=TTL, refresh_interval=REFRESH
        )
    with trio.fail_after(WAIT):
        await nursery.start(store.run)
    return store


async def test_enter_leave_and_members(store: PresenceStore) -> None:
    assert await store.members("general") == []
    await store.enter("general", "gw-a/1", "bob")
    await store.enter("general", "gw-a/2", "alice")
    await store.enter("general", "gw-a/3", "Zoë ✓")
    assert await store.members("general") == ["Zoë ✓", "alice", "bob"]  # sorted by code point
    await store.leave("general", "gw-a/1")
    assert await store.members("general") == ["Zoë ✓", "alice"]
    await store.leave("general", "gw-a/1")  # twice, or never entered: nothing happens
    await store.leave("general", "gw-a/404")
    await store.leave("nowhere", "gw-a/2")
    assert await store.members("general") == ["Zoë ✓", "alice"]


async def test_a_name_is_listed_once_while_any_of_its_connections_is_in(
    store: PresenceStore,
) -> None:
    await store.enter("general", "gw-a/1", "alice")
    await store.enter("general", "gw-b/7", "alice")  # a second tab, on another gateway
    assert await store.members("general") == ["alice"]
    await store.leave("general", "gw-a/1")
    assert await store.members("general") == ["alice"]
    await store.leave("general", "gw-b/7")
    assert await store.members("general") == []


async def test_channels_are_isolated(store: PresenceStore) -> None:
    await store.enter("general", "gw-a/1", "alice")
    await store.enter("random", "gw-a/1", "alice")  # one connection, two channels
    await store.enter("random", "gw-a/2", "bob")
    assert await store.members("general") == ["alice"]
    assert await store.members("random") == ["alice", "bob"]
    assert await store.members("general-2") == []
    await store.leave("random", "gw-a/1")
    assert await store.members("general") == ["alice"]
    assert await store.members("random") == ["bob"]


async def test_entering_again_with_another_name_renames(store: PresenceStore) -> None:
    await store.enter("general", "gw-a/1", "guest-1")
    await store.enter("general", "gw-a/1", "alice")
    assert await store.members("general") == ["alice"]
    await store.leave("general", "gw-a/1")
    assert await store.members("general") == []


# -- RedisPresence: a cluster of stores --------------------------------------------------------


async def test_gateways_see_each_others_members(start_store: StartStore) -> None:
    a, b = (await start_store("a")).store, (await start_store("b")).store
    await a.enter("general", "gw-a/1", "alice")
    await b.enter("general", "gw-b/1", "bob")
    await b.enter("random", "gw-b/2", "carol")
    for store in (a, b):
        assert await store.members("general") == ["alice", "bob"]
        assert await store.members("random") == ["carol"]
    await a.leave("general", "gw-a/1")
    assert await b.members("general") == ["bob"]


async def test_a_killed_gateways_entries_expire_and_are_reported_once(
    start_store: StartStore, expiries: Expiries, redis_server: RedisServer
) -> None:
    a, b, c = [await start_store(label) for label in "abc"]
    await a.store.enter("general", "gw-a/1", "alice")
    await c.store.enter("general", "gw-c/1", "carol")
    await c.store.enter("random", "gw-c/2", "dave")
    await b.store.enter("general", "gw-b/1", "bob")
    await b.store.enter("general", "gw-b/2", "erin")
    await b.store.enter("random", "gw-b/1", "bob")
    await b.store.enter("random", "gw-b/3", "alice")  # also alice's name, on another connection
    assert await a.store.members("general") == ["alice", "bob", "carol", "erin"]

    await b.kill()  # no leave: its entries stay in Redis until they expire
    killed_at = trio.current_time()
    await expiries.wait_for(4)
    assert trio.current_time() - killed_at < TTL + REFRESH + 1.0  # the documented bound
    assert sorted(expiries.entries()) == [
        ("general", "gw-b/1", "bob"),
        ("general", "gw-b/2", "erin"),
        ("random", "gw-b/1", "bob"),
        ("random", "gw-b/3", "alice"),
    ]
    assert {label for label, _ in expiries.seen} <= {"a", "c"}  # the survivors
    for store in (a.store, c.store):
        assert await store.members("general") == ["alice", "carol"]
        assert await store.members("random") == ["dave"]

    # Both survivors keep sweeping: nothing is reported twice, and their own entries, older than
    # the TTL by now, are never reported.
    await wait_for_rounds(a.store, c.store, rounds=2)
    assert len(expiries.seen) == 4
    assert a.store.expired + c.store.expired == 4
    raw = await admin(redis_server, "zrange", presence_key("general"), 0, -1)
    assert sorted(decode_member(member) for member in raw) == [
        ("gw-a/1", "alice"),
        ("gw-c/1", "carol"),
    ]


async def test_live_entries_outlive_many_ttls(start_store: StartStore, expiries: Expiries) -> None:
    a, b = (await start_store("a")).store, (await start_store("b")).store
    await a.enter("general", "gw-a/1", "alice")
    await b.enter("general", "gw-b/1", "bob")
    await wait_for_rounds(a, b, rounds=round(2 * TTL / REFRESH))
    assert await b.members("general") == ["alice", "bob"]
    assert expiries.seen == []


async def test_a_channel_left_behind_vanishes_from_redis(
    start_store: StartStore, redis_server: RedisServer
) -> None:
    gateway = await start_store("a", ttl=0.3, refresh_interval=0.1)  # short: it is waited out
    await gateway.store.enter("general", "gw-a/1", "alice")
    expiry_ms = await admin(redis_server, "pttl", presence_key("general"))
    assert 0 < expiry_ms <= 2 * 0.3 * 1000  # two TTLs, renewed by every write
    await gateway.kill()
    with trio.fail_after(WAIT):
        while await admin(redis_server, "exists", presence_key("general")):  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_redis_restart_members_unavailable_then_healed_by_the_refresh(
    start_store: StartStore, redis_server: RedisServer, expiries: Expiries
) -> None:
    a, b = (await start_store("a")).store, (await start_store("b")).store
    await a.enter("general", "gw-a/1", "alice")
    await a.enter("general", "gw-a/2", "bob")
    await b.enter("general", "gw-b/1", "carol")

    redis_server.stop()  # and with it everything in Redis: no persistence
    started = trio.current_time()
    with pytest.raises(BusUnavailable):
        await a.members("general")
    await a.enter("general", "gw-a/3", "dave")  # remembered; never raises
    await a.leave("general", "gw-a/2")
    await b.enter("random", "gw-b/2", "erin")
    with pytest.raises(BusUnavailable):
        await b.members("general")
    assert trio.current_time() - started < 1.0  # at once, not after the command timeout
    assert not a.ready

    redis_server.start()
    await wait_for_members(b, "general", ["alice", "carol", "dave"])
    await wait_for_members(a, "random", ["erin"])
    assert a.reconnects == 1
    assert expiries.seen == []


async def test_starting_while_redis_is_down(
    start_store: StartStore, redis_server: RedisServer
) -> None:
    redis_server.stop()
    gateway = await start_store("a")  # started() promptly, not connected
    assert not gateway.store.ready
    await gateway.store.enter("general", "gw-a/1", "alice")
    with pytest.raises(BusUnavailable):
        await gateway.store.members("general")
    redis_server.start()
    await wait_for_members(gateway.store, "general", ["alice"])


async def test_calls_are_bounded_by_the_command_timeout_when_redis_freezes(
    start_store: StartStore, redis_server: RedisServer
) -> None:
    a = (await start_store("a", command_timeout=0.3)).store
    await a.enter("general", "gw-a/1", "alice")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # Redis keeps its data but stops answering
    try:
        started = trio.current_time()
        with pytest.raises(BusUnavailable):
            await a.members("general")
        await a.enter("general", "gw-a/2", "bob")  # neither raises nor hangs
        await a.leave("general", "gw-a/2")
        await a.enter("general", "gw-a/3", "carol")
        assert trio.current_time() - started < 3 * 0.3 + 0.5
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await wait_for_members(a, "general", ["alice", "carol"])


async def test_a_leave_redis_missed_is_written_by_the_next_refresh(
    start_store: StartStore, redis_server: RedisServer, expiries: Expiries
) -> None:
    # A long TTL: alice may only vanish because her removal is retried, not by expiring. A long
    # refresh interval: the leave, not the loop, is the first to find the connection gone.
    a = (await start_store("a", ttl=60.0, refresh_interval=30.0)).store
    b = (await start_store("b", ttl=60.0)).store
    await a.enter("general", "gw-a/1", "alice")
    await a.enter("general", "gw-a/2", "bob")
    await admin(redis_server, "client_kill_filter", None, "normal")  # all but the admin's own
    await a.leave("general", "gw-a/1")  # Redis never sees this ZREM
    await a.enter("general", "gw-a/3", "carol")  # nor this ZADD
    await wait_for_members(b, "general", ["bob", "carol"])
    assert a.reconnects == 1  # the leave found the connection gone, not the loop
    assert expiries.seen == []


async def test_scripts_flushed_from_redis_are_sent_again(
    start_store: StartStore, redis_server: RedisServer
) -> None:
    store = (await start_store("a")).store
    await admin(redis_server, "script_flush")
    await store.enter("general", "gw-a/1", "alice")
    assert await store.members("general") == ["alice"]


async def test_the_password_stays_out_of_names_and_logs(
    start_store: StartStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="broadcast.presence")
    server = RedisServer(password="right-horse-battery")
    server.start()
    try:
        wrong = await start_store("a", url=server.url.replace("right-horse", "wrong-horse"))
        assert not wrong.store.ready
        assert "WRONGPASS" in caplog.text
        right = await start_store("b", url=server.url)
        await right.store.enter("general", "gw-b/1", "alice")
        assert await right.store.members("general") == ["alice"]
    finally:
        server.close()
    await right.store.enter("general", "gw-b/2", "bob")  # logged at debug, with the address
    await wait_until(lambda: "redis presence connection lost" in caplog.text)
    assert "***" in caplog.text
    for text in (wrong.store.name, right.store.name, caplog.text):
        assert "horse" not in text


# -- the local bookkeeping ---------------------------------------------------------------------


def test_members_round_trip_through_the_redis_encoding() -> None:
    member = encode_member("gw-a/1", "Zoë ✓ the 2nd")
    assert decode_member(member.encode()) == ("gw-a/1", "Zoë ✓ the 2nd")


def test_owed_removals_and_watches_are_bounded() -> None:
    entries = LocalEntries(watch_seconds=10.0)
    for n in range(PENDING_LIMIT + 5):
        entries.owe_removal("general", encode_member(f"gw-a/{n}", "x"))
    (update,) = entries.refresh_plan(now=0.0)
    assert len(update.removals) == PENDING_LIMIT
    assert update.removals[0] == encode_member("gw-a/5", "x")  # the oldest were dropped
    entries.removals_done([update])
    assert entries.refresh_plan(now=0.0) == []

    entries.watch("watched", now=0.0)
    assert [u.channel for u in entries.refresh_plan(now=9.0)] == ["watched"]
    assert entries.refresh_plan(now=10.0) == []  # forgotten after watch_seconds


def test_entering_again_cancels_an_owed_removal() -> None:
    entries = LocalEntries(watch_seconds=10.0)
    entries.enter("general", "gw-a/1", "alice")
    member = entries.leave("general", "gw-a/1")
    assert member is not None
    entries.owe_removal("general", member)
    entries.enter("general", "gw-a/1", "alice")
    (update,) = entries.refresh_plan(now=0.0)
    assert update.removals == []
    assert update.additions == [member]
