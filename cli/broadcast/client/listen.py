"""``broadcast-cli listen``: print what arrives, for people or (``--json``) for scripts.

Events go to stdout, one line each, flushed at once; status (connected, connection lost) goes to
stderr, so ``listen --json | jq`` sees only events. Runs until SIGINT or SIGTERM, reconnecting
with backoff like ``connect`` and recovering what was missed meanwhile, each message once.
What the recovery found (``recovered``) and a server-side ``gap`` are part of the stream, at the
place they happened: stdout, so a script can act on them and a person sees where a loss lies.

A refused token or an untrusted certificate ends it (see failures.py), as does the token
expiring while connected (close 4001): reconnecting with the same token would be refused. So
does a first connection that cannot be made (a wrong port): only an outage is waited out, and
it shows as one status line on stderr, rewritten in place on a terminal.
"""

from __future__ import annotations

import os
import sys

import trio

from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Denied,
    Frame,
    Refused,
    Target,
    Unreachable,
)
from broadcast.client.failures import FAILED, REFUSED, Fatal, fatal, report
from broadcast.client.link import Link, server_shut_down
from broadcast.client.recovery import Replay
from broadcast.client.render import (
    connected_line,
    disconnected_line,
    error_line,
    json_line,
    recovered_line,
    render_event,
)
from broadcast.client.sanitize import sanitize
from broadcast.client.signals import wait_for_leave_signal
from broadcast.client.terminal import Outage, StatusLine
from broadcast.client.transport import ServerNotTrusted

SHOWN = frozenset({"message", "join", "leave", "presence_diff", "recovered", "gap"})


class Listener:
    """A Sink that prints events; status lines go to stderr."""

    def __init__(self, target: Target, *, as_json: bool) -> None:
        self._target = target
        self._as_json = as_json
        self._replay: Replay | None = None  # what the current connection asked for
        self._outages = 0  # failed attempts since the connection was last up
        self._status = StatusLine(sys.stderr)

    async def connected(self, chat: ChatConnection) -> None:
        self._replay = chat.replay
        self._outages = 0
        self._status.clear()
        _status(connected_line(self._target.url, chat.name, chat.channel))

    async def received(self, frame: Frame) -> None:
        if frame.kind == "error":  # e.g. a replay the server could not give: say so
            _status(error_line(frame.event))
            return
        if frame.kind not in SHOWN:
            return
        if self._as_json:
            line: str | None = json_line(frame.raw, frame.event)
        elif frame.kind == "recovered":
            line = recovered_line(frame.event, self._replay)
        else:
            line = render_event(frame.event)
        if line is not None:
            print(line, flush=True)

    async def disconnected(self, error: ChatError, retry_in: float) -> None:
        self._outages += 1
        if self._outages > 1:
            self._status.update(Outage(self._target.url, error.reason, retry_in, self._outages))
            return
        _status(
            disconnected_line(
                self._target.url,
                error.reason,
                retry_in,
                was_connected=isinstance(error, ConnectionLost),
                shut_down=server_shut_down(error),
            )
        )


def _status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_listen(target: Target, *, as_json: bool) -> int:
    """Print events until a signal; 1 when the server refuses our name, channel or token,
    2 when its certificate does not verify."""
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
            exit_code = REFUSED
        except Denied as exc:
            if exc.live:  # a status line like the others: the session was going on
                _status(f"! {sanitize(exc.text)}")
                exit_code = REFUSED
            else:
                exit_code = _report(fatal(exc))
        except ServerNotTrusted as exc:
            exit_code = _report(fatal(exc))
        except Unreachable as exc:
            exit_code = _report(Fatal(f"cannot reach {target.url}: {exc.reason}", FAILED))
        except BrokenPipeError:  # whoever read our stdout has gone (``listen --json | head``)
            _discard_stdout()
        nursery.cancel_scope.cancel()
    return exit_code


def _report(ending: Fatal) -> int:
    report(ending.message)
    return ending.exit_code


def _discard_stdout() -> None:
    """Point stdout at /dev/null so flushing it at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
