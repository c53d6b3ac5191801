"""``GET /metrics``: Prometheus text, read from the gateway's own counters at scrape time.

Counters are plain integers bumped on the hot path; prometheus_client only formats them when
scraped (a custom collector), so counting costs nothing per delivery. The one histogram, the
publish-to-delivery lag, is observed once per message per gateway, not per client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broadcast.bus.base import Bus
from broadcast.gateway.hub import ChannelHub
from broadcast.gateway.stats import GatewayStats

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# From 1 ms (same machine) to 10 s (a stalled subscriber): where delivery lag is worth seeing.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Gateway(Protocol):
    """What the metrics read of a gateway, at scrape time."""

    stats: GatewayStats
    hub: ChannelHub
    bus: Bus

    @property
    def ready(self) -> bool: ...


class GatewayMetrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.delivery_lag = Histogram(
            "broadcast_delivery_lag_seconds",
            "Time from a message's acceptance on any gateway to its fan-out on this one.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_GatewayCollector(gateway))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GatewayCollector(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway, stats = self._gateway, self._gateway.stats
        yield _gauge("broadcast_connections", "Open client connections.", stats.connections_open)
        yield _counter(
            "broadcast_connections", "Client connections accepted.", stats.connections_total
        )
        yield _counter(
            "broadcast_messages_published", "Messages accepted from this gateway's clients.",
            stats.messages_in,
        )  # fmt: skip
        yield _counter(
            "broadcast_publish_failures", "Publishes refused because the bus was unavailable.",
            stats.publish_failures,
        )  # fmt: skip
        yield _counter(
            "broadcast_deliveries",
            "Messages and notices written to clients.",
            gateway.hub.deliveries,
        )
        yield _counter(
            "broadcast_slow_disconnects", "Clients disconnected for not reading.",
            stats.slow_disconnects,
        )  # fmt: skip
        errors = CounterMetricFamily(
            "broadcast_client_errors", "Input refused, by error code.", labels=["code"]
        )
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield _gauge(
            "broadcast_channels",
            "Channels with clients on this gateway.",
            gateway.hub.channel_count(),
        )
        yield _gauge(
            "broadcast_ready", "1 while the gateway is ready for clients.", int(gateway.ready)
        )
        yield _counter(
            "broadcast_bus_reconnects", "Times the bus connection was re-established.",
            getattr(gateway.bus, "reconnects", 0),
        )  # fmt: skip
        yield _counter(
            "broadcast_bus_refilled", "Messages fetched from history after a subscriber reconnect.",
            getattr(gateway.bus, "refilled", 0),
        )  # fmt: skip
        yield _counter(
            "broadcast_bus_gaps", "Gap notices sent: messages that could not be refilled.",
            getattr(gateway.bus, "gaps", 0),
        )  # fmt: skip


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
