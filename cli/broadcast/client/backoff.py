"""How long to wait before reconnecting: exponential backoff with full jitter.

When a gateway restarts, every client it served loses its connection at the same moment. Full
jitter (a uniform draw between 0 and the exponential ceiling) spreads their reconnections over
the whole interval instead of sending them back in synchronised waves.

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
        """A delay drawn uniformly from ``[0, ceiling]``; each call raises the ceiling."""
        delay = self.rng.uniform(0, self.ceiling())
        self.failures += 1
        return delay

    def soon(self) -> float:
        """A delay of at most SOON_SECONDS; counts as a failure, so the next one backs off."""
        self.failures += 1
        return self.rng.uniform(0, SOON_SECONDS)

    def reset(self) -> None:
        self.failures = 0
