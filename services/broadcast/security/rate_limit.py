"""A token bucket: how many messages a connection may send, in bursts and on average.

Pure and clock-injected: the gateway passes ``trio.current_time`` (so tests with trio's
``MockClock`` control it too), and the tests here pass a plain function returning a number,
so nothing has to wait for time to pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class TokenBucket:
    """``burst`` tokens at most; ``rate`` tokens come back per second; each message takes one.

    A client may send ``burst`` messages at once (a paste, a reconnect's backlog), then
    ``rate`` per second on average. A refusal takes nothing, so the bucket never goes
    negative and a client that keeps flooding is not punished beyond the limit itself: it
    gets through again as soon as tokens are back. ``retry_after`` says when that is, for
    the error a client gets.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number of tokens per second")
        if burst < 1:
            raise ValueError("burst must be at least 1, or nothing could ever be sent")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)  # a new connection starts with a full bucket
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:  # a clock that steps back must not drain the bucket
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._updated = now

    @property
    def available(self) -> float:
        """Tokens in the bucket now (fractional while refilling)."""
        self._refill()
        return self._tokens

    def try_take(self, n: int = 1) -> bool:
        """Take ``n`` tokens if they are all there; else take none and return False."""
        if n < 0:
            raise ValueError("n must not be negative")
        self._refill()
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

    def retry_after(self, n: int = 1) -> float:
        """Seconds until ``try_take(n)`` can succeed: 0 when it can now, ``math.inf`` when
        ``n`` is more than the bucket ever holds."""
        if n > self.burst:
            return math.inf
        self._refill()
        missing = n - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate
