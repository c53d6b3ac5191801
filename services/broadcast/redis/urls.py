"""The part of ``redis+sentinel://`` and ``redis+cluster://`` URLs they share: credentials and
a comma-separated list of ``HOST[:PORT]`` (an IPv6 host in brackets). Errors never quote the
URL, which may hold a password."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?")


@dataclass(frozen=True)
class HostListUrl:
    parts: SplitResult
    username: str | None
    password: str | None
    hosts: tuple[tuple[str, int], ...]


def parse_host_list_url(url: str, scheme: str, kind: str, default_port: int) -> HostListUrl:
    """Split ``scheme://[[USER]:PASSWORD@]HOST[:PORT][,…]/…``; ValueError naming ``kind``."""
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ValueError(f"not a {scheme}:// URL")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    hosts = []
    for item in hostlist.split(","):
        match = _HOST_PORT.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"the {kind} URL needs HOST[:PORT] entries separated by commas")
        port = int(match["port"]) if match["port"] else default_port
        if not 0 < port < 65536:
            raise ValueError(f"the {kind} URL has an invalid port")
        hosts.append((match["v6"] or match["host"], port))
    return HostListUrl(parts, username, password, tuple(hosts))
