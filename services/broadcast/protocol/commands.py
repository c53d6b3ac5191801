"""What a WebSocket client may send, parsed from one text frame (docs/protocol.md).

Whatever the frame holds, ``parse_frame`` returns a command or raises ``ProtocolError`` with a
documented code: a session turns that into an ``error`` event and the connection goes on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import HISTORY_LENGTH, MAX_JSON_DEPTH, MAX_REF_BYTES
from broadcast.protocol.validate import (
    check_channel,
    check_message_id,
    check_name,
    check_text,
    utf8_size,
)

_COMMAND_TYPES = "hello, publish, ping, who"

# A JSON string, or an unterminated one and everything after it (json.loads stops there). The
# quantifiers are possessive: no backtracking, so one pass whatever the escapes and quotes.
_STRINGS = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|"[\s\S]*', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}

# An epoch is an opaque token the gateway handed out (welcome, recovered): the buses make short
# hex ones (protocol/ids.py), so anything that could not be one (quotes, controls) is refused.
_EPOCH_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HISTORY_RE = re.compile(r"[0-9]{1,4}")
# A publish's idempotency key: long enough for a UUID or a hash, printable so logs stay clean.
MAX_IDEMPOTENCY_KEY_BYTES = 64
_IDEMPOTENCY_KEY_RE = re.compile(rf"[\x20-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_BYTES}}}")


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
    epoch: str | None = None
    """The history ``since`` belongs to (from the ``welcome``/``recovered`` the client had)."""


@dataclass(frozen=True, slots=True)
class Publish:
    text: str
    ref: str | None
    idempotency_key: str | None = None
    """Repeated within the window, the publish publishes nothing and gets the first ack's id."""


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Who:
    pass


Command = Hello | Publish | Ping | Who


def parse_frame(text: str) -> Command:
    r"""A frame starting with ``{`` is a JSON command; any other text is a message to publish.

    One trailing ``\n`` or ``\r\n`` is framing, not content: line-oriented tools (websocat)
    send each line with its end, so ``hello\n`` publishes ``hello``. Inner newlines are a
    multi-line message.
    """
    text = strip_line_end(text)
    if not text.lstrip().startswith("{"):
        return Publish(check_text(text), None)
    if nested_deeper_than(text, MAX_JSON_DEPTH):
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: only if the scan missed one
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {_reason(exc)}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a command is a JSON object")
    ref = _optional_ref(obj)
    kind = obj.get("type")
    try:
        if kind == "publish":
            return Publish(check_text(_optional_string(obj, "text")), ref, _idempotency_key(obj))
        if kind == "hello":
            return _hello(obj)
        if kind == "ping":
            return Ping()
        if kind == "who":
            return Who()
    except ProtocolError as exc:
        exc.ref = ref
        raise
    # Never echo the type: it is the client's text, of any length and content.
    shown = f" {kind!r}" if isinstance(kind, str) and re.fullmatch(r"[a-z_]{1,16}", kind) else ""
    raise ProtocolError(
        ErrorCode.BAD_COMMAND,
        f"unknown command type{shown}; the type is one of {_COMMAND_TYPES}",
        ref,
    )


def strip_line_end(text: str) -> str:
    r"""``text`` without one trailing ``\r\n`` or ``\n``."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether the brackets of JSON ``text`` nest deeper than ``limit`` (brackets inside strings
    do not count). ``json.loads`` recurses once per level, so this runs first: in linear time
    and at C speed, so a 64 KiB frame of brackets costs no more to refuse than to parse.

    Invalid JSON may be answered either way: ``json.loads`` refuses it after this."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRINGS.sub("", text))
    # The running depth. Below 0 means an unmatched closer, where json.loads stops anyway.
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets), initial=0)) > limit


def _reason(exc: Exception) -> str:
    """json's own words (a position, never the input); a generic one for anything else."""
    if isinstance(exc, json.JSONDecodeError):
        return str(exc)
    return "it could not be parsed"


def _optional_string(obj: dict[str, object], field: str) -> str | None:
    """A field that is absent, null or a string; anything else is ``bad_command``."""
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_COMMAND, f"{field} must be a string")
    return value


def _optional_ref(obj: dict[str, object]) -> str | None:
    ref = obj.get("ref")
    if ref is None:
        return None
    # The ref is sent back in the ack or error, so it must encode: no lone surrogates.
    if not isinstance(ref, str) or not _encodes(ref) or utf8_size(ref) > MAX_REF_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_COMMAND,
            f"ref must be a string of valid Unicode, at most {MAX_REF_BYTES} bytes",
        )
    return ref


def _idempotency_key(obj: dict[str, object]) -> str | None:
    key = obj.get("idempotency_key")
    if key is None:
        return None
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ProtocolError(
            ErrorCode.BAD_COMMAND,
            f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY_BYTES} printable ASCII characters",
        )
    return key


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _hello(obj: dict[str, object]) -> Hello:
    name = _optional_string(obj, "name")
    channel = _optional_string(obj, "channel")
    echo = obj.get("echo", False)
    if not isinstance(echo, bool):
        raise ProtocolError(ErrorCode.BAD_COMMAND, "echo must be true or false")
    history = obj.get("history")
    if isinstance(history, str):  # only the handshake query gives counts as text
        raise ProtocolError(ErrorCode.BAD_COMMAND, "history must be a number")
    return Hello(
        name=None if name is None else check_name(name),
        channel=None if channel is None else check_channel(channel),
        echo=echo,
        recovery=parse_recovery(
            _optional_string(obj, "since"), history, _optional_string(obj, "epoch")
        ),
    )


def parse_recovery(since: object, history: object, epoch: object = None) -> Recovery | None:
    """``since`` (a message id), ``history`` (a count) and ``epoch`` from a hello or the
    handshake query. From the query every value is a string (``history=20``); a count given
    as text must be plain ASCII digits."""
    if isinstance(history, str):
        history = int(history) if _HISTORY_RE.fullmatch(history) else -1
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
    if epoch == "":  # ``epoch=`` in a query: none known, as when left out
        epoch = None
    if epoch is not None and (not isinstance(epoch, str) or not _EPOCH_RE.fullmatch(epoch)):
        raise ProtocolError(
            ErrorCode.BAD_COMMAND, "epoch is the string a welcome or recovered event gave"
        )
    return Recovery(since, history, epoch if since is not None else None)
