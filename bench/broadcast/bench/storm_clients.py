"""A storm worker process: many raw-socket WebSocket clients that connect, stay, and come back.

Like the receivers (receivers.py), each worker runs its own trio loop and, once a client's
handshake is done, reads its socket through one private epoll drained by one trio task, so a
burst to thousands of clients costs one wake-up and one ``recv`` per client. Connecting and
reconnecting are trio tasks (one per client, at most ``concurrency`` at a time).

A client connects with the defaults a user gets (no ``announce=0``: join notices and presence
on) and is *ready* once it has its ``welcome`` and its first ``presence`` (or, for a server that
sends no presence, the baseline, its ``welcome``). When its connection ends it reconnects as the
CLI does (``broadcast.client.backoff``: at once for a draining gateway, after a jittered backoff
otherwise, no sooner than a 503's ``Retry-After``) with ``since=<last id>`` and ``epoch=<its
epoch>``, and is *recovered* when the ``recovered`` event arrives.

Every message is ``<sender>:<seq>``; per client a bitmap per sender counts duplicates, and ids
must increase (one order per channel). Messages that are not ours (their text looks like an HTTP
header line, say) are counted apart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import select
import socket
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlencode

import trio

from broadcast.bench import wire
from broadcast.bench.harness import raise_file_limit
from broadcast.client.backoff import Backoff

HANDSHAKE_TIMEOUT_SECONDS = 30.0
RECV_BYTES = 65536
MAX_EVENTS = 2048
MAX_PENDING_BYTES = 1 << 20
ERRORS_KEPT = 5
# Attempts per client before it counts as failed (a reconnect storm with 503s takes several).
MAX_ATTEMPTS = 30
# Messages parsed once per worker, by their bytes; past this the cache starts over.
PARSE_CACHE_ENTRIES = 4096
# "Name: value" or a request line: what a WebSocket handshake read as chat would look like.
HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*: |(GET|POST|HEAD|PUT|OPTIONS) \S+ HTTP/)")
_TYPE = re.compile(rb'^\{"type":"([a-z_]+)"')
_RETRY_AFTER = re.compile(rb"\r\nRetry-After: *(\d+)", re.IGNORECASE)


class Refused(ConnectionError):
    """The handshake was answered, but not with a 101."""

    def __init__(self, status: str, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class StormSpec:
    index: int
    wants_presence: bool  # the baseline sends no presence: ready at its welcome
    senders: int = 0


class Client:
    __slots__ = (
        "backoff",
        "cid",
        "closed",
        "epoch",
        "events",
        "last_id",
        "last_ordinal",
        "lost_reason",
        "pending",
        "ready",
        "ready_at",
        "reconnects",
        "recovered",
        "recovered_at",
        "seen",
        "sock",
        "target",
        "waiting",
        "wants_since",
    )  # fmt: skip

    def __init__(self, cid: int, target: tuple[str, int], senders: int) -> None:
        self.cid = cid
        self.target = target
        self.sock: socket.socket | None = None
        self.pending = b""
        self.closed: int | None = None  # close code from the server, if any
        self.lost_reason = ""
        self.last_id = ""
        self.last_ordinal = (-1, -1)
        self.epoch = ""
        self.seen = [bytearray(64) for _ in range(senders)]
        self.events: set[bytes] = set()
        self.ready = trio.Event()
        self.waiting: bytes = b"presence"  # the event that makes it ready
        self.ready_at = 0.0
        self.recovered = False
        self.recovered_at = 0.0
        self.reconnects = 0
        self.wants_since = False
        self.backoff = Backoff()


class StormWorker:
    def __init__(self, spec: StormSpec) -> None:
        self.spec = spec
        self.epoll = select.epoll()
        self.by_fd: dict[int, Client] = {}
        self.clients: list[Client] = []
        self.failures: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.errors: list[str] = []
        self.messages = 0
        self.duplicates = 0
        self.order_violations = 0
        self.foreign = 0
        self.header_lines = 0
        self.header_samples: list[str] = []
        self.samples: list[str] = []  # duplicates and order violations, as seen
        self.reconnect_to: list[tuple[str, int]] = []
        self.reconnecting = False
        self.nursery: trio.Nursery | None = None
        self.limiter = trio.CapacityLimiter(64)
        self.parsed: dict[bytes, dict[str, Any]] = {}

    # -- connecting ------------------------------------------------------------------------

    async def connect_all(self, clients: list[Client], concurrency: int) -> dict[str, Any]:
        self.limiter = trio.CapacityLimiter(concurrency)
        self.clients += clients
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(self._first_connect, client)
        ready = [c.ready_at - started for c in clients if c.ready_at]
        return {
            "ready": len(ready),
            "failed": len(clients) - len(ready),
            "last_ready_s": max(ready, default=0.0),
            "failures": dict(self.failures),
            "retries": dict(self.retries),
            "errors": self.errors[:],
        }

    async def _first_connect(self, client: Client) -> None:
        async with self.limiter:
            waiting = b"presence" if self.spec.wants_presence else b"welcome"
            # A first connection is retried only when the server said when (a 503): any other
            # failure is the figure the connect storm reports.
            await self._connect(client, client.target, waiting, retry=False)

    async def _connect(
        self, client: Client, target: tuple[str, int], waiting: bytes, retry: bool = True
    ) -> bool:
        """Connect (retrying as the CLI does) until ready; False after MAX_ATTEMPTS."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_SECONDS):
                    await self._open(client, target, waiting)
                    await client.ready.wait()
                if client.sock is None:  # ended before it was ready
                    raise ConnectionError(client.lost_reason)
                client.backoff.reset()
                return True
            except Refused as refused:
                reason, delay = f"http {refused.status}", client.backoff.next_delay()
                if refused.retry_after is not None:
                    delay = client.backoff.at_least(refused.retry_after)
            except (OSError, ConnectionError) as error:
                reason, delay = _reason(error), client.backoff.next_delay()
            except trio.TooSlowError:
                reason, delay = "timeout", client.backoff.next_delay()
            self._drop(client)
            if attempt == MAX_ATTEMPTS - 1 or not (retry or reason == "http 503"):
                self.failures[reason] += 1
                self._keep_error(f"client {client.cid}: {reason}")
                return False
            self.retries[reason] += 1
            await trio.sleep(delay)
        return False

    async def _open(self, client: Client, target: tuple[str, int], waiting: bytes) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(target)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, errno.errorcode.get(code, "connect failed"))
            await trio.lowlevel.wait_writable(sock)
            if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(code, errno.errorcode.get(code, "connect failed"))
            query = {"name": f"s{client.cid}"}
            client.wants_since = bool(client.last_id)
            if client.last_id:
                query["since"] = client.last_id
                if client.epoch:
                    query["epoch"] = client.epoch
            host, port = target
            sock.sendall(wire.upgrade_request(host, port, {}).replace(
                b"GET / ", b"GET /?" + urlencode(query).encode() + b" ", 1))  # fmt: skip
            rest = await _read_head(sock)
        except BaseException:
            sock.close()
            raise
        client.sock, client.closed, client.pending = sock, None, b""
        client.ready = trio.Event()
        client.events = set()
        client.waiting = b"recovered" if client.wants_since else waiting
        self.by_fd[sock.fileno()] = client
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        if rest:
            self._feed(client, rest)

    def _drop(self, client: Client) -> None:
        sock = client.sock
        if sock is None:
            return
        self.by_fd.pop(sock.fileno(), None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(sock.fileno())
        sock.close()
        client.sock = None

    # -- reading ---------------------------------------------------------------------------

    async def pump(self) -> None:
        epoll, by_fd = self.epoll, self.by_fd
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0, MAX_EVENTS):
                client = by_fd.get(fd)
                if client is None or client.sock is None:
                    continue
                try:
                    data = client.sock.recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._lost(client, f"error {errno.errorcode.get(exc.errno or 0, exc.errno)}")
                    continue
                if not data:
                    self._lost(client, f"close {client.closed}" if client.closed else "eof")
                    continue
                self._feed(client, data)
                if client.closed is not None and client.sock is not None:
                    self._lost(client, f"close {client.closed}")

    def _lost(self, client: Client, reason: str) -> None:
        """The server ended this connection: count why, and come back when storming."""
        was_ready = client.ready.is_set()
        self._drop(client)
        client.lost_reason = reason
        client.ready.set()  # a connecting task waiting on it sees the socket gone
        if not was_ready:
            return  # the connecting task retries
        self.closes[reason] += 1
        if self.reconnecting and self.nursery is not None:
            self.nursery.start_soon(self._reconnect, client, reason)

    async def _reconnect(self, client: Client, reason: str) -> None:
        if reason == "close 1012" and client.backoff.failures == 0:
            delay = client.backoff.soon()  # a draining gateway: another takes us at once
        else:
            delay = client.backoff.next_delay()
        await trio.sleep(delay)
        client.reconnects += 1
        targets = self.reconnect_to or [client.target]
        target = targets[(client.cid + client.reconnects) % len(targets)]
        async with self.limiter:
            await self._connect(client, target, b"welcome")

    def _feed(self, client: Client, data: bytes) -> None:
        buffer = client.pending + data if client.pending else data
        pos = 0
        while (frame := wire.next_frame(buffer, pos)) is not None:
            opcode, start, end = frame
            if opcode == wire.TEXT:
                self._text(client, buffer, start, end)
            elif opcode == wire.PING:
                with contextlib.suppress(OSError):
                    assert client.sock is not None
                    client.sock.send(wire.client_frame(wire.PONG, buffer[start:end]))
            elif opcode == wire.CLOSE:
                client.closed = (
                    int.from_bytes(buffer[start : start + 2], "big") if end > start else 1005
                )
            pos = end
        client.pending = buffer[pos:]
        if len(client.pending) > MAX_PENDING_BYTES:
            self._lost(client, "oversized frame")

    def _text(self, client: Client, buffer: bytes, start: int, end: int) -> None:
        if buffer.startswith(wire.MESSAGE_PREFIX, start):
            self._message(client, self._parsed(buffer[start:end]))
            return
        match = _TYPE.match(buffer[start : start + 40])
        kind = match.group(1) if match else b"?"
        self.events[kind.decode()] += 1
        if kind == b"message":  # the baseline's messages carry no id
            self._message(client, self._parsed(buffer[start:end]))
        elif kind == b"recovered":
            event = json.loads(buffer[start:end])
            if event.get("epoch"):
                client.epoch = event["epoch"]
            if client.wants_since:
                client.recovered, client.recovered_at = True, time.monotonic()
        client.events.add(kind)
        settled = kind != b"presence" or b"welcome" in client.events
        if kind == client.waiting and settled and not client.ready.is_set():
            client.ready_at = time.monotonic()
            client.ready.set()

    def _parsed(self, payload: bytes) -> dict[str, Any]:
        """Every client gets the same bytes for a message: parse them once (bounded cache)."""
        event = self.parsed.get(payload)
        if event is None:
            if len(self.parsed) >= PARSE_CACHE_ENTRIES:
                self.parsed.clear()
            event = self.parsed[payload] = json.loads(payload)
        return event

    def _message(self, client: Client, event: dict[str, Any]) -> None:
        text = str(event.get("text", ""))
        try:
            sender_text, seq_text = text.split(":")
            sender, seq = int(sender_text), int(seq_text)
            if not 0 <= sender < len(client.seen):
                raise ValueError(sender)
        except ValueError:
            self.foreign += 1
            for line in text.splitlines() or [text]:
                if HEADER_LINE.match(line):
                    self.header_lines += 1
                    if len(self.header_samples) < ERRORS_KEPT:
                        self.header_samples.append(line[:80])
            return
        self.messages += 1
        message_id = str(event.get("id", ""))
        if message_id:
            ms, _, n = message_id.partition("-")
            ordinal = (int(ms), int(n))
            if ordinal <= client.last_ordinal:
                self.order_violations += 1
                self._keep_sample(client, f"{message_id} after {client.last_id}")
            else:
                client.last_ordinal, client.last_id = ordinal, message_id
            if event.get("epoch"):
                client.epoch = str(event["epoch"])
        seen = client.seen[sender]
        if seq >> 3 >= len(seen):
            seen.extend(bytes((seq >> 3) + 64 - len(seen)))
        bit = 1 << (seq & 7)
        if seen[seq >> 3] & bit:
            self.duplicates += 1
            self._keep_sample(client, f"{text} again ({message_id})")
        else:
            seen[seq >> 3] |= bit

    def _keep_sample(self, client: Client, what: str) -> None:
        """Which client saw a duplicate or an id going back, and where it was in its life."""
        if len(self.samples) < ERRORS_KEPT:
            phase = "ready" if client.ready.is_set() else f"waiting for {client.waiting.decode()}"
            self.samples.append(
                f"client {client.cid}: {what}; reconnects {client.reconnects}, {phase}"
            )

    def _keep_error(self, text: str) -> None:
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(text)

    # -- reports ---------------------------------------------------------------------------

    def progress(self, since: float) -> dict[str, Any]:
        """How many clients are connected, and recovered after ``since`` (monotonic)."""
        return {
            "open": sum(1 for c in self.clients if c.sock is not None),
            "recovered": sum(1 for c in self.clients if c.recovered and c.recovered_at > since),
            "messages": self.messages,
        }

    def report(self, acked: list[list[int]], kill_at: float) -> dict[str, Any]:
        """Per client: every acknowledged ``(sender, seq)`` seen once; recovery times."""
        lost = 0
        clients_missing = 0
        for client in self.clients:
            missing = 0
            for sender, seqs in enumerate(acked):
                seen = client.seen[sender]
                for seq in seqs:
                    if seq >> 3 >= len(seen) or not seen[seq >> 3] & (1 << (seq & 7)):
                        missing += 1
            lost += missing
            clients_missing += bool(missing)
        return {
            "clients": len(self.clients),
            "open": sum(1 for c in self.clients if c.sock is not None),
            "lost": lost,
            "clients_missing": clients_missing,
            "duplicates": self.duplicates,
            "order_violations": self.order_violations,
            "samples": self.samples,
            "messages": self.messages,
            "foreign": self.foreign,
            "header_lines": self.header_lines,
            "header_samples": self.header_samples,
            "events": dict(self.events),
            "closes": dict(self.closes),
            "failures": dict(self.failures),
            "retries": dict(self.retries),
            "errors": self.errors[:],
            "reconnects": sum(c.reconnects for c in self.clients),
            "recovery_s": [
                c.recovered_at - kill_at
                for c in self.clients
                if c.recovered and kill_at and c.recovered_at > kill_at
            ],
        }

    # -- commands --------------------------------------------------------------------------

    async def serve_commands(self, conn: Connection) -> None:
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            try:
                name, *args = conn.recv()
            except EOFError:
                return
            if name == "connect":
                targets, concurrency = args
                new = [Client(cid, (h, p), self.spec.senders) for cid, h, p in targets]
                conn.send(await self.connect_all(new, concurrency))
            elif name == "storm":
                # From now on, clients whose connection ends come back through these targets.
                self.reconnect_to = [tuple(t) for t in args[0]]
                self.reconnecting = True
                self.limiter = trio.CapacityLimiter(args[1])
                conn.send({"ok": True, "now": time.monotonic()})
            elif name == "progress":
                conn.send(self.progress(*args))
            elif name == "report":
                conn.send(self.report(*args))
            elif name == "stop":
                self.reconnecting = False
                for client in self.clients:
                    self._drop(client)
                conn.send({"stopped": True})
                return
            else:
                conn.send({"error": f"unknown command {name!r}"})


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno:
        return errno.errorcode.get(error.errno, str(error.errno))
    return type(error).__name__ + (f": {error}" if str(error) else "")


async def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while True:
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > wire.MAX_HEAD_BYTES:
                raise ConnectionError("no end to the handshake answer")
            continue
        head = data[:end]
        if not head.startswith(b"HTTP/1.1 101"):
            status = head.split(b"\r\n", 1)[0].split(b" ", 2)
            retry = _RETRY_AFTER.search(head + b"\r\n")
            raise Refused(
                status[1].decode(errors="replace") if len(status) > 1 else "?",
                float(retry.group(1)) if retry else None,
            )
        return data[end + 4 :]


async def _run(spec: StormSpec, conn: Connection) -> None:
    worker = StormWorker(spec)
    async with trio.open_nursery() as nursery:
        worker.nursery = nursery
        nursery.start_soon(worker.pump)
        await worker.serve_commands(conn)
        nursery.cancel_scope.cancel()


def worker_main(spec: StormSpec, conn: Connection) -> None:
    """Entry point of a spawned storm worker."""
    raise_file_limit()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run, spec, conn)
