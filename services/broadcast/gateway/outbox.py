"""A client's bounded queue of outgoing bytes, flushed with as few writes as possible.

The fan-out only ever calls ``push`` and ``flush`` (it never awaits a client), so one stalled
reader cannot slow anyone else. Measured (docs/design.md), the cost of a delivery is per write
and per task wake-up, not per byte, so:

- ``flush`` first tries one non-blocking write of everything queued, straight from the fan-out
  loop: when the socket has room (the usual case) no task wakes up at all;
- what the socket does not take is left to the outbox's writer task, started for the purpose in
  the session's nursery, which joins everything queued into one write, keeps the order, and
  ends when the queue is empty;
- past ``limit`` unsent bytes the client is slow: the backlog is dropped, the piece already
  partly on the wire is finished (a frame is never cut), the final words (close 4008) follow,
  and ``on_done`` ends the session.

Pieces pushed are whole frames (or lines); the outbox tracks where they end, so it knows at any
moment whether the wire is between two of them.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio

DirectWrite = Callable[[bytes], int]
"""Writes what it can without blocking and returns how much; raises OSError when broken."""
PartialSend = Callable[[memoryview], Awaitable[int]]
"""Sends some of the bytes, waiting for room, and returns how many; cancel-safe (a cancelled
call sent nothing)."""


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


def partial_send(stream: trio.abc.Stream) -> PartialSend | None:
    """Partial sends for a plain TCP stream (trio's socket ``send``), else None."""
    if not isinstance(stream, trio.SocketStream):
        return None
    return stream.socket.send


class Outbox:
    """Owns its writer: ``attach`` gives it the session's nursery, where it starts a writer only
    when the socket is full or the outbox closes, so an idle client costs no task at all."""

    def __init__(
        self,
        limit: int,
        stream: trio.abc.Stream,
        *,
        on_slow: Callable[[], bytes],
        on_done: Callable[[], None],
    ) -> None:
        """``on_slow`` is called once when the client is found slow and returns the last bytes
        for it (a close frame); ``on_done`` is called when the outbox closed and wrote its last
        bytes, or broke."""
        self._limit = limit
        self._stream = stream
        self._on_slow = on_slow
        self._on_done = on_done
        self._direct_write = socket_direct_write(stream)
        self._partial_send = partial_send(stream)
        self._chunks: list[bytes] = []
        self._size = 0
        self._head_started = False
        """The first chunk is the tail of a piece already partly on the wire."""
        self._nursery: trio.Nursery | None = None
        self._writer_running = False
        self._closing = False
        self._trim = False
        """Slow: the writer finishes the piece it is in, then writes the final bytes only."""
        self._final = b""
        self.overflowed = False
        self.broken: OSError | trio.BrokenResourceError | None = None
        self._room: trio.Event | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def backlog(self) -> bool:
        """Whether anything is still waiting for the socket."""
        return bool(self._chunks) or self._writer_running

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Where writers run; None once the session is over (nothing more is written)."""
        self._nursery = nursery
        if nursery is not None and (self._chunks or self._final):
            self._start_writer()

    def push(self, data: bytes) -> None:
        """Queue ``data`` (whole pieces); never blocks. Ignored once closing. Call ``flush``
        after a batch."""
        if self._closing:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self.overflow()

    def overflow(self) -> None:
        """The client is too slow: drop its backlog, finish the piece on the wire, then say
        why (``on_slow``) and close."""
        if self._closing and self._trim:
            return
        self.overflowed = True
        self._closing = True
        self._trim = True
        head = self._chunks[0] if self._chunks and self._head_started else None
        self._chunks = [head] if head is not None else []
        self._size = len(head) if head is not None else 0
        self._final = self._on_slow()
        self._wake()
        self._start_writer()

    def send(self, data: bytes) -> None:
        """``push`` and ``flush`` one piece: for replies to this client alone."""
        self.push(data)
        self.flush()

    def flush(self) -> None:
        """Write what is queued now if the socket takes it; otherwise hand it to the writer."""
        if not self._chunks or self._writer_running:
            return
        if self._direct_write is not None and not self._closing:
            data, ends = self._take()
            try:
                written = self._direct_write(data)
            except OSError as exc:
                self._break(exc)
                return
            if written == len(data):
                return
            self._requeue(data, ends, written)
        self._start_writer()

    def close(self, final: bytes = b"") -> None:
        """Send what is queued, then ``final`` (a close frame, a goodbye line), then stop."""
        if self._closing:
            return
        self._closing = True
        self._final = final
        self._wake()
        self._start_writer()

    async def wait_for_room(self) -> None:
        """Back-pressure for a producer that may wait (a replay): returns once everything
        queued so far has been written, or the outbox closed."""
        while self.backlog and not self._closing:
            self._room = trio.Event()
            await self._room.wait()

    # -- the writer ------------------------------------------------------------------------

    def _start_writer(self) -> None:
        if self._writer_running or self._nursery is None:
            return
        self._writer_running = True
        self._nursery.start_soon(self._write)

    async def _write(self) -> None:
        """One write per round of everything queued, until nothing is; then the final bytes."""
        try:
            while self._chunks:
                data, ends = self._take()
                sent = await self._send(data, ends)
                if sent < len(data):  # slow: the rest of the backlog was dropped
                    break
            if self._closing:
                if self._final:
                    await self._send(self._final, [len(self._final)], trim=False)
                self._final = b""
                self._on_done()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break(exc)
        finally:
            self._writer_running = False
            self._wake()

    async def _send(self, data: bytes, ends: list[int], *, trim: bool = True) -> int:
        """Send ``data``; when the client turns out slow meanwhile, stop at the end of the piece
        on the wire. Returns how much was sent."""
        if self._partial_send is None:  # TLS, tests' memory streams: all or nothing
            await self._stream.send_all(data)
            return len(data)
        view = memoryview(data)
        sent, limit = 0, len(data)
        head_started = self._head_started
        while sent < limit:
            if trim and self._trim:
                limit = _piece_end(sent, ends, head_started)
                if sent >= limit:
                    break
            sent += await self._partial_send(view[sent:limit])
        self._head_started = False
        return sent

    # -- bookkeeping -----------------------------------------------------------------------

    def _take(self) -> tuple[bytes, list[int]]:
        """Everything queued as one piece of bytes, and where each queued piece ends in it."""
        ends, total = [], 0
        for chunk in self._chunks:
            total += len(chunk)
            ends.append(total)
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = []
        self._size = 0
        return data, ends

    def _requeue(self, data: bytes, ends: list[int], written: int) -> None:
        """Put back what a direct write left, keeping the pieces apart."""
        starts = [0, *ends[:-1]]
        self._chunks = [
            data[max(start, written) : end]
            for start, end in zip(starts, ends, strict=True)
            if end > written
        ]
        self._size = len(data) - written
        self._head_started = written not in (0, *ends)

    def _break(self, exc: OSError | trio.BrokenResourceError | trio.ClosedResourceError) -> None:
        self.broken = exc if isinstance(exc, OSError | trio.BrokenResourceError) else None
        self._closing = True
        self._chunks.clear()
        self._size = 0
        self._final = b""
        self._wake()
        self._on_done()

    def _wake(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None


def _piece_end(sent: int, ends: list[int], head_started: bool) -> int:
    """Where the piece on the wire ends: nothing more to send when the wire is between pieces."""
    if sent == 0:
        return ends[0] if head_started else 0
    return next(end for end in ends if end >= sent)
