"""Leaving cleanly on Ctrl+C, SIGTERM and SIGHUP (the terminal went away)."""

from __future__ import annotations

import signal

import trio

LEAVE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def wait_for_leave_signal(
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Return at the first SIGINT, SIGTERM or SIGHUP; ``started`` once they are caught.

    Without this, SIGINT raises KeyboardInterrupt wherever the code happens to be and SIGTERM
    kills the process outright; either way the WebSocket would not be closed with 1000. A second
    signal after this returns gets Python's default behaviour: a way out if leaving hangs.
    """
    with trio.open_signal_receiver(*LEAVE_SIGNALS) as signals:
        task_status.started()
        async for _ in signals:
            return
