"""A program on a pseudo-terminal, seen through a terminal emulator (pyte), from trio.

pexpect gives the program a real pty of a fixed size; everything it writes is fed to a pyte
screen, so tests assert on what a person would see (which line is where, what the prompt holds),
not on escape sequences. The screen also answers cursor-position requests the way a terminal
does, as prompt_toolkit asks for them. Reads wait on the pty's file descriptor with trio, so a
fake server in the same trio run keeps working while a test waits for the screen.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import pexpect
import pyte
import trio


class _AnsweringScreen(pyte.Screen):
    """A screen that sends the terminal's replies (cursor position reports) back to the program."""

    def __init__(self, columns: int, lines: int, reply: Callable[[str], None]) -> None:
        super().__init__(columns, lines)
        self._reply = reply

    def write_process_input(self, data: str) -> None:
        self._reply(data)


class PtyTerminal:
    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str], rows: int = 24, columns: int = 100
    ) -> None:
        self.child = pexpect.spawn(argv[0], list(argv[1:]), env=env, dimensions=(rows, columns))
        self.screen = _AnsweringScreen(columns, rows, self.child.send)
        self._stream = pyte.ByteStream(self.screen)
        self.output = bytearray()  # everything the program wrote, for failure messages
        self.closed = False

    # --- what is on the screen ---------------------------------------------------------

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def last_line(self) -> str:
        """The last non-empty line: where the prompt is."""
        return next((line for line in reversed(self.lines()) if line), "")

    def row_of(self, needle: str) -> int:
        """The first screen row containing ``needle``; -1 when absent."""
        return next((i for i, line in enumerate(self.lines()) if needle in line), -1)

    def dump(self) -> str:
        return f"--- screen ---\n{self.text()}\n--- raw output ---\n{bytes(self.output)!r}"

    # --- driving it ----------------------------------------------------------------------

    def type(self, keys: str) -> None:
        self.child.send(keys)

    async def wait_for(
        self, condition: Callable[[], object], what: str, seconds: float = 15
    ) -> None:
        """Read output until ``condition()`` holds on the screen; fail with the screen if not."""
        try:
            with trio.fail_after(seconds):
                while not condition():
                    if self.closed:
                        raise AssertionError(f"program ended before {what}\n{self.dump()}")
                    await self._read()
        except trio.TooSlowError:
            raise AssertionError(f"timed out waiting for {what}\n{self.dump()}") from None

    async def wait_for_text(self, needle: str, seconds: float = 15) -> None:
        await self.wait_for(lambda: needle in self.text(), repr(needle), seconds)

    async def wait_exit(self, seconds: float = 15) -> int:
        """Read until the program closes the terminal; its exit status (-N for signal N)."""
        await self.wait_for(lambda: self.closed, "the program to exit", seconds)
        with trio.fail_after(seconds):
            await trio.to_thread.run_sync(self.child.wait)
        if self.child.signalstatus is not None:
            return -self.child.signalstatus
        return self.child.exitstatus

    async def _read(self) -> None:
        fd = self.child.child_fd
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 65536)
        except OSError as exc:  # Linux reports EIO once the other side of the pty is closed
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.closed = True
            return
        self.output += data
        self._stream.feed(data)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)
