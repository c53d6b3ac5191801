"""Checks on names, channels and text, applied on the way in so nothing unsafe is fanned out."""

import re
import unicodedata

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.limits import MAX_CHANNEL_CHARS, MAX_NAME_CHARS, MAX_TEXT_BYTES

_MESSAGE_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_CHANNEL_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_CHANNEL_CHARS}}}")


def _has_control(text: str, allowed: str = "") -> bool:
    """Cc (C0, DEL, C1) and the bidi/format controls that can disguise text (Cf)."""
    return any(unicodedata.category(ch) in ("Cc", "Cf") and ch not in allowed for ch in text)


def check_channel(channel: object) -> str:
    if not isinstance(channel, str) or not _CHANNEL_RE.fullmatch(channel):
        raise ProtocolError(
            ErrorCode.BAD_CHANNEL,
            f"a channel is 1-{MAX_CHANNEL_CHARS} characters of A-Z a-z 0-9 . _ -",
        )
    return channel


def check_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_NAME_CHARS
        or name != name.strip()
        or _has_control(name)
    ):
        raise ProtocolError(
            ErrorCode.BAD_NAME,
            f"a name is 1-{MAX_NAME_CHARS} characters, no control characters or outer spaces",
        )
    return name


def check_text(text: object) -> str:
    if not isinstance(text, str) or not text:
        raise ProtocolError(ErrorCode.BAD_TEXT, "text must be a non-empty string")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(
            ErrorCode.TEXT_TOO_LONG, f"text is {size} bytes; the limit is {MAX_TEXT_BYTES}"
        )
    if _has_control(text, allowed="\t"):
        raise ProtocolError(ErrorCode.BAD_TEXT, "text may not contain control characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(ErrorCode.BAD_TEXT, "text is not valid Unicode") from None
    return text


def check_message_id(message_id: object) -> str:
    if not isinstance(message_id, str) or not _MESSAGE_ID_RE.fullmatch(message_id):
        raise ProtocolError(
            ErrorCode.BAD_COMMAND,
            "a message id looks like 1732435200123-0 (from a message you got)",
        )
    return message_id
