"""The API's settings from the command line, and how a gateway builds its ServerApi."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from broadcast.api.host import ApiHost
from broadcast.api.idempotency import IdempotencyStore, MemoryIdempotency, RedisIdempotency
from broadcast.api.keys import ENVIRONMENT_VARIABLE, ApiKeys
from broadcast.api.limits import ApiRates
from broadcast.api.server import ServerApi
from broadcast.redis.cluster import SCHEME as CLUSTER_SCHEME

log = logging.getLogger("broadcast.api")

KEY_FILE_VARIABLE = "BROADCAST_API_KEY_FILE"


@dataclass(frozen=True)
class ApiOptions:
    keys: ApiKeys = field(default_factory=ApiKeys)
    """No keys: the API is off and ``/api/`` answers 404."""
    redis_url: str | None = None
    """Where idempotency keys live in a cluster (the bus's Redis); None: in this process.
    Set it even without keys: WebSocket ``publish`` with an ``idempotency_key`` uses the store."""
    listen: tuple[str, int] | None = None
    """``--api-listen``: serve the API there only, not on the clients' port."""
    rates: ApiRates = field(default_factory=ApiRates)
    """Requests per key, and requests without a valid key per client address (limits.py)."""

    def build(self, host: ApiHost) -> ServerApi:
        api = ServerApi(host, self.keys, idempotency=self._store(), rates=self.rates)
        api.public = self.listen is None
        return api

    def _store(self) -> IdempotencyStore:
        if not self.redis_url:
            return MemoryIdempotency()
        if self.redis_url.startswith(CLUSTER_SCHEME + "://"):
            # Not on Redis Cluster yet: keys are recognised on the gateway that saw them.
            log.warning("idempotency keys are per gateway with Redis Cluster")
            return MemoryIdempotency()
        return RedisIdempotency(self.redis_url)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) for ``--api-listen``."""
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--api-listen takes HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def listen_address(text: str) -> tuple[str, int]:
    """``--api-listen``'s converter for the command line."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def api_options(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ApiOptions:
    """From ``--api-key``, ``--api-key-file`` (and BROADCAST_API_KEY, BROADCAST_API_KEY_FILE),
    ``--api-listen`` and ``--redis-url``; without a key the API is off, but the idempotency
    store (in Redis with ``--redis-url``) still serves WebSocket publishes.
    Raises ValueError for a key file that cannot be read or a key too short."""
    files = [*args.api_key_file]
    if path := environ.get(KEY_FILE_VARIABLE, "").strip():
        files.append(path)
    try:
        keys = ApiKeys.load(args.api_key, files, environ)
    except OSError as exc:
        raise ValueError(f"cannot read the API key file: {exc.strerror or exc}") from None
    if not keys.enabled and args.api_listen is not None:
        raise ValueError("--api-listen needs an API key (--api-key or --api-key-file)")
    return ApiOptions(keys, redis_url=args.redis_url, listen=args.api_listen)


def api_key_secrets(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every API key the command line names, for the log filter (unreadable files skipped)."""
    try:
        return api_options(args, environ).keys.secrets()
    except ValueError:
        return [*args.api_key, environ.get(ENVIRONMENT_VARIABLE, "")]
