"""How fast the server API may be called: per API key, and wrong keys per client address.

Each API key has a token bucket (generous: it is there so one runaway script cannot take the
gateway's cores from the clients, not to meter applications). Failed authentications (no key,
a wrong one) are counted per client address, and an address over its allowance is refused
*before* its key is checked, so a refusal tells nothing about the key and guessing one is
``failed_per_second`` tries a second at most.

Behind a proxy every request has the proxy's address: serve the API on an internal address
(``--api-listen``) so wrong keys from the internet cannot lock out the applications.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from broadcast.security import PrefixedStream, TokenBucket, address_key

# Far more than an application publishes (one request per event); a loop gone wrong hits it.
KEY_RATE_PER_SECOND: Final = 200.0
KEY_BURST: Final = 400
# A person mistyping a key tries a few times; a program guessing one tries millions.
FAILED_RATE_PER_SECOND: Final = 5.0
FAILED_BURST: Final = 20
# Addresses remembered at once; past it the least recently seen is forgotten (and its
# allowance starts full again), so memory stays bounded whatever the number of addresses.
MAX_TRACKED_ADDRESSES: Final = 16384
# What a stream without a peer address (a test's memory stream) counts as.
UNKNOWN_ADDRESS: Final = "unknown"


@dataclass(frozen=True, slots=True)
class ApiRates:
    """0 turns a limit off."""

    per_key_per_second: float = KEY_RATE_PER_SECOND
    per_key_burst: int = KEY_BURST
    failed_per_second: float = FAILED_RATE_PER_SECOND
    """Requests without a valid key, per client address (IPv4 address or IPv6 /64)."""
    failed_burst: int = FAILED_BURST


class ApiLimits:
    """The buckets: one per key (keys are few), one per recently seen address (bounded LRU)."""

    def __init__(self, rates: ApiRates, clock: Callable[[], float] = trio.current_time) -> None:
        self._rates = rates
        self._clock = clock
        self._keys: dict[int, TokenBucket] = {}
        self._addresses: OrderedDict[str, TokenBucket] = OrderedDict()

    def key_wait(self, key: int) -> float:
        """0 and one request taken from key number ``key``'s bucket; else seconds to wait."""
        rate, burst = self._rates.per_key_per_second, self._rates.per_key_burst
        if rate <= 0:
            return 0.0
        bucket = self._keys.get(key)
        if bucket is None:
            bucket = self._keys[key] = TokenBucket(rate, burst, self._clock)
        return _take(bucket)

    def failed_wait(self, address: str) -> float:
        """Seconds until ``address`` may try a key again (0: now); takes nothing."""
        bucket = self._address_bucket(address)
        return 0.0 if bucket is None else bucket.retry_after()

    def failed(self, address: str) -> None:
        """``address`` sent no key or a wrong one."""
        bucket = self._address_bucket(address)
        if bucket is not None:
            bucket.try_take()

    def _address_bucket(self, address: str) -> TokenBucket | None:
        rate, burst = self._rates.failed_per_second, self._rates.failed_burst
        if rate <= 0:
            return None
        unit = address_key(address)
        bucket = self._addresses.get(unit)
        if bucket is None:
            bucket = self._addresses[unit] = TokenBucket(rate, burst, self._clock)
            if len(self._addresses) > MAX_TRACKED_ADDRESSES:
                self._addresses.popitem(last=False)
        else:
            self._addresses.move_to_end(unit)
        return bucket

    def tracked_addresses(self) -> int:
        return len(self._addresses)


def _take(bucket: TokenBucket) -> float:
    if bucket.try_take():
        return 0.0
    return bucket.retry_after()


def peer_address(stream: trio.abc.Stream) -> str:
    """The client's address under TLS and the sniffed-prefix wrapper; UNKNOWN_ADDRESS when
    the stream has no socket."""
    for _ in range(4):  # SSLStream -> PrefixedStream -> SocketStream at most
        if isinstance(stream, trio.SocketStream):
            try:
                return str(stream.socket.getpeername()[0])
            except OSError:  # already gone
                return UNKNOWN_ADDRESS
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        elif isinstance(stream, PrefixedStream):
            stream = stream.stream
        else:
            break
    return UNKNOWN_ADDRESS
