"""``broadcast-cli listen``: print what arrives, for people or (``--json``) for scripts.

Events go to stdout, one line each, flushed at once; status (connected, connection lost) goes to
stderr, so ``listen --json | jq`` sees only events. Runs until SIGINT or SIGTERM, reconnecting
with backoff like ``connect``.
"""

from __future__ import annotations

import os
import sys

import trio

from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Frame,
    Refused,
    Target,
)
from broadcast.client.link import Link
from broadcast.client.render import (
    connected_line,
    disconnected_line,
    error_line,
    json_line,
    render_event,
)
from broadcast.client.signals import wait_for_leave_signal

SHOWN = frozenset({"message", "join", "leave"})


class Listener:
    """A Sink that prints events; status lines go to stderr."""

    def __init__(self, target: Target, *, as_json: bool) -> None:
        self._target = target
        self._as_json = as_json

    def connected(self, chat: ChatConnection) -> None:
        _status(connected_line(self._target.url, chat.name, chat.channel))

    def received(self, frame: Frame) -> None:
        if frame.kind not in SHOWN:
            return
        line = json_line(frame.raw, frame.event) if self._as_json else render_event(frame.event)
        if line is not None:
            print(line, flush=True)

    def disconnected(self, error: ChatError, retry_in: float) -> None:
        was_connected = isinstance(error, ConnectionLost)
        _status(
            disconnected_line(self._target.url, error.reason, retry_in, was_connected=was_connected)
        )


def _status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_listen(target: Target, *, as_json: bool) -> int:
    """Print events until a signal; 1 when the server refuses our hello."""
    exit_code = 0
    link = Link(target, Listener(target, as_json=as_json))
    async with trio.open_nursery() as nursery:

        async def leave_on_signal(*, task_status: trio.TaskStatus[None]) -> None:
            await wait_for_leave_signal(task_status=task_status)
            await link.leave()
            nursery.cancel_scope.cancel()

        await nursery.start(leave_on_signal)
        try:
            await link.run()
        except Refused as exc:
            _status(error_line(exc.event))
            exit_code = 1
        except BrokenPipeError:  # whoever read our stdout has gone (``listen --json | head``)
            _discard_stdout()
        nursery.cancel_scope.cancel()
    return exit_code


def _discard_stdout() -> None:
    """Point stdout at /dev/null so flushing it at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
