"""The server API: JSON over HTTP under ``/api/`` for applications (docs/api.md)."""

from broadcast.api.host import ApiHost
from broadcast.api.idempotency import (
    IdempotencyStore,
    MemoryIdempotency,
    RedisIdempotency,
)
from broadcast.api.keys import ApiKeys
from broadcast.api.limits import ApiRates
from broadcast.api.listener import serve_api_listener
from broadcast.api.metrics import ApiCollector
from broadcast.api.options import ApiOptions
from broadcast.api.server import ServerApi

__all__ = [
    "ApiCollector",
    "ApiHost",
    "ApiKeys",
    "ApiOptions",
    "ApiRates",
    "IdempotencyStore",
    "MemoryIdempotency",
    "RedisIdempotency",
    "ServerApi",
    "serve_api_listener",
]
