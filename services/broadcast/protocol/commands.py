"""What a WebSocket client may send, parsed from one text frame (docs/protocol.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import HISTORY_LENGTH, MAX_REF_CHARS
from broadcast.protocol.validate import check_channel, check_message_id, check_name, check_text


@dataclass(frozen=True, slots=True)
class Hello:
    name: str | None
    channel: str | None
    echo: bool
    recovery: Recovery | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a joining client asks to be replayed: all after ``since``, or the last ``last``."""

    since: str | None
    last: int


@dataclass(frozen=True, slots=True)
class Publish:
    text: str
    ref: str | None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Who:
    pass


Command = Hello | Publish | Ping | Who


def parse_frame(text: str) -> Command:
    """A frame starting with ``{`` is a JSON command; any other text is a message to publish."""
    if not text.lstrip().startswith("{"):
        return Publish(check_text(text), None)
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a command is a JSON object")
    ref = _optional_ref(obj)
    kind = obj.get("type")
    try:
        if kind == "publish":
            return Publish(check_text(obj.get("text")), ref)
        if kind == "hello":
            return _hello(obj)
        if kind == "ping":
            return Ping()
        if kind == "who":
            return Who()
    except ProtocolError as exc:
        exc.ref = ref
        raise
    raise ProtocolError(ErrorCode.BAD_COMMAND, f"unknown command type {kind!r}", ref)


def _optional_ref(obj: dict[str, object]) -> str | None:
    ref = obj.get("ref")
    if ref is None:
        return None
    if not isinstance(ref, str) or len(ref) > MAX_REF_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_COMMAND, f"ref must be a string of at most {MAX_REF_CHARS} characters"
        )
    return ref


def _hello(obj: dict[str, object]) -> Hello:
    name = obj.get("name")
    channel = obj.get("channel")
    echo = obj.get("echo", False)
    if not isinstance(echo, bool):
        raise ProtocolError(ErrorCode.BAD_COMMAND, "echo must be true or false")
    return Hello(
        name=None if name is None else check_name(name),
        channel=None if channel is None else check_channel(channel),
        echo=echo,
        recovery=parse_recovery(obj.get("since"), obj.get("history")),
    )


def parse_recovery(since: object, history: object) -> Recovery | None:
    """``since`` (a message id) and ``history`` (a count) from a hello or the handshake query."""
    if since is None and history in (None, 0):
        return None
    if since is not None:
        since = check_message_id(since)
    if history is None:
        history = 0
    if (
        isinstance(history, bool)
        or not isinstance(history, int)
        or not 0 <= history <= HISTORY_LENGTH
    ):
        raise ProtocolError(
            ErrorCode.BAD_COMMAND, f"history is a number of messages from 0 to {HISTORY_LENGTH}"
        )
    return Recovery(since, history)
