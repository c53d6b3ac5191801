"""Telling HTTP (and so WebSocket) from a line client by its first bytes, on one port.

The rule covers every byte sequence, whatever the method: a first line of the form
``TOKEN SP target SP HTTP/d.d`` is an HTTP request line, anything else is a line client. While
the bytes so far could still become such a line (and no newline has ended it), the answer is
``UNDECIDED``: the caller keeps reading. So ``POST``, ``OPTIONS`` or ``BREW`` are HTTP exactly
like ``GET``, and a chat line such as ``hello world`` is a line as soon as its newline comes.
"""

from __future__ import annotations

import re
from enum import Enum

# RFC 9110 token characters (a method), and what a request target may hold (visible bytes).
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TARGET = rb"[\x21-\x7e\x80-\xff]"
_REQUEST_LINE = re.compile(_TCHAR + rb"+ " + _TARGET + rb"+ HTTP/[0-9]\.[0-9]\r?")
# Every prefix of a request line: method, then maybe " target", then maybe a prefix of
# " HTTP/d.d\r".
_REQUEST_LINE_PREFIX = re.compile(
    _TCHAR
    + rb"+(?: (?:"
    + _TARGET
    + rb"+(?: (?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?)?"
)
# A request line longer than this is still HTTP (h11 then refuses it); a line client's line
# is at most 4 KiB, so nothing a line client can send is held back longer than this.
MAX_UNDECIDED_BYTES = 16384


class Kind(Enum):
    HTTP = "http"
    LINES = "lines"
    UNDECIDED = "undecided"


def is_request_line(line: bytes) -> bool:
    """Whether one line (without its ``\\n``) is an HTTP request line."""
    return _REQUEST_LINE.fullmatch(line) is not None


def classify(first: bytes) -> Kind:
    """HTTP when the first line is a request line, LINES when it cannot become one."""
    end = first.find(b"\n")
    if end >= 0:
        return Kind.HTTP if is_request_line(first[:end]) else Kind.LINES
    if not first:
        return Kind.UNDECIDED
    if _REQUEST_LINE_PREFIX.fullmatch(first) is None:
        return Kind.LINES
    return Kind.HTTP if len(first) > MAX_UNDECIDED_BYTES else Kind.UNDECIDED
