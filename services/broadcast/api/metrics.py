"""``broadcast_api_requests_total{route,status}`` for the gateway's ``/metrics``: read from the
API's plain counter at scrape time, as the gateway's own collector does."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from broadcast.api.server import ServerApi


class ApiCollector(Collector):
    """Register on the gateway's registry: ``registry.register(ApiCollector(api))``."""

    def __init__(self, api: ServerApi) -> None:
        self._api = api

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "broadcast_api_requests",
            "Server API requests answered, by route and HTTP status.",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(self._api.requests.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
