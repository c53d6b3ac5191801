"""Where typed lines come from and where chat lines go: a prompt, or plain pipes.

``PromptTerminal`` runs a prompt_toolkit prompt in a worker thread (prompt_toolkit drives its own
asyncio loop there) while trio owns the network in the main thread. Lines printed meanwhile go
through prompt_toolkit's ``patch_stdout`` proxy, which is thread-safe and draws them above the
prompt, so whatever is half typed is redrawn intact below. ``PipeTerminal`` serves when stdin or
stdout is not a terminal: lines from stdin, plain lines to stdout.

A paste of several lines into the prompt is one message: terminals mark a paste (bracketed paste
mode), prompt_toolkit inserts it whole, line breaks included, and Enter sends it. From a pipe,
each line is a message.

While the connection is down, the chat shows one status line that changes in place (attempt,
countdown, reason): the prompt's bottom toolbar, or on a plain terminal a line rewritten with
``\r``; on a pipe, a new line only when the reason changes, not at every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import Protocol, Self, TextIO

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from broadcast.client.render import outage_line
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.lines import LineSplitter

# How long leaving waits for the prompt thread to hand the terminal back (cooked mode, cursor).
_PROMPT_EXIT_TIMEOUT = 2.0
_READ_CHUNK = 65536
# How often the prompt redraws itself during an outage: its toolbar's countdown ticks by this.
_REFRESH_SECONDS = 0.5


class Terminal(Protocol):
    """The two things the chat needs from the person's side."""

    # A pipe holds lines ready before we are connected; a person waits for the status line.
    waits_for_connection: bool

    def show(self, line: str) -> None:
        """Print one line (already safe to print); callable from the trio thread."""
        ...

    async def read_line(self) -> str | None:
        """The next line typed, without its newline; None at end of input."""
        ...

    def set_channel(self, channel: str) -> None:
        """The chat is now in ``channel`` (after ``/join``): a prompt that names it follows."""
        ...

    def outage(self, url: str, reason: str, retry_in: float, attempts: int) -> None:
        """The connection is still down: show (or update) the one status line about it."""
        ...

    def outage_over(self) -> None:
        """Connected again: the status line goes away."""
        ...


class Outage:
    """What the status line of an outage says; ``line()`` counts down to the next attempt."""

    def __init__(self, url: str, reason: str, retry_in: float, attempts: int) -> None:
        self.url, self.reason, self.attempts = url, reason, attempts
        self._retry_at = time.monotonic() + retry_in

    def line(self) -> str:
        retry_in = max(0.0, self._retry_at - time.monotonic())
        return outage_line(self.url, self.reason, retry_in, self.attempts)


class StatusLine:
    """A status that keeps changing, on a stream: rewritten in place on a terminal; elsewhere
    (a log file) written again only when its reason changes, not at every retry."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._in_place = stream.isatty()
        except ValueError:  # closed
            self._in_place = False
        self._shown = False  # a line without its newline is on the terminal
        self._last_reason: str | None = None

    def update(self, outage: Outage) -> None:
        if self._in_place:
            self._stream.write("\r\x1b[K" + outage.line())
            self._stream.flush()
            self._shown = True
        elif outage.reason != self._last_reason:
            print(outage.line(), file=self._stream, flush=True)
        self._last_reason = outage.reason

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
        self._last_reason = None


def channel_prompt(channel: str) -> str:
    return f"#{channel}> "


class PromptTerminal:
    """An interactive prompt that stays on the bottom line while chat lines scroll above it.

    Cancelling ``read_line`` asks the running prompt to exit; leaving the context waits for the
    prompt thread, so the terminal is back in its normal mode before the process exits.
    """

    waits_for_connection = False

    def __init__(self, channel: str) -> None:
        # erase_when_done: a sent line is shown again, timestamped, when the server acks it.
        self._session: PromptSession[str] = PromptSession(
            channel_prompt(channel), erase_when_done=True
        )
        self._outage: Outage | None = None
        self._ticking: asyncio.AbstractEventLoop | None = None  # the loop a tick chain runs in
        self._lock = threading.Lock()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the running prompt's loop
        self._idle = threading.Event()  # no prompt is running in the worker thread
        self._idle.set()
        self._patch = patch_stdout(raw=False)  # raw=False: the proxy escapes ESC as well

    async def __aenter__(self) -> Self:
        _ = self._session.app.output  # create the output on the real stdout, before patching
        self._patch.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_prompt()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._idle.wait, _PROMPT_EXIT_TIMEOUT)
        self._patch.__exit__(exc_type, exc, tb)

    def show(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)  # sys.stdout is the patch_stdout proxy

    def set_channel(self, channel: str) -> None:
        """New prompt text: read by the next prompt, and redrawn in the one now running."""
        self._session.message = channel_prompt(channel)
        self._redraw()

    def outage(self, url: str, reason: str, retry_in: float, attempts: int) -> None:
        """The bottom toolbar shows the outage, counting down (the prompt redraws itself)."""
        self._outage = Outage(url, reason, retry_in, attempts)
        self._session.bottom_toolbar = self._toolbar
        self._redraw()
        with self._lock:
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._start_ticking, loop)

    def _start_ticking(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the prompt's loop: redraw every moment while the outage lasts (the countdown);
        one chain of ticks per prompt."""
        if self._ticking is not loop:
            self._ticking = loop
            self._tick(loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._outage is None or self._loop is not loop:
            self._ticking = None
            return
        self._session.app.invalidate()
        loop.call_later(_REFRESH_SECONDS, self._tick, loop)

    def outage_over(self) -> None:
        self._outage = None
        self._session.bottom_toolbar = None
        self._redraw()

    def _toolbar(self) -> str:
        outage = self._outage
        return "" if outage is None else outage.line()

    def _redraw(self) -> None:
        with self._lock:
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop just closed: the next one reads it
                loop.call_soon_threadsafe(self._session.app.invalidate)

    async def read_line(self) -> str | None:
        try:
            return await trio.to_thread.run_sync(self._prompt_once, abandon_on_cancel=True)
        except trio.Cancelled:
            self._stop_prompt()
            raise

    def _prompt_once(self) -> str | None:
        """Runs in a worker thread: one prompt; None for Ctrl+C, Ctrl+D or when leaving."""
        with self._lock:
            if self._closing:
                return None
            self._idle.clear()
        try:
            return self._session.prompt(pre_run=self._on_prompt_started)
        except (EOFError, KeyboardInterrupt):
            return None
        finally:
            with self._lock:
                self._loop = None
            self._idle.set()

    def _on_prompt_started(self) -> None:
        """Runs in the prompt's loop once it can be told to exit: records that loop."""
        with self._lock:
            if self._closing:
                self._exit_prompt()
            else:
                self._loop = asyncio.get_running_loop()
        if self._outage is not None and self._loop is not None:
            self._start_ticking(self._loop)

    def _stop_prompt(self) -> None:
        """From any thread: end the running prompt (if any) and start no new one."""
        with self._lock:
            self._closing = True
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop just closed: that prompt is over
                loop.call_soon_threadsafe(self._exit_prompt)

    def _exit_prompt(self) -> None:
        app = self._session.app
        if app.future is not None and not app.future.done():
            app.exit(exception=EOFError)


class PipeTerminal:
    """Lines from stdin (a pipe or a file), lines to stdout: ``printf 'hi\\n' | … connect``.

    Reads with ``os.read`` in a worker thread: a thread blocked there holds no Python lock, so
    abandoning it when we leave cannot stall the interpreter's shutdown.
    """

    waits_for_connection = True

    def __init__(self, fd: int | None = None) -> None:
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._splitter = LineSplitter()
        self._ready: deque[str | ProtocolError] = deque()
        self._eof = False
        self._status = StatusLine(sys.stdout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def show(self, line: str) -> None:
        self._status.clear()
        print(line, file=sys.stdout, flush=True)

    def set_channel(self, channel: str) -> None:
        return None  # no prompt to change

    def outage(self, url: str, reason: str, retry_in: float, attempts: int) -> None:
        self._status.update(Outage(url, reason, retry_in, attempts))

    def outage_over(self) -> None:
        self._status.clear()

    async def read_line(self) -> str | None:
        while True:
            while self._ready:
                item = self._ready.popleft()
                if isinstance(item, str):
                    return item
                self.show(f"! {item.code}: {item.message}")
            if self._eof:
                return None
            data = await trio.to_thread.run_sync(
                os.read, self._fd, _READ_CHUNK, abandon_on_cancel=True
            )
            if not data:
                self._eof = True
                data = b"\n"  # ends a last line that has no newline (an empty one is skipped)
            self._ready.extend(self._splitter.feed(data))
