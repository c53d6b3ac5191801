"""The line protocol for ``nc``: splitting input into lines and rendering events as lines."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import MAX_LINE_BYTES


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
    raise ProtocolError(
        ErrorCode.BAD_COMMAND,
        f"unknown command /{command}; try /name NAME, /join CHANNEL, /who, /quit or //text",
    )


def render_event(event: dict[str, Any]) -> bytes | None:
    """How a bus event reads on a line client; None for events line clients do not see."""
    kind = event.get("type")
    if kind == "message":
        return f"{event['sender']}: {event['text']}\n".encode()
    if kind == "join":
        return f"* {event['name']} joined #{event['channel']}\n".encode()
    if kind == "leave":
        return f"* {event['name']} left #{event['channel']}\n".encode()
    if kind == "gap":
        return f"* some messages in #{event['channel']} may have been lost\n".encode()
    return None


def render_notice(text: str) -> bytes:
    return f"* {text}\n".encode()


def render_error(error: ProtocolError) -> bytes:
    return f"! {error.code}: {error.message}\n".encode()
