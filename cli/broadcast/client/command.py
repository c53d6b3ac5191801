"""``broadcast-cli``: the command line (argparse), the server URL, and the exit code.

``broadcast-server connect …`` calls ``main(["connect", …])`` too, so ``main`` never calls
``sys.exit`` itself: it returns the exit code, usage errors included.

Secrets on the command line are visible to every user in ``ps``, so the token and the minting
secret are better given through the environment (BROADCAST_TOKEN, BROADCAST_AUTH_SECRET); the
help says so. Neither is ever printed, not even in an error about it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import ipaddress
import os
import re
import ssl
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import trio

from broadcast.client.api_command import add_publish_parser, run_publish
from broadcast.client.chat import run_chat
from broadcast.client.connection import Target
from broadcast.client.failures import Fatal, report
from broadcast.client.listen import run_listen
from broadcast.client.mint import DEFAULT_TTL, SECRET_VARIABLE, mint, parse_channels, parse_ttl
from broadcast.client.send import run_send
from broadcast.client.terminal import PipeTerminal, PromptTerminal
from broadcast.client.transport import ALPN
from broadcast.client.who import run_who
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.limits import DEFAULT_CHANNEL, DEFAULT_PORT, HISTORY_LENGTH
from broadcast.protocol.validate import check_channel, check_name
from broadcast.security import client_ssl_context
from broadcast.security.tokens import MAX_TOKEN_BYTES

PROG = "broadcast-cli"
DEFAULT_HOST = "127.0.0.1"  # the gateway listens on localhost unless told otherwise
DEFAULT_TIMEOUT = 10.0
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl+C
TOKEN_VARIABLE = "BROADCAST_TOKEN"
# A JWT in compact form: three base64url parts. Checked before it goes into a header, where a
# stray newline (from a file, a paste) would be refused by the HTTP library with a traceback.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_LOOPBACK_NAMES = frozenset({"localhost"})


class UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    environ = os.environ if environ is None else environ
    used = parser  # for a usage error: the command's own usage line, as argparse gives it
    try:
        args = parser.parse_args(argv)
        used = parser.command_parsers[args.command]  # type: ignore[attr-defined]
        if args.command == "token":
            return _print_token(args, environ)
        if args.command == "publish":  # the server API over HTTP (api_command.py)
            return run_publish(args, environ)
        if args.command == "send" and args.text is None and sys.stdin.isatty():
            raise UsageError("give the message, or pipe lines into send (one message a line)")
        target = make_target(args, environ)
    except UsageError as exc:
        used.print_usage(sys.stderr)
        print(f"{used.prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help, or a usage error it already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    _never_fail_on_encoding()
    try:
        if args.command == "send":
            return trio.run(run_send, target, args.text, args.timeout)
        if args.command == "who":
            return trio.run(partial(run_who, target, as_json=args.json, seconds=args.timeout))
        if args.command == "listen":
            return trio.run(partial(run_listen, target, as_json=args.json))
        return trio.run(_connect, target)
    except KeyboardInterrupt:  # only before the signal handlers are in place, or during send
        return INTERRUPTED if args.command == "send" else 0


def make_target(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """Where and how to connect, from the flags and the environment; UsageError if unusable."""
    url = compose_url(args.host, args.port, args.url, tls=args.tls)
    tls = urlsplit(url).scheme == "wss"
    if args.ca_file is not None and not tls:
        raise UsageError("--ca-file is for TLS: add --tls, or give a wss:// --url")
    token = token_from(args.token, environ)
    if token is not None and not tls and not _is_loopback(urlsplit(url).hostname or ""):
        report(
            f"warning: the token goes to {urlsplit(url).hostname} over plain ws://, readable "
            "by anyone on the way; use --tls or a wss:// URL"
        )
    return Target(
        url=url,
        name=args.name,
        channel=args.channel,
        # Scripts (send, listen, who) come and go without telling everyone in the channel.
        announce=args.command == "connect",
        history=getattr(args, "history", 0),
        token=token,
        ssl_context=tls_context(args.ca_file) if tls else None,
    )


def token_from(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """``--token``, else BROADCAST_TOKEN, stripped; UsageError (never showing it) if malformed."""
    where = "--token" if flag is not None else TOKEN_VARIABLE
    token = (flag if flag is not None else environ.get(TOKEN_VARIABLE, "")).strip()
    if not token:
        if flag is not None:
            raise UsageError("--token is empty")
        return None
    if len(token) > MAX_TOKEN_BYTES or not _TOKEN.fullmatch(token):
        raise UsageError(
            f"{where} does not hold a token: a token is one line of letters, digits, "
            "'-' and '_' in three parts joined by '.' (broadcast-cli token makes one)"
        )
    return token


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A context that verifies the server: against ``ca_file`` only, else the system's CAs."""
    try:
        return client_ssl_context(ca_file, alpn_protocols=ALPN)
    except ssl.SSLError as exc:  # before OSError: it is one
        raise UsageError(f"--ca-file {ca_file}: no usable CA certificate in it ({exc})") from None
    except OSError as exc:
        raise UsageError(f"cannot read --ca-file {ca_file}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _print_token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``broadcast-cli token``: the token alone on stdout, for ``$(…)``."""
    try:
        token = mint(args.name, args.ttl, args.channels, args.secret, environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(token, flush=True)
    return 0


async def _connect(target: Target) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    terminal = PromptTerminal(target.channel) if interactive else PipeTerminal()
    try:
        async with terminal:
            return await run_chat(target, terminal)
    except Fatal as ending:  # said once the prompt has given the terminal back
        report(ending.message)
        return ending.exit_code


def version() -> str:
    """The installed package's version; "unknown" when run from a tree that is not installed."""
    try:
        return importlib.metadata.version("broadcast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    where = argparse.ArgumentParser(add_help=False)
    server = where.add_argument_group("server")
    server.add_argument("--host", help=f"gateway host (default {DEFAULT_HOST})")
    server.add_argument("--port", type=_port, help=f"gateway port (default {DEFAULT_PORT})")
    server.add_argument(
        "--url", help="full WebSocket URL instead of --host/--port, ws:// or wss://"
    )
    server.add_argument(
        "--tls", action="store_true", help="connect with TLS: wss:// instead of ws://"
    )
    server.add_argument(
        "--ca-file",
        metavar="PEM",
        help="trust only this CA for the server's certificate (a private CA); "
        "default: the system's CAs",
    )
    server.add_argument(
        "--token",
        help=f"signed token, when the server asks for one; better: set {TOKEN_VARIABLE}, "
        "since other users can read command lines in ps",
    )
    server.add_argument(
        "--name",
        type=_name,
        help="display name (default: the token's name, else the server's guest-<n>)",
    )
    server.add_argument(
        "--channel", type=_channel, default=DEFAULT_CHANNEL, help="channel (default %(default)s)"
    )

    parser = argparse.ArgumentParser(
        prog=PROG, description="Chat on a broadcast server from the terminal."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
        description="Chat interactively: type a line and press Enter to send it (a pasted "
        "block of lines is one message); /who, /join CHANNEL, /name NAME, /help; /quit, exit, "
        "Ctrl+C or Ctrl+D to leave. With stdin not a terminal, sends each of its lines, paced "
        "to the server's rate, and exits 1 naming any line that was not delivered.",
    )
    send = commands.add_parser(
        "send",
        parents=[where],
        help="publish one message (or each line of stdin) and exit",
        description="Publish one message, wait for the server's ack and print the message id. "
        "Without TEXT, each line of stdin is a message, sent in order at the server's rate, "
        "one id printed per ack. Exit status: 0 all accepted, 1 refused by the server (the "
        "message or the token), 2 no answer, the connection failed or the server's "
        "certificate did not verify.",
    )
    send.add_argument(
        "text", nargs="?", metavar="TEXT", help="the message (default: the lines of stdin)"
    )
    send.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help="give up after this many seconds without an answer (default %(default)g)",
    )
    who = commands.add_parser(
        "who",
        parents=[where],
        help="print who is in the channel and exit",
        description="Print who is in the channel, on every gateway, one name a line; "
        "without showing up there itself. Exit status as for send: 0 answered, "
        "1 refused by the server, 2 no answer, the connection failed or the server's "
        "certificate did not verify.",
    )
    who.add_argument(
        "--json", action="store_true", help="the server's presence event, as one JSON line"
    )
    who.add_argument(
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
    token = commands.add_parser(
        "token",
        help="mint a token for a client (operators, with the gateway's secret)",
        description="Print a token signed with the gateway's HS256 secret (--auth-secret), "
        "and nothing else, for TOKEN=$(broadcast-cli token --name alice). "
        f"The secret comes from {SECRET_VARIABLE}, or --secret; prefer the variable, since "
        "other users can read command lines in ps. Keep lifetimes short: expiry is the only "
        "way to revoke a token.",
    )
    token.add_argument(
        "--name", type=_name, required=True, help="the client's name (the token's sub)"
    )
    token.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TTL,
        metavar="TIME",
        help="lifetime: seconds, or 30m, 1h, 2d (default %(default)s)",
    )
    token.add_argument(
        "--channels",
        type=_channels,
        metavar="A,B",
        help="the only channels the client may use (default: any)",
    )
    token.add_argument(
        "--secret", help=f"the HS256 secret; better: set {SECRET_VARIABLE} (ps shows commands)"
    )
    add_publish_parser(commands)
    parser.command_parsers = commands.choices  # type: ignore[attr-defined]
    return parser


def compose_url(host: str | None, port: int | None, url: str | None, *, tls: bool = False) -> str:
    """The WebSocket URL to use: --url as given, or ws://HOST:PORT/ (wss:// with --tls)."""
    if url is None:
        host = host or DEFAULT_HOST
        if ":" in host and not host.startswith("["):  # an IPv6 address
            host = f"[{host}]"
        return f"{'wss' if tls else 'ws'}://{host}:{port or DEFAULT_PORT}/"
    if host is not None or port is not None:
        raise UsageError("--url already names the server; leave out --host and --port")
    parts = urlsplit(url)
    if any(key == "token" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        # Not even repeated in the message: the URL holds a secret.
        raise UsageError(
            f"a token does not belong in --url (URLs are shown and logged): "
            f"use --token or {TOKEN_VARIABLE}"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise UsageError(f"bad port in --url {url!r}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"--url must look like ws://host:port/ or wss://host/, not {url!r}")
    if tls and parts.scheme != "wss":
        raise UsageError("--tls asks for TLS, but --url says ws://: use a wss:// URL")
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


def _ttl(text: str) -> float:
    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _channels(text: str) -> list[str]:
    try:
        return [check_channel(channel) for channel in parse_channels(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


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
