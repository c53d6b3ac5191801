"""What the users of Redis (bus, presence) raise to their callers."""

from __future__ import annotations


class Unavailable(Exception):
    """Redis cannot take a write or answer a read right now (down, failing over, or no answer in
    time). ``broadcast.bus.BusUnavailable`` is this class."""
