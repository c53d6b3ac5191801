"""Failures that end a command at once, and how every command tells them: one plain line.

A token the gateway turns away (``Denied`` at the handshake) and a certificate that does not
verify (``ServerNotTrusted``) cannot be cured by waiting and retrying, unlike a network
failure. So ``send``, ``listen`` and ``connect`` all stop and say so on stderr, as
``broadcast-cli: refused: token_expired: …``, with no traceback. Exit codes, for scripts:
1 the server refused us (as for a refused message), 2 no trustworthy connection was made.
"""

from __future__ import annotations

import sys

from broadcast.client.connection import ConnectionLost, Denied, Refused, Unreachable
from broadcast.client.render import error_text
from broadcast.client.sanitize import sanitize
from broadcast.client.transport import ServerNotTrusted

PROG = "broadcast-cli"
REFUSED = 1
FAILED = 2


class Fatal(Exception):
    """The end of a command: what to print (once the terminal is ours again) and its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def fatal(exc: Denied | ServerNotTrusted) -> Fatal:
    """The line and exit code for a failure that no retry can cure."""
    if isinstance(exc, ServerNotTrusted):
        hint = " (a private CA's certificate goes in --ca-file)" if exc.unknown_issuer else ""
        return Fatal(f"cannot verify the server's certificate: {exc.reason}{hint}", FAILED)
    return Fatal(exc.text, REFUSED)


def report(message: str) -> None:
    """``broadcast-cli: message`` on stderr; what came from the network is made safe first."""
    print(f"{PROG}: {sanitize(message)}", file=sys.stderr, flush=True)


ONE_SHOT_FAILURES = (Refused, Denied, ServerNotTrusted, Unreachable, ConnectionLost)
"""What can end a one-shot command (``send``, ``who``) before its answer."""


def one_shot_failure(exc: Exception, url: str, lost_note: str = "") -> int:
    """Say on stderr why a one-shot command got no answer; return its exit code."""
    if isinstance(exc, Refused):
        report(f"the server refused our name or channel: {error_text(exc.event)}")
        return REFUSED
    if isinstance(exc, Denied | ServerNotTrusted):
        ending = fatal(exc)
        report(ending.message)
        return ending.exit_code
    if isinstance(exc, Unreachable):
        report(f"cannot reach {url}: {exc.reason}")
        return FAILED
    assert isinstance(exc, ConnectionLost)
    report(f"connection to {url} lost before an answer ({exc.reason}){lost_note}")
    return FAILED
