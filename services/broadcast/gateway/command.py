"""``broadcast-server``: start a gateway, or ``connect`` as a client (same as broadcast-cli)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from broadcast.bus.base import Bus
from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.gateway.access import MESSAGE_BURST, MESSAGE_RATE_PER_SECOND, AccessPolicy
from broadcast.gateway.server import DRAIN_TIMEOUT_SECONDS, Gateway, PresenceFactory
from broadcast.presence import MemoryPresence, RedisPresence
from broadcast.protocol.limits import (
    DEFAULT_PORT,
    HISTORY_LENGTH,
    HISTORY_MAX_AGE_SECONDS,
    MAX_CONNECTIONS,
)
from broadcast.security import (
    AddressLimit,
    OriginPolicy,
    SecretFilter,
    TokenVerifier,
    server_ssl_context,
)

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
    _option(start, "--history-length", HISTORY_LENGTH, "messages kept per channel", int)
    _option(start, "--history-age", HISTORY_MAX_AGE_SECONDS, "seconds a message is kept", float)
    _option(start, "--drain-timeout", DRAIN_TIMEOUT_SECONDS, "seconds to drain on SIGTERM", float)
    _option(start, "--max-connections", MAX_CONNECTIONS, "clients at once (then server_full)", int)
    _option(start, "--auth-secret", None, "HS256 secret: clients must present a token")
    _option(start, "--auth-public-key", None, "PEM file of an RS256/ES256 public key for tokens")
    _option(start, "--tls-cert", None, "PEM certificate (chain): serve wss:// and TLS lines")
    _option(start, "--tls-key", None, "PEM private key for --tls-cert")
    _option(start, "--allowed-origins", None, "comma-separated web origins allowed to connect")
    _option(
        start,
        "--message-rate",
        MESSAGE_RATE_PER_SECOND,
        "messages/s per client; 0: no limit",
        float,
    )
    _option(start, "--message-burst", MESSAGE_BURST, "messages a client may send at once", int)
    _option(start, "--max-per-address", 0, "connections per client address; 0: no limit", int)
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
    SecretFilter([s for s in (args.auth_secret, args.redis_url) if s]).install()
    try:
        access = make_access(args)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    warn_if_open(args.host, access)
    gateway = Gateway(
        make_bus(args.redis_url, args.history_length, args.history_age),
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        access=access,
        presence=make_presence(args.redis_url),
    )
    trio.run(serve_until_signalled, gateway)
    return 0


def make_access(args: argparse.Namespace) -> AccessPolicy:
    """The security settings, checked now so a bad key or certificate stops the start."""
    verifier = None
    if args.auth_secret and args.auth_public_key:
        raise ValueError("give --auth-secret or --auth-public-key, not both")
    if args.auth_secret:
        verifier = TokenVerifier(secret=args.auth_secret)
    elif args.auth_public_key:
        verifier = TokenVerifier(public_key=Path(args.auth_public_key).read_text())
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    return AccessPolicy(
        verifier=verifier,
        origins=OriginPolicy(origins or None),
        tls=server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None,
        message_rate=args.message_rate,
        message_burst=args.message_burst,
        addresses=AddressLimit(args.max_per_address) if args.max_per_address > 0 else None,
    )


def warn_if_open(host: str, access: AccessPolicy) -> None:
    """Safe by default: open only on loopback; anywhere else, say loudly that it is open."""
    if access.auth_required:
        log.info("authentication: tokens required (%s)", access.verifier.algorithm)  # type: ignore[union-attr]
        return
    loopback = host in ("127.0.0.1", "::1", "localhost")
    if loopback:
        log.info("authentication: off (open to anyone who can reach %s)", host)
    else:
        log.warning(
            "NO AUTHENTICATION on %s: anyone who can reach this port can read and post as any "
            "name. Set --auth-secret or --auth-public-key (docs/security.md).",
            host,
        )


def make_bus(redis_url: str | None, history_length: int, history_age: float) -> Bus:
    history = {"history_length": history_length, "history_max_age": history_age}
    return RedisBus(redis_url, **history) if redis_url else MemoryBus(**history)


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
