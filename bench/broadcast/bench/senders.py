"""Senders: WebSocket clients that publish paced plain-text frames and honour back-pressure.

A sender joins with ``announce=0`` (it is not news), publishes frames whose text carries its
step, index, sequence number and send time (``wire.message_text``), and keeps at most ``window``
publishes unanswered: the gateway answers each with exactly one ``ack`` or ``error``, so a slow
gateway slows the sender instead of queueing without bound. When it falls behind its schedule
it catches up by writing every message that is due in one write, and the lag is reported: a rate
the cluster cannot absorb shows as sender lag, not as a hidden queue in the load generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from broadcast.bench import wire
from broadcast.bench.harness import Target
from broadcast.bench.histogram import Histogram

# Publishes in flight per sender. The gateway handles one client's publishes one after another
# (one Redis round trip each), so a window only hides that latency; 64 is plenty at any rate
# one connection can reach, and bounds what a stalled gateway makes us buffer.
WINDOW = 64
CONNECT_TIMEOUT_SECONDS = 10.0
RECEIVE_BYTES = 65536
ERROR_SAMPLES = 3  # error events kept per sender, to show why publishes were refused


@dataclass
class SendResult:
    sent: int = 0
    acked: int = 0
    errors: int = 0
    lag: Histogram = field(default_factory=Histogram)  # µs behind schedule, per message
    error_samples: list[str] = field(default_factory=list)  # the first few error events
    first_ns: int = 0
    last_ns: int = 0


class Sender:
    def __init__(self, index: int, gateway: int, target: Target, name: str, channel: str) -> None:
        self.index = index
        self.gateway = gateway
        self.target = target
        self.name = name
        self.channel = channel
        self.window = trio.Semaphore(WINDOW)
        self.answered = 0  # acks + errors, ever
        self.acked = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.closed: str | None = None
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._answer = trio.Event()

    async def connect(self, nursery: trio.Nursery) -> None:
        """Connect, complete the handshake and start reading answers in ``nursery``."""
        with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
            stream = await trio.open_tcp_stream(self.target.host, self.target.port)
            query = {"name": self.name, "channel": self.channel, "announce": "0"}
            await stream.send_all(wire.upgrade_request(self.target.host, self.target.port, query))
            data = b""
            while (parts := wire.split_head(data)) is None:
                chunk = await stream.receive_some(RECEIVE_BYTES)
                if not chunk:
                    raise ConnectionError(f"sender {self.name}: closed during the handshake")
                data += chunk
        self._stream = stream
        nursery.start_soon(self._read_answers, parts[1])

    async def _send(self, data: bytes) -> None:
        assert self._stream is not None
        async with self._send_lock:
            await self._stream.send_all(data)

    async def _read_answers(self, pending: bytes) -> None:
        assert self._stream is not None
        try:
            while True:
                pos = 0
                while (frame := wire.next_frame(pending, pos)) is not None:
                    opcode, start, end = frame
                    if opcode == wire.TEXT:
                        self._on_event(pending, start)
                    elif opcode == wire.PING:
                        await self._send(wire.client_frame(wire.PONG, pending[start:end]))
                    elif opcode == wire.CLOSE:
                        self.closed = f"close {int.from_bytes(pending[start : start + 2], 'big')}"
                    pos = end
                pending = pending[pos:]
                data = await self._stream.receive_some(RECEIVE_BYTES)
                if not data:
                    self.closed = self.closed or "eof"
                    return
                pending += data
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = f"broken: {exc!r}"
        finally:
            self._answer.set()

    def _on_event(self, buffer: bytes, start: int) -> None:
        if buffer.startswith(wire.ACK_PREFIX, start):
            self.acked += 1
        elif buffer.startswith(wire.ERROR_PREFIX, start):
            self.errors += 1
            if len(self.error_samples) < ERROR_SAMPLES:
                end = buffer.find(b"}", start)
                self.error_samples.append(buffer[start : end + 1].decode(errors="replace"))
        else:
            return  # welcome
        self.answered += 1
        self.window.release()
        self._answer.set()
        self._answer = trio.Event()

    async def send_step(
        self, step: int, count: int, interval: float, first_at: float, drain_seconds: float
    ) -> SendResult:
        """Send ``count`` messages, one every ``interval`` seconds from trio time ``first_at``;
        then wait (up to ``drain_seconds``) for every answer."""
        result = SendResult()
        acked0, errors0, answered0 = self.acked, self.errors, self.answered
        seq = 0
        while seq < count and self.closed is None:
            scheduled = first_at + seq * interval
            if trio.current_time() < scheduled:
                await trio.sleep_until(scheduled)
            await self.window.acquire()
            taken = 1
            due = min(count, int((trio.current_time() - first_at) / interval) + 1)
            while seq + taken < due:
                try:
                    self.window.acquire_nowait()
                except trio.WouldBlock:
                    break
                taken += 1
            now = trio.current_time()
            for number in range(seq, seq + taken):
                result.lag.add(int((now - first_at - number * interval) * 1e6))
            sent_ns = time.time_ns()
            frames = b"".join(
                wire.client_frame(
                    wire.TEXT, wire.message_text(step, self.index, n, sent_ns).encode()
                )
                for n in range(seq, seq + taken)
            )
            try:
                await self._send(frames)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = f"broken: {exc!r}"
                break
            result.first_ns = result.first_ns or sent_ns
            result.last_ns = sent_ns
            seq += taken
        result.sent = seq
        with trio.move_on_after(drain_seconds):
            while self.answered - answered0 < seq and self.closed is None:
                await self._answer.wait()
        result.acked = self.acked - acked0
        result.errors = self.errors - errors0
        result.error_samples = self.error_samples[:]
        return result

    async def close(self) -> None:
        if self._stream is not None:
            with trio.move_on_after(1):
                await self._send(wire.client_frame(wire.CLOSE, (1000).to_bytes(2, "big")))
            await self._stream.aclose()
