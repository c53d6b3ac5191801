"""History for clients that come back: one read serves many, and it is sent under back-pressure.

A reconnect storm is thousands of clients asking for the same channel's history from nearly the
same id (they all saw the same last message before their gateway died). ``ReplayReads`` gathers
the requests for one channel that arrive within ``GATHER_SECONDS`` and answers them all with
one bus read from the oldest id asked for; each client then gets its own slice. Every request
in a batch was made by a client already subscribed (sessions subscribe before they ask), and
the read starts after the batch closes, so no live message can fall between a client's
subscription and its history.

The encoded frames and lines of a shared read are made once per batch and shared by every
client's outbox, so a storm costs one copy of the history, not one per client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import trio

from broadcast.bus.base import Bus, BusUnavailable
from broadcast.protocol.commands import Recovery
from broadcast.protocol.envelope import decode, parse_id, payload_id
from broadcast.protocol.lines import render_event
from broadcast.protocol.websocket_frames import encode_text_frame

# Long enough to gather a storm's requests, short enough not to be felt by one client.
GATHER_SECONDS: Final = 0.01


@dataclass
class Replay:
    """One client's share of a read: payloads oldest first, and how much it can be trusted."""

    batch: _Batch
    start: int
    complete: bool

    @property
    def count(self) -> int:
        return len(self.batch.payloads) - self.start

    @property
    def epoch(self) -> str:
        return self.batch.epoch

    @property
    def reset(self) -> bool:
        return self.batch.reset

    @property
    def newest(self) -> tuple[int, int]:
        return self.batch.ids[-1] if self.count else (-1, -1)

    def frames(self) -> list[bytes]:
        return self.batch.frames()[self.start :]

    def lines(self) -> list[bytes]:
        return self.batch.lines()[self.start :]


@dataclass
class _Batch:
    payloads: list[bytes] = field(default_factory=list)
    ids: list[tuple[int, int]] = field(default_factory=list)
    complete: bool = True
    epoch: str = ""
    reset: bool = False
    _frames: list[bytes] | None = None
    _lines: list[bytes] | None = None

    def frames(self) -> list[bytes]:
        if self._frames is None:
            self._frames = [encode_text_frame(payload) for payload in self.payloads]
        return self._frames

    def lines(self) -> list[bytes]:
        if self._lines is None:
            self._lines = [render_event(decode(payload)) or b"" for payload in self.payloads]
        return self._lines


@dataclass
class _Gathering:
    requests: list[Recovery] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    batch: _Batch | None = None
    error: BusUnavailable | None = None


class ReplayReads:
    def __init__(self, bus: Bus, *, gather: float = GATHER_SECONDS) -> None:
        self._bus = bus
        self._gather = gather
        self._open: dict[tuple[str, str | None, bool], _Gathering] = {}
        self.reads = 0
        self.requests = 0

    async def read(self, channel: str, recovery: Recovery) -> Replay:
        """This client's replay. Raises BusUnavailable when the bus cannot answer."""
        self.requests += 1
        by_count = recovery.since is None
        key = (channel, recovery.epoch, by_count)
        gathering = self._open.get(key)
        if gathering is None:
            gathering = self._open[key] = _Gathering()
            gathering.requests.append(recovery)
            await trio.sleep(self._gather)
            del self._open[key]
            try:
                gathering.batch = await self._read_for(channel, recovery.epoch, gathering.requests)
            except BusUnavailable as exc:
                gathering.error = exc
            finally:
                gathering.done.set()
        else:
            gathering.requests.append(recovery)
            await gathering.done.wait()
        if gathering.error is not None or gathering.batch is None:
            raise gathering.error or BusUnavailable("history read failed")
        return _share(gathering.batch, recovery)

    async def _read_for(self, channel: str, epoch: str | None, requests: list[Recovery]) -> _Batch:
        self.reads += 1
        if requests[0].since is None:
            last = max(request.last for request in requests)
            history = await self._bus.history(channel, last=last, epoch=epoch)
        else:
            oldest = min((request.since for request in requests if request.since), key=parse_id)
            history = await self._bus.history(channel, after=oldest, epoch=epoch)
        ids = [parse_id(payload_id(payload) or "0-0") for payload in history.messages]
        return _Batch(
            payloads=history.messages,
            ids=ids,
            complete=history.complete,
            epoch=history.epoch,
            reset=history.reset,
        )


def _share(batch: _Batch, recovery: Recovery) -> Replay:
    """This request's slice of a shared read, and whether it is complete for it."""
    if recovery.since is None:
        start = max(0, len(batch.payloads) - recovery.last)
        complete = batch.complete or start > 0  # more than asked for: the newest N are all here
        return Replay(batch, start, complete)
    if batch.reset:  # the client's ids belong to another history: all of this one is new
        return Replay(batch, 0, batch.complete)
    since = parse_id(recovery.since)
    start = 0
    while start < len(batch.ids) and batch.ids[start] <= since:
        start += 1
    # Everything after ``since`` is here if the read was whole, or if it reaches back past it.
    complete = batch.complete or (start > 0)
    return Replay(batch, start, complete)
