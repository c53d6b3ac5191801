"""Message buses: how gateways hear each other (MemoryBus: one process; RedisBus: a cluster)."""

from broadcast.bus.base import Bus, BusUnavailable, DeliverBatch, Delivery, History, StorageFull
from broadcast.bus.memory import MemoryBus

__all__ = [
    "Bus",
    "BusUnavailable",
    "DeliverBatch",
    "Delivery",
    "History",
    "MemoryBus",
    "StorageFull",
]
