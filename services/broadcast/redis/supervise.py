"""Keeping one Redis connection alive: a session runs until its connection fails, then another
is started after a backoff, for as long as the caller runs."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from broadcast.redis.resp import RedisError

# Reconnect delays: full jitter over an exponential range, so a restarted Redis is not hit by
# every gateway at once. The cap bounds how long a gateway stays away after Redis is back (with
# the readiness probe's retry, ready again within ~2 s); a Redis that is down costs about one
# refused connection per 0.75 s per connection, which nothing notices.
BACKOFF_START = 0.1
BACKOFF_CAP = 1.5
# A connection that stayed up this long resets the backoff; shorter lives count as flapping.
STABLE_AFTER = 5.0

Connected = Callable[[str], None]
"""Called by a session once its connection is fully set up, with a detail for the log."""
Session = Callable[[Connected], Awaitable[None]]
"""Connects, calls ``connected(detail)``, serves, and raises RedisError when the link is lost."""


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (0: the first retry)."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_START * 2**attempt))


class Status:
    """Whether one connection is up, with a way to wait for a change. ``on_change`` is called
    after every change (the bus wakes its readiness waiters with it)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.up = False
        self._changed = trio.Event()
        self._on_change = on_change

    def set(self, up: bool) -> None:
        self.up = up
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        if self._on_change is not None:
            self._on_change()

    async def wait(self, up: bool = True) -> None:
        await trio.lowlevel.checkpoint()
        while self.up != up:
            await self._changed.wait()

    async def changed(self) -> None:
        await self._changed.wait()


async def keep_connected(
    role: str,
    describe: Callable[[], str],
    session: Session,
    *,
    log: logging.Logger,
    tried: Callable[[], None] = lambda: None,
    reconnected: Callable[[], None] = lambda: None,
    wake: Callable[[], trio.Event] | None = None,
) -> None:
    """Run ``session`` again and again with backoff, until cancelled.

    ``describe()`` names the Redis (redacted) for the log; each new reason for an outage is
    logged once at warning, repeats at debug. ``tried`` is called after every attempt that
    connected or failed (callers report "started" on the first), ``reconnected`` each time a
    connection is re-established after one was up. ``wake()`` is an event that cuts a backoff
    short (the topology's ``moved``: the primary changed, try it now)."""
    attempt = 0
    ever_up = False
    outage: str | None = None  # why we are down; each new reason is logged once
    while True:
        up_since: float | None = None

        def connected(detail: str) -> None:
            nonlocal up_since, ever_up, outage
            up_since = trio.current_time()
            if ever_up:
                reconnected()
            if ever_up or outage is not None:
                log.info("redis %s connected to %s%s", role, describe(), detail)
            ever_up, outage = True, None
            tried()

        try:
            await session(connected)
        except RedisError as exc:
            reason = str(exc)
        else:  # pragma: no cover - sessions only end by raising
            reason = "session ended"
        tried()
        if up_since is not None:
            log.warning("redis %s connection lost (%s), reconnecting", role, reason)
            if trio.current_time() - up_since >= STABLE_AFTER:
                attempt = 0
        elif reason != outage:
            log.warning("redis %s cannot connect (%s), retrying", role, reason)
        else:
            log.debug("redis %s still cannot connect (%s)", role, reason)
        outage = reason
        with trio.move_on_after(backoff_delay(attempt)):
            if wake is None:
                await trio.sleep_forever()
            await wake().wait()
        attempt += 1
