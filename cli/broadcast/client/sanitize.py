"""Making text from the network safe to write to a terminal.

Other users choose the names and texts we print. A raw ESC can retitle the window, move the
cursor, rewrite the screen or (with some terminals) inject input; bidi overrides can make text
read differently from what it is. The gateway refuses such characters on the way in, but the
client cannot rely on every server doing so, so everything from the network goes through here.
"""

from __future__ import annotations

import unicodedata

# Categories that are never printed as they are:
# Cc: C0 controls, DEL and C1 controls (ESC, CSI, BEL, BS, CR, LF, …)
# Cf: format characters, among them the bidi overrides and isolates, zero-width joiners
# Cs: lone surrogates (JSON can carry "\ud800"; the terminal encoder would fail on them)
# Zl, Zp: U+2028 and U+2029, line and paragraph separators some terminals break lines at
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# A tab is harmless and the protocol allows it in message text.
_ALLOWED = frozenset("\t")

_NAMED = {"\n": "\\n", "\r": "\\r"}

REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


def is_unsafe(ch: str) -> bool:
    """True for one character that must not reach the terminal as it is."""
    return ch not in _ALLOWED and unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    category = unicodedata.category(ch)
    if category == "Cs":
        return REPLACEMENT
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def sanitize(text: str) -> str:
    """``text`` with every unsafe character replaced by a visible escape such as ``\\x1b``.

    The result contains only printable characters and tabs, so writing it cannot change the
    terminal's state. Ordinary text, accents, CJK and emoji pass unchanged.
    """
    if text.isprintable():  # fast path: no Cc, Cf, Cs, Zl, Zp (nor any Z* but a space)
        return text
    return "".join(_escape(ch) if is_unsafe(ch) else ch for ch in text)
