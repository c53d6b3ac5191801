"""``broadcast-server start``: run a gateway.

A mistake in how it is started (a flag or BROADCAST_* variable out of range, a malformed Redis
URL, a port already in use, an address this machine does not have, a key it cannot read) is one
line on stderr, ``broadcast-server: error: ...``, and exit status 2, before anything is logged.
Everything that can be checked before the gateway runs is checked here; the gateway logs
"listening" only once its port is bound.

A Redis that cannot be reached at start is not a mistake in the command: the gateway starts, is
not ready (``/readyz`` answers 503) and keeps reconnecting, so the start order of Redis and the
gateways does not matter (Kubernetes, compose).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import trio

import broadcast
from broadcast.api.options import api_key_secrets, api_options, listen_address
from broadcast.bus.base import Bus
from broadcast.bus.memory import HISTORY_BYTES, MIN_HISTORY_BYTES, MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.gateway.access import MESSAGE_BURST, MESSAGE_RATE_PER_SECOND, AccessPolicy
from broadcast.gateway.budget import COMMAND_BURST, COMMAND_RATE_PER_SECOND
from broadcast.gateway.server import DRAIN_TIMEOUT_SECONDS, Gateway, PresenceFactory
from broadcast.presence import MemoryPresence, RedisPresence
from broadcast.protocol.limits import (
    DEFAULT_PORT,
    HISTORY_LENGTH,
    HISTORY_MAX_AGE_SECONDS,
    MAX_CONNECTIONS,
)
from broadcast.security import AddressLimit, OriginPolicy, TokenVerifier, server_ssl_context
from broadcast.security.redact import SecretFilter, url_secrets

log = logging.getLogger("broadcast.gateway")

PROGRAM = "broadcast-server"
# What argparse exits with on a usage error; every mistake in the start command uses it too.
EXIT_USAGE = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


class StartError(Exception):
    """Why the gateway cannot start, as one line for the person who started it."""


def fail(message: str) -> NoReturn:
    """The one stderr line of a start that cannot go on, then exit status 2."""
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) under the program's plain name."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message.removeprefix('argument ')} (see {self.prog} --help)")


# -- flag values: each converter says what it wants, never echoing a value that may be a secret --


def _port(text: str) -> int:
    number = int(_number(text, int, "a whole number"))
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(
            f"a port is a whole number from 0 to 65535 (0: any free port), not {text!r}"
        )
    return number


def _at_least(minimum: float, kind: type[int] | type[float]) -> Callable[[str], float]:
    noun = "a whole number" if kind is int else "a number"

    def convert(text: str) -> float:
        value = _number(text, kind, noun)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {noun} of at least {minimum}, not {text!r}")
        return value

    return convert


def _above_zero(text: str) -> float:
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
    return value


def _number(text: str, kind: type[int] | type[float], noun: str) -> int | float:
    try:
        value = kind(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {noun}, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _redis_url(text: str) -> str:
    """A ``redis://``, ``rediss://``, ``redis+sentinel://`` or ``redis+cluster://`` URL. Never
    quoted back: it may hold a password."""
    if text.startswith(("redis+sentinel://", "redis+cluster://")):  # checked by broadcast.redis
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises on a port that is not a number in range
    except ValueError:
        raise argparse.ArgumentTypeError(
            "not a Redis URL: the port must be a number from 0 to 65535"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise argparse.ArgumentTypeError(
            "a Redis URL starts with redis:// or rediss://, e.g. redis://localhost:6379/0"
        )
    return text


def _not_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.lower()


# -- the command line ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    """A flag that can also be set as a BROADCAST_* variable; the flag wins."""

    dest: str
    variable: str
    default: object
    convert: Callable[[str], object]


_UNSET = object()


def _option(
    parser: argparse.ArgumentParser,
    settings: list[_Setting],
    flag: str,
    default: object,
    help: str,
    convert: Callable[[str], object] = str,
    shown: str | None = None,
    metavar: str | None = None,
) -> None:
    """``flag`` and its variable; ``shown`` is the default as --help says it (none: no default)."""
    variable = "BROADCAST_" + flag.removeprefix("--").upper().replace("-", "_")
    dest = flag.removeprefix("--").replace("-", "_")
    if shown is None and default is not None:
        shown = str(default)
    where = f"{variable}; default: {shown}" if shown is not None else variable
    parser.add_argument(
        flag,
        type=convert,
        default=_UNSET,
        metavar=metavar or dest.upper(),
        help=f"{help} [{where}]".replace("%", "%%"),
    )
    settings.append(_Setting(dest, variable, default, convert))


def build_parser() -> tuple[argparse.ArgumentParser, list[_Setting]]:
    parser = _Parser(
        prog=PROGRAM,
        description="Run a broadcast gateway: WebSocket, line and HTTP clients on one port.",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {broadcast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="start")
    start = commands.add_parser(
        "start",
        help="run a gateway",
        description="Run a gateway. Every flag can also be set as a BROADCAST_* variable; "
        "the flag wins.",
    )
    settings: list[_Setting] = []

    def option(
        flag: str,
        default: object,
        help: str,
        convert: Callable[[str], object] = str,
        shown: str | None = None,
        metavar: str | None = None,
    ) -> None:
        _option(start, settings, flag, default, help, convert, shown, metavar)

    # fmt: off
    option("--host", "127.0.0.1", "address to listen on; 0.0.0.0: every IPv4 address", _not_empty)
    option("--port", DEFAULT_PORT, "port for WebSocket, line and HTTP clients; 0: any free", _port)
    option("--redis-url", None, "the Redis that joins gateways into a cluster: redis:// or "
           "rediss:// (one Redis, TLS), redis+sentinel://HOST:PORT,.../MASTER (Sentinel), "
           "redis+cluster://HOST:PORT,... (Redis Cluster 7+); none: in-process, one gateway",
           _redis_url, metavar="URL")
    option("--node-id", None, "this gateway's name in welcomes and message origins", _not_empty,
           shown="host name-pid", metavar="NAME")
    option("--history-length", HISTORY_LENGTH, "messages kept per channel", _at_least(1, int),
           metavar="N")
    option("--history-age", HISTORY_MAX_AGE_SECONDS, "seconds a message is kept", _above_zero,
           metavar="SECONDS")
    option("--history-bytes", HISTORY_BYTES, "bytes of history kept across all channels, "
           "least recently used channels forgotten first (in-process bus; with Redis: its "
           "maxmemory)", _at_least(MIN_HISTORY_BYTES, int), metavar="BYTES")
    option("--drain-timeout", DRAIN_TIMEOUT_SECONDS, "seconds to drain clients on SIGTERM",
           _at_least(0, float), metavar="SECONDS")
    option("--max-connections", MAX_CONNECTIONS, "clients at once (then server_full)",
           _at_least(1, int), metavar="N")
    option("--max-per-address", 0, "connections per client address; 0: no limit (behind a load "
           "balancer every client has its address)", _at_least(0, int), metavar="N")
    option("--message-rate", MESSAGE_RATE_PER_SECOND, "messages per second per client; 0: no "
           "limit", _at_least(0, float), metavar="PER_SECOND")
    option("--message-burst", MESSAGE_BURST, "messages a client may send at once",
           _at_least(1, int), metavar="N")
    option("--command-rate", COMMAND_RATE_PER_SECOND, "other commands (join, who, replay...) "
           "per second per client; 0: no limit", _at_least(0, float), metavar="PER_SECOND")
    option("--command-burst", COMMAND_BURST, "commands a client may send at once",
           _at_least(1, int), metavar="N")
    option("--auth-secret", None, "HS256 secret: clients must present a token", metavar="SECRET")
    option("--auth-public-key", None, "PEM file of an RS256/ES256 public key: clients must "
           "present a token", metavar="PEM")
    option("--tls-cert", None, "PEM certificate (chain): serve wss:// and TLS lines", metavar="PEM")
    option("--tls-key", None, "PEM private key of --tls-cert", metavar="PEM")
    option("--allowed-origins", None, "comma-separated web origins allowed to connect (none: "
           "same-origin pages only)", metavar="ORIGINS")
    option("--public-host", None, "comma-separated host names browsers use to reach this "
           "gateway (its own page works there; loopback always does)", metavar="HOSTS")
    option("--log-level", "info", "how much to log: " + ", ".join(LOG_LEVELS), _log_level,
           metavar="LEVEL")
    start.add_argument("--api-key", action="append", default=[], metavar="KEY", help="a key "
                       "that opens the server API under /api/ (repeatable; none: API off) "
                       "[BROADCAST_API_KEY]; docs/api.md")
    start.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                       help="a file of API keys, one a line (repeatable) [BROADCAST_API_KEY_FILE]")
    option("--api-listen", None, "serve the server API on this internal address only, not on "
           "--port", listen_address, metavar="HOST:PORT")
    # fmt: on
    return parser, settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, then the BROADCAST_* variables for flags not given, then the defaults."""
    parser, settings = build_parser()
    args = parser.parse_args(argv)
    for setting in settings:
        if getattr(args, setting.dest) is not _UNSET:
            continue
        value = os.environ.get(setting.variable)
        if value is None:
            setattr(args, setting.dest, setting.default)
            continue
        try:
            setattr(args, setting.dest, setting.convert(value))
        except argparse.ArgumentTypeError as exc:
            fail(f"{setting.variable}: {exc}")
    if args.node_id is None:
        args.node_id = f"{socket.gethostname()}-{os.getpid()}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    secrets = SecretFilter(
        [
            args.auth_secret or "",
            *(url_secrets(args.redis_url) if args.redis_url else []),
            *api_key_secrets(args),
        ]
    )
    try:
        access = make_access(args)
        bus = make_bus(args.redis_url, args.history_length, args.history_age, args.history_bytes)
        check_can_listen(args.host, args.port)
        gateway = Gateway(
            bus,
            node_id=args.node_id,
            host=args.host,
            port=args.port,
            drain_timeout=args.drain_timeout,
            max_connections=args.max_connections,
            access=access,
            presence=make_presence(args.redis_url),
            api=api_options(args),  # the server API (docs/api.md); off without a key
        )
    except (StartError, ValueError) as exc:
        fail(secrets.redact(str(exc)))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    secrets.install()
    warn_if_open(args.host, access)
    problem = trio.run(serve_until_signalled, gateway)
    if problem is not None:
        fail(secrets.redact(problem))
    return 0


def make_access(args: argparse.Namespace) -> AccessPolicy:
    """The security settings, checked now so a bad key or certificate stops the start."""
    verifier = None
    if args.auth_secret and args.auth_public_key:
        raise StartError("give --auth-secret or --auth-public-key, not both")
    if args.auth_secret:
        verifier = TokenVerifier(secret=args.auth_secret)
    elif args.auth_public_key:
        verifier = TokenVerifier(public_key=_read("--auth-public-key", args.auth_public_key))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            _read(flag, path)
        tls = server_ssl_context(args.tls_cert, args.tls_key)
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    return AccessPolicy(
        verifier=verifier,
        origins=OriginPolicy(
            origins or None,
            public_hosts=[h.strip() for h in (args.public_host or "").split(",") if h.strip()],
        ),
        tls=tls,
        message_rate=args.message_rate,
        message_burst=args.message_burst,
        command_rate=args.command_rate,
        command_burst=args.command_burst,
        addresses=AddressLimit(args.max_per_address) if args.max_per_address > 0 else None,
    )


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM file"
        raise StartError(f"{flag} {path}: {reason.lower()}") from None


def check_can_listen(host: str, port: int) -> None:
    """Bind where the gateway will (as trio does), and let go: a busy port or a foreign
    address is a one-line error before anything starts, rather than a traceback after the
    bus is already up. The gateway binds again at once; losing that race is reported too."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartError(
            f"cannot listen on {host}: no such host ({(exc.strerror or str(exc)).lower()})"
        ) from None
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:
                continue  # trio skips address families the system lacks, too
            raise StartError(listen_problem(host, port, exc)) from None
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                sock.listen()
            except OSError as exc:
                raise StartError(listen_problem(host, port, exc)) from None


def listen_problem(host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = "the port is in use (another gateway? pick another --port)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this machine (0.0.0.0 listens on all of them)"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    else:
        why = (exc.strerror or str(exc)).lower()
    return f"cannot listen on {where}: {why}"


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


def make_bus(
    redis_url: str | None,
    history_length: int,
    history_age: float,
    history_bytes: int = HISTORY_BYTES,
) -> Bus:
    if not redis_url:
        return MemoryBus(
            history_length=history_length,
            history_max_age=history_age,
            history_bytes=history_bytes,
        )
    try:
        return RedisBus(redis_url, history_length=history_length, history_max_age=history_age)
    except ValueError as exc:  # its messages never quote the URL
        raise StartError(f"--redis-url: {exc}") from None


def make_presence(redis_url: str | None) -> PresenceFactory:
    """Presence lives where the bus does: in Redis for a cluster, in memory for one process."""
    if not redis_url:
        return lambda on_expired: MemoryPresence()
    return lambda on_expired: RedisPresence(redis_url, on_expired=on_expired)


async def serve_until_signalled(gateway: Gateway) -> str | None:
    """Run until SIGINT or SIGTERM drains the gateway (a second one stops it at once).
    Returns why the gateway could not listen, if it could not: the port was taken between
    ``check_can_listen`` and the gateway's own bind."""
    problem: str | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_on_signal, signals, gateway, nursery.cancel_scope)
            try:
                await nursery.start(_serve, gateway, nursery.cancel_scope)
            except* OSError as group:
                problem = listen_problem(gateway.host, gateway.port, _first_leaf(group))
                nursery.cancel_scope.cancel()
    return problem


async def _serve(
    gateway: Gateway,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    await gateway.run(task_status=task_status)
    everything.cancel()  # the signal watcher too


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, OSError)
    return first


async def _drain_on_signal(
    signals: AsyncIterator[int], gateway: Gateway, everything: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if gateway.draining:
            log.warning("second %s: stopping now", name)
            everything.cancel()
            return
        log.info("%s: draining", name)
        gateway.stop()
