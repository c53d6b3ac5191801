"""A receiver worker process: many raw-socket clients, read through one epoll, counted cheaply.

The load generator must cost less than the server it measures, or it measures itself. Each
worker runs its own trio loop (spawned, so it shares nothing with the parent), opens its share
of the clients with trio, then hands their sockets to a private epoll that one trio task drains:
a burst of one message to hundreds of clients costs one trio wake-up and one ``recv`` per
client, not one task switch per client. Frames are parsed by slicing bytes (``wire``), not by a
WebSocket library.

Per client it checks one order (ids strictly increasing as integer pairs; each sender's
sequence strictly increasing), counts duplicates with a bitmap per sender (bounded by the step's
planned message count) and records latency in fixed-size histograms.

The parent drives it over a pipe with small tuples (see ``serve_commands``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import select
import socket
import termios
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from broadcast.bench import wire
from broadcast.bench.harness import raise_file_limit
from broadcast.bench.histogram import Histogram

# Handshakes in flight per worker: enough to open thousands of clients in seconds without
# flooding the gateway's accept queue (its sniffing and handshake are the slow part).
OPEN_CONCURRENCY = 64
OPEN_TIMEOUT_SECONDS = 30.0
# One recv per ready socket per wake-up. 64 KiB stays under malloc's mmap threshold (a larger
# buffer would cost an mmap/munmap per call) and holds hundreds of ~200-byte frames.
RECV_BYTES = 65536
# Ready sockets taken per epoll poll; the rest wait for the next round (level-triggered).
MAX_EVENTS = 2048
# A client buffers at most one partial frame or line (a message frame is a few KiB at most);
# more than this means a broken stream, and 256 KiB x 10,000 clients still fits in memory.
MAX_PENDING_BYTES = 1 << 18
ERRORS_KEPT = 5


# A message as a receiver needs it: (step, sender, seq, sent_ns, id as an integer pair or None).
Parsed = tuple[int, int, int, int, tuple[int, int] | None]
# Every client gets the same bytes for a message, so each worker parses a message once and
# looks it up for the other clients (by id; by text for line clients). Only messages in flight
# matter; past this many entries the cache starts over (bounded memory).
PARSE_CACHE_ENTRIES = 4096


def parse_message(text: bytes, message_id: bytes | None) -> Parsed | None:
    """The fields of one of our messages; None for text that is not ours."""
    try:
        step, sender, seq, sent_ns = wire.parse_text(text)
        ordinal = wire.parse_id(message_id) if message_id is not None else None
    except ValueError:
        return None
    return step, sender, seq, sent_ns, ordinal


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told once, at spawn."""

    index: int
    kind: str  # "ws" or "lines"
    channel: str
    sender_prefix: bytes  # line clients see "name: text"; only our senders' names count
    announce: bool = True  # join notices and presence on, as for a user; False: announce=0


@dataclass
class StepState:
    """What one measured step has seen, across this worker's clients."""

    step: int = -1
    senders: int = 0
    sender_gateways: tuple[int, ...] = ()
    max_seq: int = 0
    delivered: int = 0
    duplicates: int = 0
    order_violations: int = 0
    stale: int = 0  # messages of another step (late stragglers), not counted
    foreign: int = 0  # frames or lines that are not this run's messages
    first_ns: int = 0
    last_ns: int = 0
    backlog_max: int = 0  # most bytes seen waiting unread in the sockets, sampled each second
    latency: Histogram = field(default_factory=Histogram)
    cross_latency: Histogram = field(default_factory=Histogram)
    parsed: dict[bytes, Parsed | None] = field(default_factory=dict)

    def remember(self, key: bytes, message: Parsed | None) -> Parsed | None:
        if len(self.parsed) >= PARSE_CACHE_ENTRIES:
            self.parsed.clear()
        self.parsed[key] = message
        return message


class Receiver:
    """One client's socket and its bookkeeping; fed whole ``recv`` results."""

    __slots__ = (
        "address", "client_id", "closed", "delivered", "gateway", "last_id", "last_seq",
        "pending", "seen", "sock",
    )  # fmt: skip

    def __init__(self, client_id: int, gateway: int, address: tuple[str, int]) -> None:
        self.client_id = client_id
        self.gateway = gateway
        self.address = address
        self.sock: socket.socket | None = None
        self.pending = b""
        self.closed: str | None = None
        self.last_id = (-1, -1)
        self.delivered = 0
        self.last_seq: list[int] = []
        self.seen: list[bytearray] = []

    def reset(self, senders: int, max_seq: int) -> None:
        self.delivered = 0
        self.last_seq = [-1] * senders
        self.seen = [bytearray((max_seq >> 3) + 1) for _ in range(senders)]

    def record(self, state: StepState, message: Parsed | None, now: int) -> None:
        """Count one message for this client: new, duplicate or out of order; its latency."""
        if message is None:
            state.foreign += 1
            return
        step, sender, seq, sent_ns, ordinal = message
        if step != state.step:
            state.stale += 1
            return
        if sender >= state.senders or seq >= state.max_seq:
            state.foreign += 1
            return
        bitmap, bit = self.seen[sender], 1 << (seq & 7)
        if bitmap[seq >> 3] & bit:
            state.duplicates += 1
            return
        bitmap[seq >> 3] |= bit
        in_order = seq > self.last_seq[sender]
        if in_order:
            self.last_seq[sender] = seq
        if ordinal is not None:
            if ordinal > self.last_id:
                self.last_id = ordinal
            else:
                in_order = False
        if not in_order:
            state.order_violations += 1
        self.delivered += 1
        state.delivered += 1
        micros = (now - sent_ns) // 1000
        state.latency.add(micros)
        if state.sender_gateways[sender] != self.gateway:
            state.cross_latency.add(micros)

    def feed_frames(self, state: StepState, data: bytes, now: int) -> None:
        buffer = self.pending + data if self.pending else data
        parsed = state.parsed
        pos = 0
        while (frame := wire.next_frame(buffer, pos)) is not None:
            opcode, start, end = frame
            if opcode == wire.TEXT:
                if buffer.startswith(wire.MESSAGE_PREFIX, start):
                    id_start = start + len(wire.MESSAGE_PREFIX)
                    id_end = buffer.index(b'"', id_start, end)
                    message_id = buffer[id_start:id_end]
                    try:
                        message = parsed[message_id]
                    except KeyError:
                        text_start = buffer.index(wire.TEXT_FIELD, id_end, end) + len(
                            wire.TEXT_FIELD
                        )
                        text_end = buffer.index(b'"', text_start, end)
                        message = state.remember(
                            message_id, parse_message(buffer[text_start:text_end], message_id)
                        )
                    self.record(state, message, now)
                else:
                    state.foreign += 1  # welcome, notices: not messages
            elif opcode == wire.PING:
                self._send(wire.client_frame(wire.PONG, buffer[start:end]))
            elif opcode == wire.CLOSE:
                code = int.from_bytes(buffer[start : start + 2], "big") if end > start else 1005
                self.closed = f"close {code}"
            pos = end
        self.pending = buffer[pos:]

    def feed_lines(self, state: StepState, data: bytes, now: int, prefix: bytes) -> None:
        buffer = self.pending + data if self.pending else data
        pos = 0
        while (end := buffer.find(b"\n", pos)) >= 0:
            if buffer.startswith(prefix, pos):
                sep = buffer.find(b": ", pos, end)
                if sep >= 0:
                    text = buffer[sep + 2 : end]
                    message = state.parsed.get(text)
                    if message is None:
                        message = state.remember(text, parse_message(text, None))
                    self.record(state, message, now)
                else:
                    state.foreign += 1
            else:
                state.foreign += 1  # notices ("* bob joined #general"), other people's chat
            pos = end + 1
        self.pending = buffer[pos:]

    def _send(self, data: bytes) -> None:
        try:
            assert self.sock is not None
            self.sock.send(data)
        except OSError:
            pass  # a receiver's send buffer is empty; a lost pong only risks an idle close


class ReceiverWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.epoll = select.epoll()
        self.by_fd: dict[int, Receiver] = {}
        self.receivers: list[Receiver] = []
        self.state = StepState()
        self.closed_reasons: Counter[str] = Counter()
        self.open_errors: list[str] = []

    # -- opening ---------------------------------------------------------------------------

    async def open_all(self, receivers: list[Receiver]) -> dict[str, Any]:
        """Open ``receivers`` concurrently; the reply to ``open``: counts, per gateway too."""
        limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
        failed = 0

        async def open_one(receiver: Receiver) -> None:
            nonlocal failed
            async with limiter:
                try:
                    with trio.fail_after(OPEN_TIMEOUT_SECONDS):
                        await self._open(receiver)
                except (OSError, ConnectionError, trio.TooSlowError) as exc:
                    failed += 1
                    if len(self.open_errors) < ERRORS_KEPT:
                        self.open_errors.append(f"{receiver.address}: {exc!r}")

        async with trio.open_nursery() as nursery:
            for receiver in receivers:
                nursery.start_soon(open_one, receiver)
        opened = Counter(r.gateway for r in receivers if r.sock is not None)
        return {
            "opened": len(receivers) - failed,
            "failed": failed,
            "opened_by_gateway": dict(opened),
            "errors": self.open_errors[:],
        }

    async def _open(self, receiver: Receiver) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(receiver.address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, errno.errorcode.get(code, "connect failed"))
            await trio.lowlevel.wait_writable(sock)
            if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(code, errno.errorcode.get(code, "connect failed"))
            host, port = receiver.address
            if self.spec.kind == "ws":
                query = {"name": f"r{receiver.client_id}", "channel": self.spec.channel}
                if not self.spec.announce:
                    query["announce"] = "0"  # the variant without join notices and presence
                sock.sendall(wire.upgrade_request(host, port, query))
                rest = await _read_head(sock)
            else:
                sock.sendall(b"\n")  # an empty line: a line client at once, no 300 ms sniffing
                rest = b""
        except BaseException:
            sock.close()
            raise
        receiver.sock, receiver.closed, receiver.pending = sock, None, b""
        receiver.reset(self.state.senders, self.state.max_seq)
        self.by_fd[sock.fileno()] = receiver
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        if rest:
            self._feed(receiver, rest, time.time_ns())

    # -- reading ---------------------------------------------------------------------------

    async def pump(self) -> None:
        """Drain every ready client socket; one trio wake-up per epoll round."""
        epoll, by_fd = self.epoll, self.by_fd
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            events = epoll.poll(0, MAX_EVENTS)
            now = time.time_ns()
            state = self.state  # a new step may have begun since the last round
            for fd, _ in events:
                receiver = by_fd.get(fd)
                if receiver is None or receiver.sock is None:
                    continue
                try:
                    data = receiver.sock.recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._close(receiver, f"error {exc.errno}")
                    continue
                if not data:
                    self._close(receiver, receiver.closed or "eof")
                    continue
                if not state.first_ns:
                    state.first_ns = now
                state.last_ns = now
                self._feed(receiver, data, now)

    def _feed(self, receiver: Receiver, data: bytes, now: int) -> None:
        if self.spec.kind == "ws":
            receiver.feed_frames(self.state, data, now)
        else:
            receiver.feed_lines(self.state, data, now, self.spec.sender_prefix)
        if len(receiver.pending) > MAX_PENDING_BYTES:
            self._close(receiver, "oversized frame")
        elif receiver.closed and self.spec.kind == "ws":
            self._close(receiver, receiver.closed)

    def _close(self, receiver: Receiver, reason: str) -> None:
        sock = receiver.sock
        if sock is None:
            return
        self.by_fd.pop(sock.fileno(), None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(sock.fileno())
        sock.close()
        receiver.sock, receiver.closed = None, reason
        self.closed_reasons[reason] += 1

    def close_all(self) -> None:
        for receiver in self.receivers:
            self._close(receiver, "stopped")

    # -- commands from the parent ----------------------------------------------------------

    def start_step(self, step: int, senders: int, sender_gateways: list[int], max_seq: int) -> None:
        self.state = StepState(step, senders, tuple(sender_gateways), max_seq)
        self.closed_reasons.clear()
        for receiver in self.receivers:
            receiver.reset(senders, max_seq)

    def poll(self, need: int, backlog: bool = False) -> dict[str, int]:
        """Progress: how much arrived, and how many clients already have ``need`` messages.

        With ``backlog``, also the bytes waiting unread in this worker's sockets (FIONREAD): if
        the load generator were the bottleneck, deliveries would pile up there.
        """
        live = [r for r in self.receivers if r.sock is not None]
        if backlog:
            waiting = sum(_unread_bytes(r.sock) for r in live if r.sock is not None)
            self.state.backlog_max = max(self.state.backlog_max, waiting)
        return {
            "delivered": self.state.delivered,
            "complete": sum(1 for r in live if r.delivered >= need),
            "open": len(live),
            "last_ns": self.state.last_ns,
        }

    def report(self) -> dict[str, Any]:
        s = self.state
        counts = [r.delivered for r in self.receivers]
        return {
            "delivered": s.delivered,
            "duplicates": s.duplicates,
            "order_violations": s.order_violations,
            "stale": s.stale,
            "foreign": s.foreign,
            "backlog_max": s.backlog_max,
            "first_ns": s.first_ns,
            "last_ns": s.last_ns,
            "clients": len(self.receivers),
            "open": sum(1 for r in self.receivers if r.sock is not None),
            "closed": dict(self.closed_reasons),
            "min_per_client": min(counts, default=0),
            "max_per_client": max(counts, default=0),
            "latency": s.latency.to_wire(),
            "cross_latency": s.cross_latency.to_wire(),
        }

    async def serve_commands(self, conn: Connection) -> None:
        """``(name, *args)`` in, one reply out, until ``stop`` or the parent goes away."""
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            try:
                name, *args = conn.recv()
            except EOFError:
                return
            if name == "open":
                targets: list[tuple[int, int, str, int]] = args[0]
                new = [Receiver(cid, gw, (host, port)) for cid, gw, host, port in targets]
                self.receivers += new
                conn.send(await self.open_all(new))
            elif name == "reopen":
                gone = [r for r in self.receivers if r.sock is None]
                conn.send(await self.open_all(gone))
            elif name == "step":
                self.start_step(*args)
                conn.send({"ok": True})
            elif name == "poll":
                conn.send(self.poll(*args))
            elif name == "report":
                conn.send(self.report())
            elif name == "stop":
                self.close_all()
                conn.send({"stopped": True})
                return
            else:
                conn.send({"error": f"unknown command {name!r}"})


def _unread_bytes(sock: socket.socket) -> int:
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4), "little")
    except OSError:
        return 0


async def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while True:
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
        if (parts := wire.split_head(data)) is not None:
            return parts[1]


async def _run(spec: WorkerSpec, conn: Connection) -> None:
    worker = ReceiverWorker(spec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.pump)
        await worker.serve_commands(conn)
        nursery.cancel_scope.cancel()
    worker.close_all()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned worker process."""
    raise_file_limit()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C reaches the whole process group
        trio.run(_run, spec, conn)
