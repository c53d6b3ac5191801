"""The line protocol for ``nc``: splitting input into lines and rendering events as lines.

What a line client reads is unambiguous by its first characters (docs/protocol.md):

- ``* `` a notice from the server, ``! `` an error from the server;
- ``name: text`` a message; a name starts with a letter, digit or ``_`` and has no colon;
- ``  | more text`` (two spaces, a bar) a further line of the message just above.

So no user can write something that reads as the server, or as another user: every byte a
user chose is after a prefix the server wrote.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import MAX_LINE_BYTES
from broadcast.protocol.validate import check_channel, check_name, check_text, scrub

# Starts every further line of a multi-line message: no name or server line starts with a space.
CONTINUATION: Final = "  | "

# An unknown command is named in the error only if it looks like one; anything else a client
# typed (escape sequences, a paste of binary) is not sent back to its terminal.
_SHOWN_COMMAND = re.compile(r"[A-Za-z0-9_-]{1,24}")

_INVALID_NAME: Final = "(invalid name)"
_INVALID_CHANNEL: Final = "(invalid channel)"


class LineSplitter:
    """Splits a byte stream into decoded lines; never holds more than one line's worth.

    An over-long line is reported once and then skipped up to its newline; a line that is not
    UTF-8 is reported. Errors are yielded as ProtocolError values, in order with the lines.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[str | ProtocolError]:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            yield self._decode(raw.removesuffix(b"\r"))
        if len(self._buffer) > self._max + 1 and not self._discarding:  # +1 for a trailing \r
            self._discarding = True
            yield ProtocolError(
                ErrorCode.LINE_TOO_LONG, f"a line is at most {self._max} bytes; it was discarded"
            )
        if self._discarding:
            self._buffer.clear()

    def _decode(self, raw: bytes) -> str | ProtocolError:
        if len(raw) > self._max:
            return ProtocolError(
                ErrorCode.LINE_TOO_LONG, f"a line is at most {self._max} bytes; it was discarded"
            )
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolError(ErrorCode.INVALID_UTF8, "the line is not valid UTF-8")


@dataclass(frozen=True, slots=True)
class SetName:
    name: str


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class SayText:
    text: str


@dataclass(frozen=True, slots=True)
class JoinChannel:
    channel: str


@dataclass(frozen=True, slots=True)
class Who:
    pass


LineCommand = SetName | Quit | SayText | JoinChannel | Who


def parse_line(line: str) -> LineCommand | None:
    """``/name X``, ``/join C``, ``/who``, ``/quit``, ``//text`` (a message starting with ``/``),
    or a message."""
    if not line.strip():
        return None
    if line.startswith("//"):
        return SayText(line[1:])
    if not line.startswith("/"):
        return SayText(line)
    command, _, argument = line[1:].partition(" ")
    if command == "quit":
        return Quit()
    if command == "name":
        return SetName(argument.strip())
    if command == "join":
        return JoinChannel(argument.strip())
    if command == "who":
        return Who()
    shown = f" /{command}" if _SHOWN_COMMAND.fullmatch(command) else ""
    raise ProtocolError(
        ErrorCode.BAD_COMMAND,
        f"unknown command{shown}; try /name NAME, /join CHANNEL, /who, /quit or //text",
    )


# Names listed in one presence line; the rest are counted.
_NAMES_SHOWN = 5


def render_event(event: dict[str, Any]) -> bytes | None:
    """How a bus event reads on a line client; None for events line clients do not see.

    Events were checked on the way in, but may come from another gateway's version through the
    bus: a field that does not pass today's checks is shown scrubbed, never as it is.
    """
    kind = event.get("type")
    if kind == "message":
        return render_message(event.get("sender"), event.get("text"))
    if kind in ("join", "leave"):
        verb = "joined" if kind == "join" else "left"
        name, channel = _shown_name(event.get("name")), _shown_channel(event.get("channel"))
        return f"* {name} {verb} #{channel}\n".encode()
    if kind == "presence_diff":
        return render_presence_diff(event)
    if kind == "gap":
        channel = _shown_channel(event.get("channel"))
        return f"* some messages in #{channel} may have been lost\n".encode()
    return None


def render_presence_diff(event: dict[str, Any]) -> bytes | None:
    """``* alice, bob joined #general`` and ``* carol left #general``, a few names at most."""
    channel = _shown_channel(event.get("channel"))
    lines = []
    for names_key, more_key, verb in (
        ("joined", "more_joined", "joined"),
        ("left", "more_left", "left"),
    ):
        names = event.get(names_key)
        names = [_shown_name(name) for name in names] if isinstance(names, list) else []
        more = event.get(more_key)
        more = more if isinstance(more, int) and more > 0 else 0
        if len(names) > _NAMES_SHOWN:
            more += len(names) - _NAMES_SHOWN
            names = names[:_NAMES_SHOWN]
        if not names:
            continue
        who = ", ".join(names) + (f" and {more} others" if more else "")
        lines.append(f"* {who} {verb} #{channel}\n")
    return "".join(lines).encode() or None


def render_message(sender: object, text: object) -> bytes:
    """``sender: first line``, then ``  | next line`` for each further line of the text."""
    try:
        shown = check_text(text)
    except ProtocolError:
        shown = scrub(str(text), frozenset("\t\n")) if text else "\ufffd"
    first, *more = shown.split("\n")
    lines = [f"{_shown_name(sender)}: {first}\n", *(f"{CONTINUATION}{line}\n" for line in more)]
    return "".join(lines).encode()


def _shown_name(name: object) -> str:
    try:
        return check_name(name)
    except ProtocolError:
        return _INVALID_NAME


def _shown_channel(channel: object) -> str:
    try:
        return check_channel(channel)
    except ProtocolError:
        return _INVALID_CHANNEL


def render_notice(text: str) -> bytes:
    """A ``* `` line from the server; whatever ``text`` holds, it stays one line."""
    return f"* {scrub(text)}\n".encode()


def render_error(error: ProtocolError | Any) -> bytes:
    """``! code: message``, and ``(retry in 0.4 s)`` when a retry hint is set. ``error`` is a
    ``ProtocolError`` or anything with ``code`` and ``message`` (``AuthError``)."""
    message = scrub(str(error.message))
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, float | int) and math.isfinite(retry_after):
        # Rounded up to a tenth: a hint never reads "0.0 s" and never invites a retry too soon.
        message += f" (retry in {max(0.1, math.ceil(retry_after * 10) / 10):.1f} s)"
    return f"! {scrub(str(error.code))}: {message}\n".encode()
