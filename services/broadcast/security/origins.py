"""Which web pages may open a WebSocket to us: the handshake's ``Origin`` header.

Browsers let any page open a WebSocket to any host, and send along whatever the user's
browser can reach: a gateway on 127.0.0.1, one inside a company network, cookies. Without a
check, a page on evil.example can talk to a gateway as the user (cross-site WebSocket
hijacking). Browsers always send ``Origin`` on a WebSocket handshake and scripts cannot
forge it, so checking it stops that.

The rules (``OriginPolicy.allows``):

- No ``Origin`` (or an empty one): allowed. The client is not a browser (the CLI, ``nc``,
  websocat, a script), and could send any header it liked anyway; tokens cover it.
- An allow-list configured (``--allowed-origins``): the Origin must equal one entry,
  ``scheme://host[:port]``, the host compared case-insensitively and default ports made
  explicit (``https://a.example`` is ``https://a.example:443``), or match a wildcard entry
  ``https://*.example.com`` (any subdomain, at any depth, but not ``example.com`` itself).
  ``*`` alone allows every origin: it turns the check off, for deployments that want that.
- No allow-list: same-origin only, and only for a ``Host`` a rebinding page cannot choose.
  The Origin's host and port must be the ``Host`` the browser connected to, so the gateway's
  own web page works and every other site is refused. Both headers come from the browser, and
  a DNS-rebinding page (evil.example resolving to 127.0.0.1) makes them agree, so the Host
  must also be loopback (``localhost``, ``127.0.0.0/8``, ``[::1]``) or a name the operator
  gave (``--public-host``). Behind a proxy that rewrites ``Host``, use an allow-list.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

# The port a scheme implies when the URL names none.
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}

ANY_ORIGIN: Final = "*"
_WILDCARD_PREFIX: Final = "*."


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int | None


@dataclass(frozen=True, slots=True)
class _Entry:
    scheme: str
    host: str  # for a wildcard: the suffix, with its leading dot (".example.com")
    port: int | None
    wildcard: bool

    def matches(self, origin: _Origin) -> bool:
        if origin.scheme != self.scheme or origin.port != self.port:
            return False
        if self.wildcard:
            return origin.host.endswith(self.host) and len(origin.host) > len(self.host)
        return origin.host == self.host


class OriginPolicy:
    """Decides a WebSocket handshake's ``Origin``; see the module docstring for the rules.

    ``allowed`` entries are checked when the policy is built: a malformed one is a
    ``ValueError``, so a typo in ``--allowed-origins`` stops the gateway at start instead of
    silently refusing (or allowing) browsers.
    """

    def __init__(
        self, allowed: list[str] | None = None, public_hosts: list[str] | None = None
    ) -> None:
        entries = [entry.strip() for entry in allowed or [] if entry.strip()]
        self.any_origin = ANY_ORIGIN in entries
        self._entries = [_parse_entry(entry) for entry in entries if entry != ANY_ORIGIN]
        self.same_origin_only = not entries
        self.public_hosts = frozenset(_parse_public_host(host) for host in public_hosts or [])

    def allows(self, origin_header: bytes | None, host_header: bytes | None) -> bool:
        """Whether a handshake with these ``Origin`` and ``Host`` header values may go on."""
        if not origin_header or not origin_header.strip():
            return True
        if self.any_origin:
            return True
        origin = _parse_origin(origin_header)
        if origin is None:  # "null" (sandboxed frames, file://), or garbage: never a match
            return False
        if self.same_origin_only:
            return _same_origin(origin, host_header) and self._trusted_host(origin.host)
        return any(entry.matches(origin) for entry in self._entries)

    def _trusted_host(self, host: str) -> bool:
        return _is_loopback(host) or host in self.public_hosts


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_public_host(host: str) -> str:
    """A ``--public-host`` value: a host name as browsers put it in ``Host`` (no port)."""
    split = _split(f"http://{host.strip()}")
    if split is None or not host.strip():
        raise ValueError(f"public host {host!r} is not a host name like chat.example.com")
    return split[1]


def _split(text: str) -> tuple[str, str, int | None] | None:
    """Scheme, lower-case host and port (the scheme's default if none) of ``scheme://host[:port]``
    with nothing after it but an optional ``/``; None if it is not that."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    if (
        not parts.scheme
        or not host
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "?" in text
        or "#" in text
    ):
        return None
    scheme = parts.scheme.lower()
    return scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def _parse_origin(value: bytes) -> _Origin | None:
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if "," in text or " " in text:  # several Origin headers joined: refuse, do not pick one
        return None
    split = _split(text)
    return None if split is None else _Origin(*split)


def _parse_entry(entry: str) -> _Entry:
    scheme, separator, rest = entry.partition("://")
    if not separator:
        raise ValueError(f"allowed origin {entry!r} needs a scheme: https://{entry} (or http://)")
    wildcard = rest.startswith(_WILDCARD_PREFIX)
    if wildcard:
        rest = rest.removeprefix(_WILDCARD_PREFIX)
    split = None if "*" in rest else _split(f"{scheme}://{rest}")
    if split is None:
        raise ValueError(
            f"allowed origin {entry!r} is not scheme://host[:port] or scheme://*.domain[:port]"
        )
    scheme, host, port = split
    return _Entry(scheme, f".{host}" if wildcard else host, port, wildcard)


def _same_origin(origin: _Origin, host_header: bytes | None) -> bool:
    """The Origin names the host and port the browser connected to (the ``Host`` header)."""
    if not host_header:
        return False
    try:
        host_text = host_header.decode("ascii").strip()
    except UnicodeDecodeError:
        return False
    # Host has no scheme: read it with the Origin's, so a missing port means the same default.
    split = _split(f"{origin.scheme}://{host_text}")
    if split is None or "," in host_text:
        return False
    _, host, port = split
    return (host, port) == (origin.host, origin.port)
