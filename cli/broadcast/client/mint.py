"""``broadcast-cli token``: mint a signed token for a client, as an operator.

The token is an HS256 JWT made with the gateway's ``--auth-secret`` by
``broadcast.security.mint_token``, which checks the name and channels as the gateway will.
Only the token is printed, on one line, so ``TOKEN=$(broadcast-cli token --name alice)`` works.

The secret comes from BROADCAST_AUTH_SECRET, the variable the gateway reads too, or from
``--secret``. The variable is the better way: every user of the machine can read a command
line in ``ps``. Lifetimes are short by default (an hour), since expiry is the only way a token
stops working: there is no revocation list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from broadcast.security import mint_token

SECRET_VARIABLE = "BROADCAST_AUTH_SECRET"
DEFAULT_TTL = "1h"

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_ttl(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h``, ``2d`` or ``1.5h``; ValueError otherwise."""
    match = _TTL.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not a lifetime: {text!r} (seconds, or a number with s, m, h or d)")
    seconds = float(match[1]) * _UNITS[match[2]]
    if not seconds > 0:
        raise ValueError(f"a token needs a lifetime of more than 0 s, not {text!r}")
    return seconds


def parse_channels(text: str) -> list[str]:
    """``a,b`` as ``["a", "b"]``; the names themselves are checked by ``mint_token``."""
    channels = [part.strip() for part in text.split(",")]
    if not any(channels):
        raise ValueError("--channels needs at least one channel (leave it out to allow any)")
    if not all(channels):
        raise ValueError(f"an empty channel name in --channels {text!r}")
    return channels


def secret_from(flag: str | None, environ: Mapping[str, str]) -> str:
    """``--secret``, else the environment; ValueError (never showing it) when there is none."""
    secret = flag if flag is not None else environ.get(SECRET_VARIABLE)
    if not secret:
        raise ValueError(
            f"no secret: set {SECRET_VARIABLE} to the gateway's --auth-secret (or give --secret)"
        )
    return secret


def mint(
    name: str,
    ttl_seconds: float,
    channels: list[str] | None,
    secret_flag: str | None,
    environ: Mapping[str, str],
) -> str:
    """The token; ValueError with a message fit for the person (a short secret, a bad channel)."""
    secret = secret_from(secret_flag, environ)
    return mint_token(secret, name, ttl_seconds, channels)
