"""TLS for the gateway's one port, and for clients connecting to it.

TLS and plain clients share the port: the gateway reads the first bytes, as it already does
to tell HTTP from lines, and a TLS ClientHello is unmistakable (``looks_like_tls``). The bytes
it read are handed back to the TLS layer through ``PrefixedStream``:

    initial = await stream.receive_some(...)
    if tls_context is not None and looks_like_tls(initial):
        stream = trio.SSLStream(PrefixedStream(initial, stream), tls_context, server_side=True)
        await stream.do_handshake()          # under the handshake timeout
        initial = b""                        # then sniff HTTP/lines again, inside TLS

A TLS stream is not a ``trio.SocketStream``, so the outbox never writes to its socket
directly (which would bypass the encryption): ``socket_direct_write`` already returns None.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Final

import trio

# TLS 1.0 and 1.1 are deprecated (RFC 8996); every client we care about speaks 1.2 or 1.3.
MIN_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2

# For TLS 1.2: forward-secret key exchange and authenticated encryption only (Mozilla's
# "intermediate" profile, without DHE). TLS 1.3's suites are all of that kind already.
_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"

# WebSocket runs over HTTP/1.1. Saying so in ALPN lets a client or a TLS-terminating proxy
# that offers h2 settle on HTTP/1.1; a client that offers nothing (a line client) is not
# affected.
DEFAULT_ALPN: Final = ("http/1.1",)

# A TLS record starts with its content type, then the protocol version: 0x16 is a handshake,
# 0x03 0x00-0x04 are SSL 3.0 to TLS 1.3 (ClientHellos say 0x03 0x01 for compatibility).
_HANDSHAKE_RECORD: Final = 0x16
_VERSION_MAJOR: Final = 0x03
_MAX_VERSION_MINOR: Final = 0x04
_CLIENT_HELLO: Final = 0x01  # the handshake message type, the record's sixth byte

# Bytes ``looks_like_tls`` needs to decide; a ClientHello arrives in one segment, far longer.
TLS_SNIFF_BYTES: Final = 3


def server_ssl_context(
    cert_file: str, key_file: str, *, alpn_protocols: Sequence[str] = DEFAULT_ALPN
) -> ssl.SSLContext:
    """The gateway's TLS settings: TLS 1.2 or newer, strong ciphers, no compression or
    renegotiation. ``cert_file`` holds the certificate followed by its chain (fullchain.pem).
    A certificate and key that do not belong together are a ``ValueError`` at start."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MIN_TLS_VERSION
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION  # CRIME
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a cheap CPU attack
    )
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ValueError(
            f"cannot use {cert_file} and {key_file} as a TLS certificate and its key: {exc}"
        ) from None
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    return context


def client_ssl_context(
    ca_file: str | None = None, *, alpn_protocols: Sequence[str] = ()
) -> ssl.SSLContext:
    """A verifying client context: the certificate must chain to a trusted CA and name the
    host. With ``ca_file`` (``--ca-file``) that CA is the *only* one trusted (a private CA);
    without it, the system's CAs are."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = MIN_TLS_VERSION
    # create_default_context already does both; stated so that no refactoring loses them.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    return context


def looks_like_tls(first: bytes) -> bool:
    """Whether a connection's first bytes are a TLS handshake record (a ClientHello).

    Needs ``TLS_SNIFF_BYTES``; fewer is False (see ``could_be_tls``). When the sixth byte is
    there it must be a ClientHello too. No HTTP request or line of text starts like this:
    0x16 is a control character (^V) that nobody types.
    """
    if len(first) < TLS_SNIFF_BYTES:
        return False
    if first[0] != _HANDSHAKE_RECORD or first[1] != _VERSION_MAJOR or first[2] > _MAX_VERSION_MINOR:
        return False
    return len(first) < 6 or first[5] == _CLIENT_HELLO


def could_be_tls(first: bytes) -> bool:
    """Too few bytes to tell, but they begin like TLS: read more before deciding."""
    header = bytes([_HANDSHAKE_RECORD, _VERSION_MAJOR])
    return 0 < len(first) < TLS_SNIFF_BYTES and header.startswith(first)


class PrefixedStream(trio.abc.Stream):
    """A stream that first gives back bytes already read from it, then reads on.

    The gateway has to read a connection's first bytes to know whether it is TLS; this hands
    them to ``trio.SSLStream`` as if they had never been taken. Writes and closing go
    straight to the wrapped stream.
    """

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self.stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
