"""Sending no faster than the server accepts, and retrying what it refused for being early.

The gateway limits how many messages a connection may publish (a token bucket, by default 50 a
second in bursts of 100) and says so in its ``welcome`` (``limits.publish_per_second``,
``limits.publish_burst``; 0 means no limit). A pipe of 300 lines would otherwise be refused
past the burst. So the client keeps its own bucket, a little stricter than the server's, and
waits for a token before each message. Should the server refuse one anyway (``rate_limited``,
say after a reconnect, or a server that counts differently), its ``retry_after`` tells when to
send the same message again; older servers only say it in words ("try again in 0.4 s").

Answers are matched to messages by ``ref``: ``Deliveries`` holds what waits for an answer, so
the task that reads the connection and the task that sends can be different ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from broadcast.security.rate_limit import TokenBucket

# What the gateway allows when its welcome does not say (docs/protocol.md, rate_limited).
DEFAULT_PER_SECOND = 50.0
DEFAULT_BURST = 100
# Our bucket is stricter than the server's: messages sent evenly can still arrive bunched up.
RATE_MARGIN = 0.9
BURST_MARGIN = 0.9
# However often the server refuses, we still try this often.
MIN_PER_SECOND = 0.5
# When a refusal names no time: wait this long. And never less than MIN_RETRY_SECONDS, so a
# server that says "0.0 s" is not asked again in a tight loop.
FALLBACK_RETRY_SECONDS = 1.0
MIN_RETRY_SECONDS = 0.05
# A message refused this many times in a row is given up (reported as not delivered).
RATE_LIMITED_TRIES = 20  # each waits the server's hint: a server that keeps saying "later"
UNAVAILABLE_TRIES = 5  # bus_unavailable: the server's Redis is away; a few seconds' grace

_TRY_AGAIN = re.compile(r"(?:try again|retry) in (\d+(?:\.\d+)?) ?s\b")


def publish_limits(welcome: Mapping[str, Any]) -> tuple[float, int] | None:
    """(per second, burst) from a welcome's ``limits``; the defaults when it does not say;
    None when the server says there is no limit (0)."""
    limits = welcome.get("limits")
    limits = limits if isinstance(limits, Mapping) else {}
    rate = _number(limits.get("publish_per_second"), DEFAULT_PER_SECOND)
    burst = _number(limits.get("publish_burst"), DEFAULT_BURST)
    if rate == 0:
        return None
    return rate, max(1, int(burst))


def _number(value: object, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value) if math.isfinite(value) and value >= 0 else default


def retry_hint(event: Mapping[str, Any]) -> float:
    """Seconds to wait before sending a refused message again: the error's ``retry_after``,
    else the time its message names, else FALLBACK_RETRY_SECONDS."""
    hint = event.get("retry_after")
    if isinstance(hint, bool) or not isinstance(hint, int | float) or math.isnan(hint):
        message = event.get("message")
        found = _TRY_AGAIN.search(message) if isinstance(message, str) else None
        hint = float(found[1]) if found else FALLBACK_RETRY_SECONDS
    return min(max(float(hint), MIN_RETRY_SECONDS), 60.0)


class Pacer:
    """Waits before each message so that the server's limit is never reached.

    A refusal all the same means the server counts differently (several clients behind one
    address share its limit, say): the pace halves, from an empty bucket, at each refusal.
    The server disconnects a client that keeps being refused (close 4029), so the pace must
    fall below the real limit quickly rather than probe it.
    """

    def __init__(self, limits: tuple[float, int] | None) -> None:
        self._bucket: TokenBucket | None = None
        if limits is not None:
            rate, burst = limits
            self._bucket = TokenBucket(
                rate * RATE_MARGIN, max(1, int(burst * BURST_MARGIN)), trio.current_time
            )

    @classmethod
    def for_welcome(cls, welcome: Mapping[str, Any]) -> Pacer:
        return cls(publish_limits(welcome))

    async def wait(self) -> None:
        """Until one more message may go; takes its token."""
        if self._bucket is None:
            return
        while not self._bucket.try_take():  # noqa: ASYNC110 - time refills it, nothing else
            # At least a millisecond: a float's rounding must not make this a busy loop.
            await trio.sleep(max(self._bucket.retry_after(), 0.001))

    @property
    def per_second(self) -> float | None:
        return None if self._bucket is None else self._bucket.rate

    def refused(self) -> None:
        """The server said "too early": half the pace, from an empty bucket."""
        rate = DEFAULT_PER_SECOND if self._bucket is None else self._bucket.rate
        self._bucket = TokenBucket(max(MIN_PER_SECOND, rate / 2), 1, trio.current_time)
        self._bucket.try_take()


@dataclass
class Retries:
    """Which refusals of one message are worth sending it again for, and how often.

    ``rate_limited`` (too early: the pace halves) and ``bus_unavailable`` (the server's Redis is
    away) pass with time; ``idempotency_pending`` (the same key still being published, after a
    resend) too. Anything else is the server's answer for good.
    """

    rate_limited: int = 0
    unavailable: int = 0

    def delay(self, answer: Mapping[str, Any], pacer: Pacer) -> float | None:
        """Seconds to wait before sending the refused message again; None: give it up."""
        code = answer.get("code")
        if code == "rate_limited" and self.rate_limited < RATE_LIMITED_TRIES:
            self.rate_limited += 1
            pacer.refused()
        elif code in ("bus_unavailable", "idempotency_pending") and (
            self.unavailable < UNAVAILABLE_TRIES
        ):
            self.unavailable += 1
        else:
            return None
        return retry_hint(answer)


@dataclass
class Pending:
    """One message sent, waiting for its ``ack`` or ``error``; ``answer`` None if lost."""

    ref: str
    answered: trio.Event = field(default_factory=trio.Event)
    answer: dict[str, Any] | None = None

    async def wait(self) -> dict[str, Any] | None:
        await self.answered.wait()
        return self.answer


class Deliveries:
    """Messages sent and not yet answered, by ref."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, ref: str) -> Pending:
        pending = self._pending[ref] = Pending(ref)
        return pending

    def answer(self, event: Mapping[str, Any]) -> bool:
        """An ``ack`` or ``error`` for a message we wait on: hand it over; False otherwise."""
        ref = event.get("ref")
        pending = self._pending.pop(ref, None) if isinstance(ref, str) else None
        if pending is None:
            return False
        pending.answer = dict(event)
        pending.answered.set()
        return True

    def lose_all(self) -> None:
        """The connection ended: no answer will come for anything still waiting."""
        for pending in self._pending.values():
            pending.answered.set()
        self._pending.clear()
