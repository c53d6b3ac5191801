"""``broadcast-server``: start a gateway, or ``connect`` as a client (same as broadcast-cli)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

import trio

from broadcast.bus.base import Bus
from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.gateway.server import DRAIN_TIMEOUT_SECONDS, Gateway, PresenceFactory
from broadcast.presence import MemoryPresence, RedisPresence
from broadcast.protocol.limits import DEFAULT_PORT, MAX_CONNECTIONS

log = logging.getLogger("broadcast.gateway")


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    default: object,
    help: str,
    type: Callable[[str], object] = str,
    **extra: object,
) -> None:
    """A flag whose default comes from its BROADCAST_* variable, then from ``default``."""
    variable = "BROADCAST_" + flag.removeprefix("--").upper().replace("-", "_")
    value = os.environ.get(variable)
    parser.add_argument(
        flag,
        type=type,
        default=default if value is None else type(value),
        help=f"{help} [{variable}; default: %(default)s]",
        **extra,  # type: ignore[arg-type]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broadcast-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser(
        "start",
        help="run a gateway",
        description="Run a gateway. Every flag can also be set as a BROADCAST_* variable.",
    )
    _option(start, "--host", "127.0.0.1", "address to bind")
    _option(start, "--port", DEFAULT_PORT, "port for WebSocket, line and HTTP; 0: any", int)
    _option(start, "--redis-url", None, "redis:// or rediss:// URL; none: in-process, one gateway")
    _option(start, "--node-id", f"{socket.gethostname()}-{os.getpid()}", "this gateway's name")
    _option(start, "--drain-timeout", DRAIN_TIMEOUT_SECONDS, "seconds to drain on SIGTERM", float)
    _option(start, "--max-connections", MAX_CONNECTIONS, "clients at once (then server_full)", int)
    _option(
        start, "--log-level", "info", "how much to log",
        choices=["debug", "info", "warning", "error"],
    )  # fmt: skip
    commands.add_parser(
        "connect", help="chat in a terminal (same as broadcast-cli connect)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["connect"]:
        from broadcast.client.command import main as client_main

        return client_main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    gateway = Gateway(
        make_bus(args.redis_url),
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        presence=make_presence(args.redis_url),
    )
    trio.run(serve_until_signalled, gateway)
    return 0


def make_bus(redis_url: str | None) -> Bus:
    return RedisBus(redis_url) if redis_url else MemoryBus()


def make_presence(redis_url: str | None) -> PresenceFactory:
    """Presence lives where the bus does: in Redis for a cluster, in memory for one process."""
    if not redis_url:
        return lambda on_expired: MemoryPresence()
    return lambda on_expired: RedisPresence(redis_url, on_expired=on_expired)


async def serve_until_signalled(gateway: Gateway) -> None:
    """SIGINT or SIGTERM drains the gateway; a second one stops it at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_on_signal, signals, gateway, nursery.cancel_scope)
            await gateway.run()
            nursery.cancel_scope.cancel()


async def _drain_on_signal(
    signals: trio.abc.ReceiveChannel[int], gateway: Gateway, everything: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if gateway.draining:
            log.warning("second %s: stopping now", name)
            everything.cancel()
            return
        log.info("%s: draining", name)
        gateway.stop()
