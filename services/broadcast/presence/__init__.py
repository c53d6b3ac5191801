"""Presence: who is in which channel, cluster-wide (MemoryPresence: one process; RedisPresence:
a cluster, where a dead gateway's clients expire and are reported once)."""

from broadcast.presence.base import OnExpired, PresenceStore
from broadcast.presence.memory import MemoryPresence
from broadcast.presence.redis_presence import RedisPresence

__all__ = ["MemoryPresence", "OnExpired", "PresenceStore", "RedisPresence"]
