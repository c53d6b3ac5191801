"""Opening a WebSocket to a gateway: TCP, then TLS checked on its own, then the upgrade.

trio-websocket's ``open_websocket_url`` does all three in one go, but when the server's
certificate does not verify, its reader task ends quietly and the caller hears of it only at
the connect timeout, as "timed out" (python-trio/trio-websocket#199). Someone who pointed
``--ca-file`` at the wrong CA should be told so at once, and in those words. So the TLS
handshake is finished here first, and only then is the stream handed to trio-websocket
(``wrap_client_stream``), which speaks WebSocket over it.

Extra headers (the token's ``Authorization: Bearer …``) travel in the upgrade request. Nothing
secret belongs in the URL: the CLI shows it to people, and proxies write it to their logs.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import (
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from broadcast.protocol.errors import CloseCode
from broadcast.security import client_ssl_context

# Closing politely (our close frame, the server's answer) must not hold up leaving.
CLOSE_TIMEOUT = 2.0
# WebSocket runs over HTTP/1.1; saying so lets a TLS-terminating proxy that routes by ALPN agree.
ALPN = ("http/1.1",)

Header = tuple[bytes, bytes]

# OpenSSL's verify codes for a chain that leads to no trusted CA (X509_V_ERR_UNABLE_TO_GET_
# ISSUER_CERT, …_DEPTH_ZERO_SELF_SIGNED_CERT, …_SELF_SIGNED_CERT_IN_CHAIN, …_UNABLE_TO_GET_
# ISSUER_CERT_LOCALLY, …_UNABLE_TO_VERIFY_LEAF_SIGNATURE): a CA we were not told to trust.
_UNKNOWN_ISSUER_CODES = frozenset({2, 18, 19, 20, 21})


class ServerNotTrusted(Exception):
    """The server's certificate did not verify: another CA, another host name, expired.

    Not a network failure: trying again would fail the same way, so nothing retries it.
    ``reason`` is OpenSSL's verdict, e.g. ``unable to get local issuer certificate``;
    ``unknown_issuer`` says the chain leads to no CA we trust (rather than, say, a certificate
    for another host name), which a ``--ca-file`` may cure.
    """

    def __init__(self, reason: str, *, unknown_issuer: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown_issuer = unknown_issuer


@dataclass(frozen=True, slots=True)
class Address:
    """Where a ``ws://`` or ``wss://`` URL points."""

    host: str
    port: int
    resource: str  # path and query, as sent in the request line
    tls: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


def address(url: str) -> Address:
    """The parts of a URL already checked by the command line (scheme, host, port)."""
    parts = urlsplit(url)
    tls = parts.scheme == "wss"
    resource = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return Address(parts.hostname or "", parts.port or (443 if tls else 80), resource, tls)


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: Sequence[Header] = (),
    connect_timeout: float,
    max_message_size: int,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to ``url``, closed (politely, bounded in time) on the way out.

    Raises ``ServerNotTrusted`` for a certificate that does not verify; otherwise, like
    ``open_websocket_url``, a ``HandshakeError`` (``ConnectionRejected`` for an HTTP refusal,
    ``ConnectionTimeout`` when ``connect_timeout`` passes) or an ``OSError`` behind one.
    ``ssl_context`` is for ``wss://``; without one, the system's CAs are trusted.
    """
    where = address(url)
    deadline = trio.current_time() + connect_timeout
    try:
        with trio.fail_at(deadline):
            stream = await _open_stream(where, ssl_context)
    except trio.TooSlowError:
        raise ConnectionTimeout from None
    except OSError as exc:
        raise HandshakeError from exc
    try:
        async with trio.open_nursery() as nursery:  # trio-websocket's reader task lives here
            try:
                with trio.fail_at(deadline):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,  # type: ignore[arg-type]  # any trio Stream will do
                        where.host_header,
                        where.resource,
                        extra_headers=list(headers),
                        max_message_size=max_message_size,
                    )
            except trio.TooSlowError:
                raise ConnectionTimeout from None
            try:
                yield ws
            finally:
                await close_politely(ws)
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from sole.__cause__
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)  # a no-op once the WebSocket closed it


async def close_politely(ws: WebSocketConnection) -> None:
    """Close with 1000 (normal) and wait briefly for the server's answer, even if cancelled.

    Under cancellation trio-websocket's reader task is cancelled too, so the answer cannot be
    heard and this waits CLOSE_TIMEOUT: close before cancelling to leave quickly.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(CloseCode.NORMAL)


async def _open_stream(where: Address, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    """TCP, and for ``wss://`` a finished TLS handshake: its failure is ours to explain."""
    tcp = await trio.open_tcp_stream(where.host, where.port)
    if not where.tls:
        return tcp
    context = ssl_context or client_ssl_context(alpn_protocols=ALPN)
    stream = trio.SSLStream(tcp, context, server_hostname=where.host, https_compatible=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = (cause.verify_message or cause.reason or str(cause)).rstrip(".")
            unknown = cause.verify_code in _UNKNOWN_ISSUER_CODES
            raise ServerNotTrusted(reason, unknown_issuer=unknown) from None
        raise HandshakeError(f"TLS handshake failed ({_tls_reason(cause)})") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def _tls_reason(cause: BaseException | None) -> str:
    """``wrong version number`` from OpenSSL's ``WRONG_VERSION_NUMBER``, and the like."""
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return cause.reason.lower().replace("_", " ")
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[:1].lower() + cause.strerror[1:]
    return "the connection ended" if cause is None else str(cause) or type(cause).__name__


def sole_exception(group: BaseExceptionGroup) -> BaseException:
    """What a nursery of background tasks and our own code means to raise, as
    ``open_websocket_url`` does: the one exception that is not a Cancelled, else a Cancelled.
    Anything less clear (two real failures at once) stays the group it is."""
    real = [exc for exc in group.exceptions if not isinstance(exc, trio.Cancelled)]
    if len(real) > 1:
        return group
    return real[0] if real else group.exceptions[0]
