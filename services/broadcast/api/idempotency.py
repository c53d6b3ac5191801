"""Idempotency keys: a publish repeated with the same key within the window publishes nothing
and answers what the first one answered.

The first request *claims* the key before it publishes, then stores its answer; a duplicate that
arrives meanwhile waits (briefly) for that answer. A publish that fails releases its claim, so a
retry can publish. ``MemoryIdempotency`` serves one gateway; ``RedisIdempotency`` keeps the keys
in Redis, so a retry that lands on another gateway is recognised too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import trio

from broadcast.bus.base import BusUnavailable
from broadcast.redis.resp import RedisConnection, RedisError
from broadcast.redis.topology import topology_for

log = logging.getLogger("broadcast.api")

# Ten minutes: longer than any client's retries (seconds to a minute), short enough that the
# keys of a busy publisher cost little (Centrifugo keeps them five minutes).
WINDOW_SECONDS = 600.0
# A duplicate waits this long for the first request's answer; a publish takes milliseconds, or
# the bus's command timeout at worst.
PENDING_WAIT_SECONDS = 6.0
# How often a duplicate on another gateway looks for the answer in Redis.
POLL_SECONDS = 0.05
# A claim in Redis lives this long until the answer replaces it: a gateway that dies between
# claim and answer blocks retries with this key for this long, not for the whole window.
CLAIM_SECONDS = 30.0
KEY_PREFIX = "broadcast:idempotency:"
# Keys one gateway keeps in memory at most (about 200 bytes each); past it the oldest is
# forgotten early. WebSocket clients make keys too, each at most at its publish rate: this bounds
# what they can make a gateway hold for the window, whatever their number.
MAX_MEMORY_KEYS = 500_000


class IdempotencyPending(Exception):
    """The first request with this key has not finished within the wait; try again later."""


class IdempotencyStore(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled (expiry, the connection); reports started at once."""
        ...

    async def claim(self, key: str) -> str | None:
        """None: the caller owns ``key`` and must ``complete`` or ``release`` it. Otherwise the
        answer the first request stored. Raises IdempotencyPending when the first request is
        still running after PENDING_WAIT_SECONDS, BusUnavailable when the store cannot answer."""
        ...

    async def complete(self, key: str, answer: str) -> None:
        """Store the answer for duplicates within the window."""
        ...

    async def release(self, key: str) -> None:
        """The owner's publish failed: the next request with ``key`` publishes."""
        ...


@dataclass
class _Entry:
    expires: float
    answer: str | None = None
    settled: trio.Event = field(default_factory=trio.Event)


class MemoryIdempotency:
    """Keys in a dict ordered by expiry (one window for all, so insertion order is expiry
    order): dropping the expired costs nothing per request beyond those dropped."""

    def __init__(self, window: float = WINDOW_SECONDS, max_keys: int = MAX_MEMORY_KEYS) -> None:
        self._window = window
        self._max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._window / 10)
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            del self._entries[key]
            entry.settled.set()

    async def claim(self, key: str) -> str | None:
        await trio.lowlevel.checkpoint()
        deadline = trio.current_time() + PENDING_WAIT_SECONDS
        while True:
            now = trio.current_time()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(now + self._window)
                if len(self._entries) > self._max_keys:
                    _, oldest = self._entries.popitem(last=False)
                    oldest.settled.set()
                return None
            if entry.answer is not None:
                return entry.answer
            with trio.move_on_at(deadline):
                await entry.settled.wait()
            if not entry.settled.is_set():
                raise IdempotencyPending(key)

    async def complete(self, key: str, answer: str) -> None:
        await trio.lowlevel.checkpoint()
        entry = self._entries.get(key)
        if entry is not None:
            entry.answer = answer
            entry.settled.set()

    async def release(self, key: str) -> None:
        await trio.lowlevel.checkpoint()
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.settled.set()


class RedisIdempotency:
    """Keys in Redis: ``SET key "" NX PX claim`` claims, ``SET key answer PX window`` settles,
    ``DEL`` releases. One connection, opened when first needed and again after a failure,
    through the same topology as the bus (it follows the primary)."""

    def __init__(
        self, url: str, *, window: float = WINDOW_SECONDS, command_timeout: float = 5.0
    ) -> None:
        self._topology = topology_for(url, command_timeout=command_timeout)
        self._window_ms = round(window * 1000)
        self._claim_ms = round(min(window, CLAIM_SECONDS) * 1000)
        self._command_timeout = command_timeout
        self._connection: RedisConnection | None = None
        self._lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._topology.run(task_status=task_status)
        finally:
            if self._connection is not None:
                await self._connection.aclose()

    async def _execute(self, *args: str | int) -> object:
        """One command within the timeout (the wait for the connection included)."""
        try:
            with trio.fail_after(self._command_timeout):
                async with self._lock:
                    if self._connection is None or self._connection.closed:
                        self._connection = await self._topology.connect("broadcast-api")
                    return await self._connection.execute(*args)
        except (RedisError, trio.TooSlowError) as exc:
            raise BusUnavailable(f"idempotency keys unavailable: {exc}") from None

    async def claim(self, key: str) -> str | None:
        name = KEY_PREFIX + key
        deadline = trio.current_time() + PENDING_WAIT_SECONDS
        while True:
            if await self._execute("SET", name, "", "NX", "PX", self._claim_ms) is not None:
                return None
            while True:
                answer = await self._execute("GET", name)
                if answer is None:
                    break  # released (or expired): claim it again
                if isinstance(answer, bytes) and answer:
                    return answer.decode()
                if trio.current_time() >= deadline:
                    raise IdempotencyPending(key)
                await trio.sleep(POLL_SECONDS)

    async def complete(self, key: str, answer: str) -> None:
        await self._execute("SET", KEY_PREFIX + key, answer, "PX", self._window_ms)

    async def release(self, key: str) -> None:
        await self._execute("DEL", KEY_PREFIX + key)
