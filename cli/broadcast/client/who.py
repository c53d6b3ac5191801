"""``broadcast-cli who``: who is in a channel right now, one name a line, for scripts.

It joins invisibly (``announce=0``: no join or leave notices, not in presence itself), so
asking does not change the answer nor disturb the channel. The gateway sends a ``presence``
snapshot after every welcome; that snapshot is the answer, and nothing else is sent.

Exit codes as for ``send``: 0 answered, 1 refused by the server (our name, the channel, the
token, or presence being unavailable), 2 no server answered, the connection failed or timed
out, or the server's certificate did not verify.
"""

from __future__ import annotations

import trio

from broadcast.client.connection import (
    Frame,
    Target,
    open_chat,
)
from broadcast.client.failures import FAILED, ONE_SHOT_FAILURES, REFUSED, one_shot_failure, report
from broadcast.client.render import error_text, json_line, presence_members

ANSWERED = 0


async def run_who(target: Target, *, as_json: bool, seconds: float) -> int:
    """Print who is in ``target.channel`` within ``seconds``; return an exit code."""
    with trio.move_on_after(seconds):
        try:
            async with open_chat(target, seconds) as chat:
                while True:
                    frame = await chat.receive()
                    if frame.kind == "presence":
                        _print(frame, as_json=as_json)
                        return ANSWERED
                    if frame.kind == "error":  # e.g. bus_unavailable: presence cannot be read
                        report(f"refused by the server: {error_text(frame.event)}")
                        return REFUSED
        except ONE_SHOT_FAILURES as exc:
            return one_shot_failure(exc, target.url)
    report(f"no answer from {target.url} within {seconds:g} s")
    return FAILED


def _print(frame: Frame, *, as_json: bool) -> None:
    """The names, sanitized, one a line; or the event itself, as one line of JSON."""
    if as_json:
        print(json_line(frame.raw, frame.event), flush=True)
        return
    for name in presence_members(frame.event):
        print(name, flush=True)
