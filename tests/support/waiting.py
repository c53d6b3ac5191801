"""Waiting for a condition of a real process or server, bounded; never a bare sleep."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tests.support.clients import WAIT_SECONDS

_POLL_SECONDS = 0.01


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until true; fails the test after WAIT_SECONDS.

    For state that offers no event to wait on (a counter in another object, a process).
    """
    with trio.fail_after(WAIT_SECONDS):
        while not condition():  # noqa: ASYNC110 - the state owner has no event to offer
            await trio.sleep(_POLL_SECONDS)
