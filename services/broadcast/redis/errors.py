"""What the users of Redis (bus, presence) raise to their callers."""

from __future__ import annotations


class Unavailable(Exception):
    """Redis cannot take a write or answer a read right now (down, failing over, or no answer in
    time). ``broadcast.bus.BusUnavailable`` is this class."""


class StorageFull(Unavailable):
    """Redis refused a write because it is out of memory (``OOM``: ``maxmemory`` reached with
    the ``noeviction`` policy). Nothing was stored; it lasts until Redis has memory again."""
