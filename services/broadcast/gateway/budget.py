"""What every command a client sends costs, and when a client that keeps going is cut.

Two allowances per client, each a token bucket: messages (``publish``, a line of text) and
commands (everything else: ``hello``, renames, joins, ``who``, pings, replays, input that was
refused). A replay costs one command plus one per ``REPLAY_MESSAGES_PER_TOKEN`` messages asked
for, since it is the client's most expensive request. With client addresses counted
(``--max-per-address``), each address has allowances too, ``ADDRESS_MULTIPLIER`` times a
client's, so opening more connections does not buy more.

A refusal tells the client when to retry. A client refused ``STRIKE_BURST`` times faster than
``STRIKE_RATE`` per second did not listen: it is disconnected (``TooManyRequests``), so a flood
costs the gateway a bounded amount, not a core.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.security import TokenBucket, address_key

# A person sends a command every few seconds; a reconnecting client a hello and a replay. Five
# a second with a burst of 20 is ample for both, and bounds what one client can make Redis do
# (a join costs a SUBSCRIBE, presence writes and a notice).
COMMAND_RATE_PER_SECOND: Final = 5.0
COMMAND_BURST: Final = 20
REPLAY_MESSAGES_PER_TOKEN: Final = 100
# One household or office behind one address: ten clients' worth.
ADDRESS_MULTIPLIER: Final = 10
# Addresses remembered at once; past it the least recently seen is forgotten (its allowance
# starts full again), so memory stays bounded whatever the number of addresses.
MAX_TRACKED_ADDRESSES: Final = 65536
# Refusals a client may collect before it is cut: a client that waits for the hint collects
# about one per wait; one that ignores it collects them as fast as it sends.
STRIKE_RATE: Final = 1.0
STRIKE_BURST: Final = 20


class TooManyRequests(Exception):
    """The client kept going after being told to slow down: disconnect it."""


@dataclass(frozen=True, slots=True)
class Rates:
    messages_per_second: float
    message_burst: int
    commands_per_second: float = COMMAND_RATE_PER_SECOND
    command_burst: int = COMMAND_BURST

    def limits(self) -> dict[str, float | int]:
        """As announced in the welcome, so clients can pace themselves (0: unlimited)."""
        return {
            "publish_per_second": self.messages_per_second,
            "publish_burst": self.message_burst if self.messages_per_second > 0 else 0,
            "commands_per_second": self.commands_per_second,
            "commands_burst": self.command_burst if self.commands_per_second > 0 else 0,
        }


class _Allowance:
    """A message bucket and a command bucket; either may be off (rate 0)."""

    def __init__(self, rates: Rates, scale: int, clock: Callable[[], float]) -> None:
        self.messages = _bucket(
            rates.messages_per_second * scale, rates.message_burst * scale, clock
        )
        self.commands = _bucket(
            rates.commands_per_second * scale, rates.command_burst * scale, clock
        )


def _bucket(rate: float, burst: int, clock: Callable[[], float]) -> TokenBucket | None:
    return TokenBucket(rate, burst, clock) if rate > 0 else None


class AddressAllowances:
    """Allowances shared by every client of one address; bounded LRU."""

    def __init__(self, rates: Rates, clock: Callable[[], float]) -> None:
        self._rates = rates
        self._clock = clock
        self._by_address: OrderedDict[str, _Allowance] = OrderedDict()

    def get(self, address: str) -> _Allowance:
        key = address_key(address)
        allowance = self._by_address.get(key)
        if allowance is None:
            allowance = _Allowance(self._rates, ADDRESS_MULTIPLIER, self._clock)
            self._by_address[key] = allowance
            if len(self._by_address) > MAX_TRACKED_ADDRESSES:
                self._by_address.popitem(last=False)
        else:
            self._by_address.move_to_end(key)
        return allowance

    def __len__(self) -> int:
        return len(self._by_address)


class ClientBudget:
    """One client's allowances (and its address's, when addresses are counted)."""

    def __init__(
        self, rates: Rates, clock: Callable[[], float], address: _Allowance | None = None
    ) -> None:
        self._own = _Allowance(rates, 1, clock)
        self._address = address
        self._strikes = TokenBucket(STRIKE_RATE, STRIKE_BURST, clock)

    def charge_message(self) -> None:
        """Raise ``ProtocolError(rate_limited)`` when the client may not publish now."""
        self._charge("messages", 1, "too many messages")

    def charge_command(self, cost: int = 1) -> None:
        """Raise ``ProtocolError(rate_limited)`` when the client may not send a command now."""
        self._charge("commands", cost, "too many commands")

    def charge_replay(self, messages: int) -> None:
        self.charge_command(1 + math.ceil(messages / REPLAY_MESSAGES_PER_TOKEN))

    def strike(self) -> None:
        """A refusal was sent; raise ``TooManyRequests`` once they come too fast."""
        if not self._strikes.try_take():
            raise TooManyRequests

    def _charge(self, kind: str, cost: int, what: str) -> None:
        buckets = [getattr(self._own, kind)]
        if self._address is not None:
            buckets.append(getattr(self._address, kind))
        buckets = [bucket for bucket in buckets if bucket is not None]
        cost = min([cost, *(bucket.burst for bucket in buckets)])  # never ask for the impossible
        waits = [bucket.retry_after(cost) for bucket in buckets]
        if any(wait > 0 for wait in waits):
            self.strike()
            wait = max(0.01, max(waits))
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"{what}; try again in {wait:.2f} s",
                retry_after=round(wait, 3),
            )
        for bucket in buckets:
            bucket.try_take(cost)
