"""A client's bounded queue of outgoing bytes, flushed with as few writes as possible.

The fan-out only ever calls ``push`` and ``flush`` (it never awaits a client), so one stalled
reader cannot slow anyone else. Measured (docs/design.md), the cost of a delivery is per write
and per task wake-up, not per byte, so:

- ``flush`` first tries one non-blocking write of everything queued, straight from the fan-out
  loop: when the socket has room (the usual case) no task wakes up at all;
- what the socket does not take is left to a writer task, started for the purpose, which joins
  everything queued into one ``send_all``, keeps the order, and ends when the queue is empty;
- past ``limit`` unsent bytes the client is slow: the backlog is dropped and ``on_give_up``
  ends the session (as it does when a direct write finds the connection broken).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio

DirectWrite = Callable[[bytes], int]
"""Writes what it can without blocking and returns how much; raises OSError when broken."""


def socket_direct_write(stream: trio.abc.Stream) -> DirectWrite | None:
    """A non-blocking write for a plain TCP stream; None for anything else (TLS, memory)."""
    if not isinstance(stream, trio.SocketStream):
        return None
    fd = stream.socket.fileno()  # trio keeps its sockets non-blocking

    def write(data: bytes) -> int:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    return write


class Outbox:
    """``start_writer`` starts the session's writer task (``write_pending``); it is called only
    when the socket is full or the outbox closes, so an idle client costs no task at all."""

    def __init__(
        self,
        limit: int,
        on_give_up: Callable[[], None],
        start_writer: Callable[[], None],
        direct_write: DirectWrite | None = None,
    ) -> None:
        self._limit = limit
        self._on_give_up = on_give_up
        self._start_writer = start_writer
        self._direct_write = direct_write
        self._chunks: list[bytes] = []
        self._size = 0
        self._writer_owns_queue = False
        self._closing = False
        self.overflowed = False
        self.broken: OSError | None = None
        self.writing = False
        """True while a write is under way: cancelling it may leave half a frame on the wire."""
        self._room: trio.Event | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def push(self, data: bytes) -> None:
        """Queue ``data``; never blocks. Ignored once closing. Call ``flush`` after a batch."""
        if self._closing:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self.overflow()

    def overflow(self) -> None:
        """The client is too slow: drop its backlog and give up on it."""
        self.overflowed = True
        self._give_up()

    def _give_up(self) -> None:
        self._closing = True
        self._chunks.clear()
        self._size = 0
        self._wake()
        self._on_give_up()

    @property
    def backlog(self) -> bool:
        """Whether anything is still waiting for the socket."""
        return bool(self._chunks) or self._writer_owns_queue

    async def wait_for_room(self) -> None:
        """Back-pressure for a producer that may wait (a replay): returns once everything
        queued so far has been written, or the outbox closed."""
        while self.backlog and not self._closing:
            self._room = trio.Event()
            await self._room.wait()

    def _wake(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def flush(self) -> None:
        """Write what is queued now if the socket takes it; otherwise hand it to the writer."""
        if not self._chunks or self._writer_owns_queue:
            return
        if self._direct_write is not None and not self._closing:
            data = self._take()
            try:
                written = self._direct_write(data)
            except OSError as exc:
                self.broken = exc
                self._give_up()
                return
            if written == len(data):
                return
            self._chunks = [data[written:]]
            self._size = len(data) - written
        self._hand_to_writer()

    def send(self, data: bytes) -> None:
        """``push`` and ``flush`` one piece: for replies to this client alone."""
        self.push(data)
        self.flush()

    def close(self, final: bytes = b"") -> None:
        """Send what is queued, then ``final`` (a close frame, a goodbye line), then stop."""
        if self._closing:
            return
        if final:
            self._chunks.append(final)
            self._size += len(final)
        self._closing = True
        self._hand_to_writer()

    def _hand_to_writer(self) -> None:
        if not self._writer_owns_queue:
            self._writer_owns_queue = True
            self._start_writer()

    def _take(self) -> bytes:
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = []
        self._size = 0
        return data

    async def write_pending(self, send_all: Callable[[bytes], Awaitable[None]]) -> None:
        """The writer task: one ``send_all`` per round until nothing is queued, then it ends."""
        try:
            while self._chunks:
                data = self._take()
                self.writing = True
                await send_all(data)
                self.writing = False
        finally:
            self._writer_owns_queue = False
            self._wake()
