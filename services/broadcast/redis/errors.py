"""What the users of Redis (bus, presence) raise to their callers."""

from __future__ import annotations


class Unavailable(Exception):
    """Redis cannot take a write or answer a read right now (down, failing over, or no answer in
    time). ``broadcast.bus.BusUnavailable`` is this class."""


class StorageFull(Unavailable):
    """Redis refused a write because it is out of memory (``OOM``: ``maxmemory`` reached with
    the ``noeviction`` policy). Nothing was stored; it lasts until Redis has memory again."""


class Redirected(Unavailable):
    """Redis Cluster answered ``MOVED``, ``ASK`` or ``TRYAGAIN`` (redis/cluster.py): the command
    was not executed here. ``node`` is where MOVED and ASK point, ``slot`` their slot."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        words = reply.split()
        self.code = words[0] if words else ""
        self.slot: int | None = None
        self.node: tuple[str, int] | None = None
        if self.code in ("MOVED", "ASK") and len(words) >= 3:
            host, _, port = words[2].rpartition(":")
            if port.isdigit():
                self.slot = int(words[1]) if words[1].isdigit() else None
                self.node = (host.strip("[]"), int(port))
