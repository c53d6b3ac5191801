"""Message buses: how gateways hear each other. MemoryBus for one process, RedisBus for a cluster."""

from broadcast.bus.base import Bus, BusUnavailable, Delivery, DeliverBatch
from broadcast.bus.memory import MemoryBus

__all__ = ["Bus", "BusUnavailable", "DeliverBatch", "Delivery", "MemoryBus"]
