"""Counters a gateway keeps about itself, for logs now and /metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class GatewayStats:
    connections_total: int = 0
    connections_open: int = 0
    messages_in: int = 0
    publish_failures: int = 0
    slow_disconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def count_error(self, code: str) -> None:
        self.errors[str(code)] += 1
