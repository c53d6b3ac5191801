"""The names of a channel's Redis keys and pub/sub channel (docs/protocol.md, "Redis").

On one Redis (or Sentinel): ``broadcast:history:<channel>`` and so on. On Redis Cluster every
name carries the channel as a hash tag, ``broadcast:history:{<channel>}``, so that all of them
share one slot (redis/cluster.py), and delivery uses sharded pub/sub (``SPUBLISH``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    sharded: bool = False
    """Redis Cluster: hash-tagged names and sharded pub/sub."""

    def _name(self, kind: str, channel: str) -> str:
        if self.sharded:
            return f"broadcast:{kind}:{{{channel}}}"
        return f"broadcast:{kind}:{channel}"

    def history(self, channel: str) -> str:
        """The stream of the channel's messages."""
        return self._name("history", channel)

    def epoch(self, channel: str) -> str:
        """The channel's epoch (docs/reliability.md, "Epochs")."""
        return self._name("epoch", channel)

    def probe(self, channel: str) -> str:
        """The readiness probe's short-lived key (on the channel's slot)."""
        return self._name("probe", channel)

    def channel(self, channel: str) -> str:
        """The pub/sub channel (a shard channel on Redis Cluster)."""
        return self._name("channel", channel)

    def channel_of(self, name: bytes) -> str | None:
        """The channel a pub/sub channel name is for; None if it is not one of ours."""
        prefix = b"broadcast:channel:"
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix) :].decode(errors="replace")
        return rest[1:-1] if self.sharded else rest

    @property
    def publish(self) -> str:
        return "SPUBLISH" if self.sharded else "PUBLISH"


STANDALONE = Keys()
CLUSTER = Keys(sharded=True)
