"""API keys: given on the command line, in a file or in the environment; compared in constant
time, never logged (``repr`` hides them)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from broadcast.protocol.http_request import HttpRequest

ENVIRONMENT_VARIABLE = "BROADCAST_API_KEY"
# A shorter key is guessable; 16 characters is what ``openssl rand -hex 8`` gives at least.
MIN_KEY_CHARS = 16


class ApiKeys:
    """The keys that open the server API. Empty means the API is off (``/api/`` answers 404)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys)
        for key in self._keys:
            if len(key) < MIN_KEY_CHARS or not key.isascii() or any(c <= 32 for c in key):
                raise ValueError(
                    f"an API key is at least {MIN_KEY_CHARS} printable ASCII characters, "
                    "no spaces (e.g. openssl rand -hex 32)"
                )

    @classmethod
    def load(
        cls,
        keys: Iterable[str] = (),
        files: Iterable[str | os.PathLike[str]] = (),
        environ: Mapping[str, str] = os.environ,
    ) -> ApiKeys:
        """``--api-key`` values, then one key per non-empty line of each ``--api-key-file``
        (``#`` starts a comment), then ``BROADCAST_API_KEY``."""
        found = [k for k in keys if k]
        for path in files:
            for line in Path(path).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(line)
        if value := environ.get(ENVIRONMENT_VARIABLE, "").strip():
            found.append(value)
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def secrets(self) -> list[str]:
        """For the log redaction filter only."""
        return [k.decode() for k in self._keys]

    def allows(self, request: HttpRequest) -> bool:
        """True when ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` names a key."""
        return self.match(request) is not None

    def match(self, request: HttpRequest) -> int | None:
        """The number of the key the request names (for its rate limit), or None.

        Every configured key is compared, whatever matches first, so the time taken does not
        tell which key (or how much of one) was right.
        """
        presented = _presented_key(request)
        if presented is None:
            return None
        matched = None
        for number, key in enumerate(self._keys):
            if hmac.compare_digest(presented, key):
                matched = number
        return matched

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} keys>)"


def _presented_key(request: HttpRequest) -> bytes | None:
    for name, value in request.headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
        elif name == b"x-api-key" and value.strip():
            return value.strip()
    return None
