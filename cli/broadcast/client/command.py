"""``broadcast-cli``: the command line (argparse), the server URL, and the exit code.

``broadcast-server connect …`` calls ``main(["connect", …])`` too, so ``main`` never calls
``sys.exit`` itself: it returns the exit code, usage errors included.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import trio

from broadcast.client.chat import run_chat
from broadcast.client.connection import Target
from broadcast.client.listen import run_listen
from broadcast.client.send import run_send
from broadcast.client.terminal import PipeTerminal, PromptTerminal
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.limits import DEFAULT_CHANNEL, DEFAULT_PORT, HISTORY_LENGTH
from broadcast.protocol.validate import check_channel, check_name

PROG = "broadcast-cli"
DEFAULT_HOST = "127.0.0.1"  # the gateway listens on localhost unless told otherwise
DEFAULT_TIMEOUT = 10.0
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl+C


class UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        target = Target(
            url=compose_url(args.host, args.port, args.url),
            name=args.name,
            channel=args.channel,
            # Scripts (send, listen) come and go without telling everyone in the channel.
            announce=args.command == "connect",
            history=getattr(args, "history", 0),
        )
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help, or a usage error it already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    _never_fail_on_encoding()
    try:
        if args.command == "send":
            return trio.run(run_send, target, args.text, args.timeout)
        if args.command == "listen":
            return trio.run(partial(run_listen, target, as_json=args.json))
        return trio.run(_connect, target)
    except KeyboardInterrupt:  # only before the signal handlers are in place, or during send
        return INTERRUPTED if args.command == "send" else 0


async def _connect(target: Target) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    terminal = PromptTerminal(f"#{target.channel}> ") if interactive else PipeTerminal()
    async with terminal:
        return await run_chat(target, terminal)


def build_parser() -> argparse.ArgumentParser:
    where = argparse.ArgumentParser(add_help=False)
    server = where.add_argument_group("server")
    server.add_argument("--host", help=f"gateway host (default {DEFAULT_HOST})")
    server.add_argument("--port", type=_port, help=f"gateway port (default {DEFAULT_PORT})")
    server.add_argument(
        "--url", help="full WebSocket URL instead of --host/--port, ws:// or wss://"
    )
    server.add_argument("--name", type=_name, help="display name (default: the server's guest-<n>)")
    server.add_argument(
        "--channel", type=_channel, default=DEFAULT_CHANNEL, help="channel (default %(default)s)"
    )

    parser = argparse.ArgumentParser(
        prog=PROG, description="Chat on a broadcast server from the terminal."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replay = argparse.ArgumentParser(add_help=False)
    replay.add_argument(
        "--history",
        type=_history,
        default=0,
        metavar="N",
        help=f"on joining, first show the last N messages of the channel (0-{HISTORY_LENGTH})",
    )

    commands.add_parser(
        "connect",
        parents=[where, replay],
        help="chat interactively",
        description="Chat interactively: type a line and press Enter to send it; "
        "/quit, exit, Ctrl+C or Ctrl+D to leave. With stdin not a terminal, sends its lines.",
    )
    send = commands.add_parser(
        "send",
        parents=[where],
        help="publish one message and exit",
        description="Publish one message, wait for the server's ack and print the message id. "
        "Exit status: 0 accepted, 1 refused by the server, 2 no answer or connection failed.",
    )
    send.add_argument("text", help="the message")
    send.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help="give up after this many seconds (default %(default)g)",
    )
    listen = commands.add_parser(
        "listen",
        parents=[where, replay],
        help="print what arrives until Ctrl+C",
        description="Print messages, joins and leaves as they arrive, until Ctrl+C or SIGTERM; "
        "after a reconnection, the messages missed meanwhile, each message once. "
        "Status lines go to stderr.",
    )
    listen.add_argument(
        "--json", action="store_true", help="one JSON object per line, as received from the server"
    )
    return parser


def compose_url(host: str | None, port: int | None, url: str | None) -> str:
    """The WebSocket URL to use: --url as given, or ws://HOST:PORT/ from the defaults."""
    if url is None:
        host = host or DEFAULT_HOST
        if ":" in host and not host.startswith("["):  # an IPv6 address
            host = f"[{host}]"
        return f"ws://{host}:{port or DEFAULT_PORT}/"
    if host is not None or port is not None:
        raise UsageError("--url already names the server; leave out --host and --port")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise UsageError(f"bad port in --url {url!r}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"--url must look like ws://host:port/ or wss://host/, not {url!r}")
    return urlunsplit(parts._replace(path=parts.path or "/"))


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, not {port}")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _history(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= count <= HISTORY_LENGTH:
        raise argparse.ArgumentTypeError(f"history is 0-{HISTORY_LENGTH} messages, not {count}")
    return count


def _name(text: str) -> str:
    try:
        return check_name(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _channel(text: str) -> str:
    try:
        return check_channel(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _never_fail_on_encoding() -> None:
    """Text the terminal's encoding cannot show becomes ``?`` rather than a crash."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
