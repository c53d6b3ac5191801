"""Checks on names, channels, text and ids, applied on the way in so nothing unsafe is fanned out.

Two promises rest on them (docs/protocol.md, "Channels, names, limits"):

- Nothing a user sends can pass for the server, or for another user, on a line client. Server
  lines start with ``* `` or ``! ``; a message reads ``name: text`` with its further lines
  indented (``lines.render_event``). A name starts with a letter, a digit or ``_`` and holds no
  colon, so a message line never starts like a server line and its first ``:`` always ends the
  sender's name.
- Nothing invisible or line-breaking reaches a terminal or a page: control characters (but TAB,
  and newlines inside text), format characters (bidi overrides, zero-width spaces, tags), line
  and paragraph separators, private-use, surrogate and unassigned code points are refused.
  Unassigned ones too, because a later Unicode version may make them format characters that
  this server could not recognise; text alone may hold unassigned code points in the blocks
  where new emoji are assigned, which only ever hold symbols.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.ids import format_id, parse_message_id
from broadcast.protocol.limits import MAX_CHANNEL_CHARS, MAX_NAME_BYTES, MAX_TEXT_BYTES

_CHANNEL_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_CHANNEL_CHARS}}}")

# Unicode general categories nothing from a client may contain (Cc: C0, DEL and C1 controls;
# Cf: format; Zl/Zp: U+2028/U+2029; Co: private use; Cs: lone surrogates; Cn: unassigned).
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})

# What text may still contain of those: TAB, the newline of a multi-line message, and the
# zero-width (non-)joiners that emoji sequences and Persian and Indic scripts need. None of them
# can start a line or change which way text runs. Names get no exceptions at all.
_TEXT_ALLOWED: Final = frozenset("\t\n\u200c\u200d")

# Each Unicode version adds emoji here (U+1F000-U+1FBFF), and only symbols ever go here: text
# may hold code points of these blocks that the server's Unicode does not know yet, so the newest
# emoji of a phone are not refused. Names get no such leeway.
_EMOJI_BLOCKS: Final = range(0x1F000, 0x1FC00)

# Colons and their lookalikes: a line client reads ``name: text``, so a name never holds one.
_COLONS: Final = frozenset(":\uff1a\ufe55\ufe13\u2236\ua789\u02d0\u02f8\ua4fd\u0589\u05c3\u2e2c")

# Letters that look like the ``!`` starting an error line; refused as a name's first character.
_BANG_LOOKALIKES: Final = frozenset("\u01c3\ua71d\ua71e\ua71f")

_CATEGORY_WORDS: Final = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Co": "a private-use character",
    "Cs": "a lone surrogate (not valid Unicode)",
    "Cn": "a character unassigned in Unicode " + unicodedata.unidata_version,
}


def refused_character(
    text: str, allowed: frozenset[str] = frozenset(), *, future_emoji: bool = False
) -> str | None:
    """The first character of ``text`` in a refused category and not ``allowed`` (nor, with
    ``future_emoji``, unassigned in the emoji blocks); None if there is none. Looks each
    distinct character up once: chat text repeats a few dozen."""
    bad = {ch for ch in set(text) if _refused(ch, allowed, future_emoji)}
    if not bad:
        return None
    return min(bad, key=text.index)


def scrub(text: str, allowed: frozenset[str] = frozenset()) -> str:
    """``text`` with every refused character replaced by U+FFFD: for output built from input
    that was not checked here (another gateway's version, an error message)."""
    if refused_character(text, allowed) is None:
        return text
    return "".join("\ufffd" if _refused(ch, allowed, False) else ch for ch in text)


def _refused(ch: str, allowed: frozenset[str], future_emoji: bool) -> bool:
    if ch in allowed:
        return False
    category = unicodedata.category(ch)
    if category == "Cn" and future_emoji:
        return ord(ch) not in _EMOJI_BLOCKS
    return category in _REFUSED_CATEGORIES


def describe(ch: str) -> str:
    """``U+202E, an invisible formatting character``: names a character without printing it."""
    words = _CATEGORY_WORDS.get(unicodedata.category(ch), "a character not allowed here")
    return f"U+{ord(ch):04X}, {words}"


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_channel(channel: object) -> str:
    if not isinstance(channel, str) or not _CHANNEL_RE.fullmatch(channel):
        raise ProtocolError(
            ErrorCode.BAD_CHANNEL,
            f"a channel is 1-{MAX_CHANNEL_CHARS} characters of A-Z a-z 0-9 . _ -",
        )
    return channel


def check_name(name: object) -> str:
    """A display name: 1-32 bytes, starting with a letter, digit or ``_``, words separated by
    single spaces, no colon and nothing invisible (module docstring)."""
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.BAD_NAME, "a name is a string")
    problem = _name_problem(name)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_NAME, problem)
    return name


def _name_problem(name: str) -> str | None:
    size = utf8_size(name)
    if not 1 <= size <= MAX_NAME_BYTES:
        return f"a name is 1-{MAX_NAME_BYTES} bytes of UTF-8; this one is {size}"
    first = name[0]
    if (
        not (first == "_" or unicodedata.category(first)[0] in "LN")
        or first in _BANG_LOOKALIKES
        or first in _COLONS
    ):
        return "a name starts with a letter, a digit or _"
    bad = refused_character(name)
    if bad is not None:
        return f"a name may not contain {describe(bad)}"
    if any(ch in _COLONS for ch in name):
        return "a name may not contain a colon (line clients show messages as name: text)"
    if name.endswith(" ") or "  " in name:
        return "a name has no trailing space and single spaces between words"
    if any(ch != " " and (ch.isspace() or unicodedata.category(ch) == "Zs") for ch in name):
        return "the only space a name may contain is a plain space (U+0020)"
    return None


def check_text(text: object) -> str:
    """Message text: 1-4096 bytes of UTF-8; TAB and newlines (multi-line messages) are the only
    control characters it may contain, and nothing invisible (module docstring)."""
    if not isinstance(text, str) or not text:
        raise ProtocolError(ErrorCode.BAD_TEXT, "text must be a non-empty string")
    size = utf8_size(text)
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(
            ErrorCode.TEXT_TOO_LONG, f"text is {size} bytes; the limit is {MAX_TEXT_BYTES}"
        )
    bad = refused_character(text, _TEXT_ALLOWED, future_emoji=True)
    if bad is not None:
        hint = " (TAB and newline are the only ones allowed)" if bad < " " or bad == "\x7f" else ""
        raise ProtocolError(ErrorCode.BAD_TEXT, f"text may not contain {describe(bad)}{hint}")
    return text


def check_message_id(message_id: object) -> str:
    """A message id as a client echoes it (``since``), in canonical form. The rule is the
    buses' own (``ids.parse_message_id``: both numbers below 2**64, as in Redis), so nothing
    downstream meets an id it cannot handle."""
    if isinstance(message_id, str):
        try:
            return format_id(parse_message_id(message_id))
        except ValueError:  # UnicodeEncodeError (a lone surrogate) is one too
            pass
    raise ProtocolError(
        ErrorCode.BAD_COMMAND,
        "a message id is two numbers below 2^64, like 1732435200123-0 (from a message you got)",
    )
