"""Connections per client address, so one host cannot take every slot of a gateway.

``MAX_CONNECTIONS`` bounds a gateway as a whole; this bounds each client address within it.
Pure bookkeeping: the gateway calls ``try_acquire`` when it accepts a connection and
``release`` in its ``finally``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Final

# An IPv6 host is usually handed a whole /64, so counting single IPv6 addresses would let one
# host open 2**64 "different" clients. Count per /64 instead (what the kernel and most rate
# limiters treat as one subscriber).
IPV6_PREFIX_BITS: Final = 64


def address_key(host: str) -> str:
    """The unit to count for a peer address: the IPv4 address, or the IPv6 /64.

    An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, from a dual-stack socket) counts as the
    IPv4 address it is. Anything that is not an IP address (a Unix socket path) counts as
    itself.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX_BITS), strict=False))
    return str(address)


class AddressLimit:
    """At most ``max_per_address`` open connections per ``address_key``.

    Memory is bounded by the open connections: an address is forgotten when its last
    connection is released.
    """

    def __init__(self, max_per_address: int) -> None:
        if max_per_address < 1:
            raise ValueError("max_per_address must be at least 1")
        self.max_per_address = max_per_address
        self._open: Counter[str] = Counter()

    def try_acquire(self, host: str) -> bool:
        """Count one more connection from ``host``; False (and nothing counted) when full."""
        key = address_key(host)
        if self._open[key] >= self.max_per_address:
            return False
        self._open[key] += 1
        return True

    def release(self, host: str) -> None:
        """A connection counted by ``try_acquire`` ended."""
        key = address_key(host)
        if self._open[key] <= 1:
            del self._open[key]
        else:
            self._open[key] -= 1

    def count(self, host: str) -> int:
        return self._open.get(address_key(host), 0)

    def __len__(self) -> int:
        """Addresses with at least one open connection."""
        return len(self._open)
