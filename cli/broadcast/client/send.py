"""``broadcast-cli send TEXT``: publish one message, wait for its ack, exit.

Exit codes: 0 accepted (the message id is printed on stdout), 1 refused by the server (its
error code and message on stderr; a refused token too), 2 no server answered, the connection
failed or timed out, or the server's certificate did not verify.
"""

from __future__ import annotations

import trio

from broadcast.client.connection import (
    Target,
    open_chat,
)
from broadcast.client.failures import FAILED, ONE_SHOT_FAILURES, REFUSED, one_shot_failure, report
from broadcast.client.render import error_text
from broadcast.client.sanitize import sanitize

ACCEPTED = 0
_REF = "send-1"


async def run_send(target: Target, text: str, seconds: float) -> int:
    """Publish ``text`` within ``seconds``; return an exit code, saying on stderr what failed."""
    with trio.move_on_after(seconds):
        try:
            async with open_chat(target, seconds) as chat:
                await chat.publish(text, _REF)
                while True:
                    frame = await chat.receive()
                    ref = frame.event.get("ref")
                    if frame.kind == "ack" and ref == _REF:
                        print(sanitize(str(frame.event.get("id"))), flush=True)
                        return ACCEPTED
                    if frame.kind == "error" and ref in (_REF, None):
                        report(f"refused by the server: {error_text(frame.event)}")
                        return REFUSED
        except ONE_SHOT_FAILURES as exc:
            note = "; the message may or may not have been sent"
            return one_shot_failure(exc, target.url, note)
    report(f"no answer from {target.url} within {seconds:g} s")
    return FAILED
