"""Telling a WebSocket/HTTP client from a line client by its first bytes, on one port."""

from __future__ import annotations

from enum import Enum

# Methods we answer; a line client typing "GET lost" is told apart by the " /" or " http".
_HTTP_METHODS = (b"GET ", b"HEAD ")


class Kind(Enum):
    HTTP = "http"
    LINES = "lines"
    UNDECIDED = "undecided"


def classify(first: bytes) -> Kind:
    """HTTP when the bytes so far begin a request line like ``GET /path HTTP/1.1``."""
    for method in _HTTP_METHODS:
        if len(first) < len(method):
            if method.startswith(first):
                return Kind.UNDECIDED
            continue
        if not first.startswith(method):
            continue
        rest = first[len(method) :]
        if not rest:
            return Kind.UNDECIDED
        return Kind.HTTP if rest[:1] == b"/" or rest[:4].lower() == b"http" else Kind.LINES
    return Kind.LINES
