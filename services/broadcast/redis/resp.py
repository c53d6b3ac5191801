"""A small trio-native Redis connection: RESP2 commands out, replies parsed by ``hiredis.Reader``.

Why not redis-py or coredis: thread hops and per-command overhead cost 20–300 µs per message, raw
RESP on trio streams about 1 µs (``shared/research/redis-and-fanout.md``, section A).

Every call is bounded by the connection's ``command_timeout``: a property of the connection, not
of each call, since the bus uses one value everywhere. A connection is used by one task at a
time, except that one task may ``send`` while another waits in ``receive_replies`` (the SUBSCRIBE
connection). After a timeout, a transport error or a cancellation in the middle of a command the
connection's state is unknown (half a command may be on the wire, replies may be pending), so it
closes itself and every later call raises ``RedisConnectionError``.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import hiredis
import trio

DEFAULT_PORT = 6379
# One receive_some per read. 64 KiB holds hundreds of replies to a pipelined batch; the research
# measured no gain from larger reads on the publish path (the subscriber passes its own size).
RECEIVE_SIZE = 65536

Arg = bytes | str | int | float
T = TypeVar("T")


class RedisError(Exception):
    """Base of everything this module raises."""


class RedisConnectionError(RedisError):
    """The connection could not be made, broke, or was closed; it cannot be used again."""


class RedisTimeout(RedisError):
    """Redis did not answer in time. The connection is closed: its state is unknown."""


class RedisReplyError(RedisError):
    """Redis answered one command with an error (``-ERR …``); the connection stays usable."""

    @property
    def code(self) -> str:
        """The error's first word, e.g. ``NOSCRIPT`` or ``WRONGPASS``."""
        return str(self).split(" ", 1)[0]


_TRANSPORT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    hiredis.ProtocolError,
)


@dataclass(frozen=True)
class RedisAddress:
    """Where and how to connect, parsed from a URL the way redis-py reads it."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def redacted(self) -> str:
        """The URL for logs: the password never appears, only ``***`` in its place."""
        scheme = "rediss" if self.tls else "redis"
        user = quote(self.username, safe="") if self.username else ""
        secret = ":***" if self.password is not None else ""
        auth = f"{user}{secret}@" if user or secret else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS, ``?db=N`` wins over
    the path, as in redis-py. Other query parameters are ignored. Errors never quote the URL, since
    it may hold a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}:"
            " use redis://, rediss:// or redis+sentinel://"
        )
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("the Redis URL has an invalid port") from None
    db_text = parse_qs(parts.query).get("db", [parts.path.lstrip("/") or "0"])[0]
    try:
        db = int(db_text)
    except ValueError:
        raise ValueError(f"the Redis database must be a number, not {db_text!r}") from None
    return RedisAddress(
        host=parts.hostname or "localhost",
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
    )


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + encode_bulk_strings(args)


def encode_bulk_strings(args: Iterable[Arg]) -> bytes:
    """The arguments part of a command, so callers can cache a command's fixed prefix."""
    out: list[bytes] = []
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


async def open_connection(
    address: RedisAddress | str,
    *,
    command_timeout: float,
    client_name: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> RedisConnection:
    """Connect, wrap in TLS for ``rediss://``, then AUTH, SELECT and CLIENT SETNAME in one write.

    Connecting and the setup are each bounded by ``command_timeout``, as is every later call.
    Raises RedisTimeout, RedisConnectionError, or RedisReplyError (e.g. ``WRONGPASS``).
    """
    if isinstance(address, str):
        address = parse_url(address)
    name = address.redacted()
    try:
        with trio.fail_after(command_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
            if address.tls:
                context = ssl_context or ssl.create_default_context()
                stream = trio.SSLStream(stream, context, server_hostname=address.host)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
    except trio.TooSlowError:
        raise RedisTimeout(f"{name}: no connection within {command_timeout} s") from None
    except _TRANSPORT_ERRORS as exc:
        raise RedisConnectionError(f"{name}: cannot connect: {_describe(exc)}") from exc

    connection = RedisConnection(stream, name, command_timeout)
    setup: list[Sequence[Arg]] = []
    if address.password is not None:
        credentials = (
            (address.username, address.password) if address.username else (address.password,)
        )
        setup.append(("AUTH", *credentials))
    if address.db:
        setup.append(("SELECT", address.db))
    if client_name:
        setup.append(("CLIENT", "SETNAME", client_name))
    if not setup:
        return connection
    try:
        for reply in await connection.pipeline(setup):
            if isinstance(reply, RedisReplyError):
                raise reply  # the first error is the cause (a failed AUTH fails what follows)
    except BaseException:
        await connection.aclose()
        raise
    return connection


class RedisConnection:
    """One RESP2 connection; see the module docstring for who may use it when."""

    def __init__(self, stream: trio.abc.Stream, name: str, command_timeout: float) -> None:
        self._stream = stream
        self.command_timeout = command_timeout
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._closed = False
        self.name = name
        """The redacted URL, for logs and error messages."""

    @property
    def closed(self) -> bool:
        return self._closed

    async def execute(self, *args: Arg) -> Any:
        """Run one command; an error reply raises RedisReplyError."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[Any]:
        """Send every command in one write and return their replies in order. An error reply is
        returned in its place as a RedisReplyError instance, so it fails that command only."""
        encoded = [encode_command(command) for command in commands]
        return await self.roundtrip(b"".join(encoded), len(encoded))

    async def roundtrip(self, data: bytes, count: int) -> list[Any]:
        """Write already encoded commands and read ``count`` replies (the publisher's fast path)."""

        async def write_then_read() -> list[Any]:
            await self._stream.send_all(data)
            return await self._read(count)

        return await self._guarded(write_then_read, self.command_timeout)

    async def send(self, data: bytes) -> None:
        """Write already encoded commands without reading (subscribed mode: a reader task reads)."""
        await self._guarded(lambda: self._stream.send_all(data), self.command_timeout)

    async def receive_replies(self, max_bytes: int = RECEIVE_SIZE) -> list[Any]:
        """Wait for one read from the socket and return every reply it completed (maybe none).
        No timeout: the caller decides when silence means a dead connection."""

        async def read_once() -> list[Any]:
            data = await self._stream.receive_some(max_bytes)
            if not data:
                raise RedisConnectionError(f"{self.name}: connection closed by the server")
            reader = self._reader
            reader.feed(_buffer(data))
            replies = []
            while (reply := reader.gets()) is not False:
                replies.append(reply)
            return replies

        return await self._guarded(read_once, None)

    async def aclose(self) -> None:
        """Close at once; safe to call twice and while cancelled."""
        self._closed = True
        await trio.aclose_forcefully(self._stream)

    async def _read(self, count: int) -> list[Any]:
        replies: list[Any] = []
        reader = self._reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise RedisConnectionError(f"{self.name}: connection closed by the server")
                reader.feed(_buffer(data))
            else:
                replies.append(reply)
        return replies

    async def _guarded(self, operation: Callable[[], Awaitable[T]], limit: float | None) -> T:
        """Run one I/O step within ``limit`` seconds; any failure or cancellation closes the
        connection."""
        if self._closed:
            raise RedisConnectionError(f"{self.name}: connection is closed")
        try:
            with trio.fail_after(limit) if limit is not None else nullcontext():
                return await operation()
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, trio.TooSlowError):
                raise RedisTimeout(f"{self.name}: no answer within {limit} s") from None
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise RedisConnectionError(f"{self.name}: {_describe(exc)}") from exc
            raise


def _describe(exc: BaseException) -> str:
    """A short reason for logs: the message, or the type when there is none."""
    text = str(exc)
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        text = f"{text} ({exc.__cause__})" if text else str(exc.__cause__)
    return text or type(exc).__name__


def _buffer(data: bytes | bytearray) -> bytes:
    """What a stream read gives (``bytes``, or ``bytearray`` from TLS), as hiredis's stubs
    type ``feed``: hiredis reads any buffer, so this is only a cast, never a copy."""
    return cast(bytes, data)
