"""A client's bounded queue of outgoing bytes, written by one writer that coalesces.

The fan-out only ever calls ``push`` (never awaits a client), so one stalled reader cannot slow
anyone else. The writer joins everything queued into one ``send_all``: measured, the cost of
delivery is per write, not per byte (docs/design.md). Past ``limit`` unsent bytes the client is
slow: the backlog is dropped and ``on_overflow`` ends the session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


class Outbox:
    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self._limit = limit
        self._on_overflow = on_overflow
        self._chunks: list[bytes] = []
        self._size = 0
        self._wakeup = trio.Event()
        self._closing = False
        self.overflowed = False
        self.writing = False
        """True while a write is under way: cancelling it may leave half a frame on the wire."""

    @property
    def queued_bytes(self) -> int:
        return self._size

    def push(self, data: bytes) -> None:
        """Queue ``data``; never blocks. Ignored once the outbox is closing or overflowed."""
        if self._closing:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self.overflowed = True
            self._closing = True
            self._chunks.clear()
            self._size = 0
            self._on_overflow()
        self._wakeup.set()

    def close(self, final: bytes = b"") -> None:
        """Send what is queued, then ``final`` (a close frame, a goodbye line), then stop."""
        if self._closing:
            return
        if final:
            self._chunks.append(final)
            self._size += len(final)
        self._closing = True
        self._wakeup.set()

    @property
    def closing(self) -> bool:
        return self._closing

    async def write_until_closed(self, send_all: Callable[[bytes], Awaitable[None]]) -> None:
        """The writer task: one ``send_all`` per wake-up, until closed and flushed."""
        while True:
            while not self._chunks:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks = []
            self._size = 0
            self.writing = True
            await send_all(data)
            self.writing = False
