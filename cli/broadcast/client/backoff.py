"""How long to wait before reconnecting: exponential backoff with "equal jitter".

When a gateway restarts, every client it served loses its connection at the same moment. A
random part spreads their reconnections instead of sending them back in synchronised waves. It
is half the delay, not all of it ("full jitter" draws from 0 to the ceiling): a person watching
a long outage sees delays that grow steadily (5 to 10 s at the cap) rather than 0.2 s, then 9 s,
then 1 s.

A gateway that drains (close code 1012) is the exception: the load balancer sends us to a live
gateway, so waiting seconds would only lengthen the outage. ``soon`` gives a delay of at most
SOON_SECONDS, still jittered so the drained clients do not all arrive in the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

BASE_SECONDS = 1.0  # the first retry waits up to a second: quick after a blip
CAP_SECONDS = 10.0  # never more than ten seconds: a person is waiting at the terminal
SOON_SECONDS = 0.1  # reconnecting after a drain: at once, spread over a tenth of a second
_MAX_DOUBLINGS = 32  # past this the ceiling is the cap anyway; keeps 2**n small


@dataclass
class Backoff:
    """Successive reconnection delays; ``reset`` once a connection has proved itself."""

    base: float = BASE_SECONDS
    cap: float = CAP_SECONDS
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def ceiling(self) -> float:
        """The longest the next delay may be."""
        return min(self.cap, self.base * 2 ** min(self.failures, _MAX_DOUBLINGS))

    def next_delay(self) -> float:
        """A delay drawn uniformly from ``[ceiling / 2, ceiling]``; each call raises the
        ceiling."""
        ceiling = self.ceiling()
        delay = self.rng.uniform(ceiling / 2, ceiling)
        self.failures += 1
        return delay

    def soon(self) -> float:
        """A delay of at most SOON_SECONDS; counts as a failure, so the next one backs off."""
        self.failures += 1
        return self.rng.uniform(0, SOON_SECONDS)

    def at_least(self, seconds: float) -> float:
        """A delay of ``seconds`` (a server's Retry-After) plus up to a quarter more, so the
        clients told the same time do not all come back in the same instant; counts as a
        failure like ``next_delay``."""
        self.failures += 1
        return seconds + self.rng.uniform(0, max(seconds, BASE_SECONDS) / 4)

    def reset(self) -> None:
        self.failures = 0
