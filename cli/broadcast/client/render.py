"""Server events as the lines a person reads: ``[14:03] alice: hello``.

Pure functions, no I/O. Every string that came from the network is sanitized here, so callers
can print the result as it is. Notices start with ``* `` and errors with ``! ``, as on the line
protocol (docs/protocol.md).

A message may hold several lines (a pasted stack trace). Its first line follows the sender's
name; the others are indented, so no line of a message can pass for a message of its own (every
message starts at the left edge, with its time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from broadcast.client.recovery import Replay
from broadcast.client.sanitize import is_unsafe, sanitize

LocalTime = Callable[[float], time.struct_time]


def clock(ts: object, local_time: LocalTime = time.localtime) -> str:
    """``HH:MM`` of a Unix time from the server; the current time when it is missing or bad."""
    try:
        moment = local_time(float(ts))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        moment = local_time(time.time())
    return time.strftime("%H:%M", moment)


def _field(event: Mapping[str, Any], key: str) -> str:
    """A field as text, whatever type a (possibly hostile) server sent; not yet sanitized."""
    value = event.get(key)
    return value if isinstance(value, str) else str(value)


# Continuation lines start under the message's first character, but never further right than
# this: a long name must not push a pasted block off a narrow terminal.
MAX_INDENT = 24


def message_line(sender: str, text: str, ts: object, local_time: LocalTime = time.localtime) -> str:
    """One chat message; also used for our own line, which the server does not echo.

    Several lines for a text with line breaks, the later ones indented.
    """
    head = f"[{clock(ts, local_time)}] {sanitize(sender)}: "
    first, *more = text.split("\n")
    if not more:
        return head + sanitize(first)
    indent = " " * min(len(head), MAX_INDENT)
    return "\n".join([head + sanitize(first), *(indent + sanitize(line) for line in more)])


GAP_LINE = "! some messages may have been lost (server link interrupted)"
LOST_WHILE_AWAY_LINE = "! some messages were lost while disconnected"
HISTORY_RESTARTED_LINE = "* the server's history of this channel restarted; nothing was missed"


def render_event(event: Mapping[str, Any], local_time: LocalTime = time.localtime) -> str | None:
    """The line for a ``message``, ``join``, ``leave`` or ``gap`` event; None for the others.

    ``recovered`` needs to know what was asked for: see ``recovered_line``.
    """
    kind = event.get("type")
    if kind == "gap":
        return GAP_LINE
    if kind == "message":
        return message_line(
            _field(event, "sender"), _field(event, "text"), event.get("ts"), local_time
        )
    if kind in ("join", "leave"):
        verb = "joined" if kind == "join" else "left"
        stamp = clock(event.get("ts"), local_time)
        name, channel = sanitize(_field(event, "name")), sanitize(_field(event, "channel"))
        return f"[{stamp}] * {name} {verb} #{channel}"
    if kind == "presence_diff":
        return _presence_diff_lines(event, local_time)
    return None


def _presence_diff_lines(event: Mapping[str, Any], local_time: LocalTime) -> str | None:
    """``[14:03] * bob, carol joined #general`` and a ``left`` line: who came and went."""
    stamp = clock(event.get("ts"), local_time)
    channel = sanitize(_field(event, "channel"))
    lines = []
    for key, more_key, verb in (("joined", "more_joined", "joined"), ("left", "more_left", "left")):
        names = event.get(key)
        names = [sanitize(_field({"n": n}, "n")) for n in names] if isinstance(names, list) else []
        more = event.get(more_key)
        if isinstance(more, int) and not isinstance(more, bool) and more > 0:
            names.append(f"{more} more")
        if names:
            lines.append(f"[{stamp}] * {', '.join(names)} {verb} #{channel}")
    return "\n".join(lines) or None


def recovered_line(event: Mapping[str, Any], replay: Replay | None) -> str | None:
    """What the ``recovered`` event ending ``replay`` tells a person; None when nothing to say.

    A recovery after a reconnect (``since``) reads differently from the history a first
    connection asked for. The number is of the replayed messages new to us (``replay.shown``):
    the event's ``count``, unless the server replayed some we had already shown. Nothing missed
    is not news; a loss always is. None too for a ``recovered`` we never asked for.

    ``reset: true`` says the history we resumed from is gone (the server restarted with an empty
    one): with ``complete: true`` nothing was published meanwhile that we did not get, which is a
    calm notice and no loss.
    """
    if replay is None:
        return None
    if event.get("reset") is True and event.get("complete") is True and replay.resumed:
        if replay.shown == 0:
            return HISTORY_RESTARTED_LINE
        plural = "" if replay.shown == 1 else "s"
        return f"{HISTORY_RESTARTED_LINE}; recovered {replay.shown} message{plural}"
    if event.get("complete") is False:
        if replay.resumed:
            return LOST_WHILE_AWAY_LINE
        return "! some earlier messages could not be fetched"
    if replay.shown == 0:
        return None
    plural = "" if replay.shown == 1 else "s"
    if replay.resumed:
        return notice_line(f"recovered {replay.shown} missed message{plural}")
    return notice_line(f"{replay.shown} earlier message{plural} from the history above")


def presence_members(event: Mapping[str, Any]) -> list[str]:
    """The names in a ``presence`` event, sanitized; a malformed list reads as nobody."""
    members = event.get("members")
    if not isinstance(members, list):
        return []
    return [sanitize(_field({"m": member}, "m")) for member in members]


def presence_line(event: Mapping[str, Any]) -> str:
    """``* here in #general: alice, bob``: the answer to ``/who``, as on the line protocol."""
    channel = sanitize(_field(event, "channel"))
    members = presence_members(event)
    return f"* here in #{channel}: {', '.join(members) if members else 'nobody'}"


def error_text(event: Mapping[str, Any]) -> str:
    """An ``error`` event as ``code: message``: the stable code, then the words for people."""
    return f"{sanitize(_field(event, 'code'))}: {sanitize(_field(event, 'message'))}"


def error_line(event: Mapping[str, Any]) -> str:
    return f"! {error_text(event)}"


def notice_line(text: str) -> str:
    """A status line of the client itself (connected, connection lost, …)."""
    return f"* {sanitize(text)}"


def connected_line(url: str, name: str, channel: str) -> str:
    return notice_line(f"connected to {url} as {name} in #{channel}")


def disconnected_line(
    url: str, reason: str, retry_in: float, *, was_connected: bool, shut_down: bool = False
) -> str:
    """``connection lost: …; reconnecting in 1.4 s``, or ``cannot reach …`` for a failed attempt.

    ``shut_down``: the gateway closed with 1001 or 1012 (stopped, or draining). Whether it comes
    back, or another takes over, is not ours to know: we reconnect at once.
    """
    if shut_down:
        when = f" in {retry_in:.1f} s" if retry_in >= 0.5 else ""
        return notice_line(f"the server shut down; reconnecting{when}")
    if was_connected:
        return notice_line(f"connection lost: {reason}; reconnecting in {retry_in:.1f} s")
    return notice_line(f"cannot reach {url}: {reason}; retrying in {retry_in:.1f} s")


def outage_line(url: str, reason: str, retry_in: float, attempts: int) -> str:
    """The one status line of an outage, rewritten at each attempt: ``reconnecting to …``."""
    tries = "" if attempts <= 1 else f" (attempt {attempts})"
    when = f"in {retry_in:.0f} s" if retry_in >= 0.5 else "now"
    return notice_line(f"reconnecting to {url} {when}{tries}: {reason}")


def json_line(raw: str, event: Mapping[str, Any]) -> str:
    """The frame exactly as received, for scripts, unless that would not be one safe line.

    The gateway sends compact JSON, so this is the raw text. Raw JSON may still hold line
    breaks between tokens, or DEL, C1 and bidi characters inside strings (JSON only forbids
    raw C0 there); such a frame is re-encoded with every non-ASCII character escaped.
    """
    if raw.isprintable() or not any(is_unsafe(ch) for ch in raw):
        return raw
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"))
