"""A small harness for the server API tests (no tests here): ServerApi served on a real socket
with a real bus (MemoryBus or RedisBus), a real ChannelHub and a real presence store, before
(and besides) the gateway that hosts it in production.

Rules as everywhere: 127.0.0.1 only, port 0, every wait bounded.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import trio

from broadcast.api import ApiKeys, ServerApi, serve_api_listener
from broadcast.api.idempotency import IdempotencyStore
from broadcast.api.limits import ApiRates
from broadcast.bus.base import Bus
from broadcast.bus.memory import MemoryBus
from broadcast.gateway.hub import ChannelHub
from broadcast.presence import MemoryPresence
from broadcast.presence.base import PresenceStore

T = TypeVar("T")
KEY = "test-key-0123456789abcdef"
WAIT_SECONDS = 10


@dataclass
class TestHost:
    """The ApiHost protocol with real parts; ``sessions`` stands in for connected clients."""

    __test__ = False
    node_id: str
    bus: Bus
    presence: PresenceStore
    hub: ChannelHub = field(init=False)
    sessions: dict[str, int] = field(default_factory=dict)
    closed: list[tuple[str, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hub = ChannelHub(self.bus)

    def connection_count(self) -> int:
        return sum(self.sessions.values())

    def disconnect_local(self, name: str, code: int, reason: str) -> int:
        self.closed.append((name, code, reason))
        return self.sessions.pop(name, 0)


@dataclass
class Served:
    port: int
    host: TestHost
    api: ServerApi

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def serve_api(
    *,
    bus: Bus | None = None,
    presence: PresenceStore | None = None,
    keys: tuple[str, ...] = (KEY,),
    idempotency: IdempotencyStore | None = None,
    node_id: str = "api-test",
    rates: ApiRates | None = None,
) -> AsyncIterator[Served]:
    host = TestHost(node_id, bus or MemoryBus(), presence or MemoryPresence())
    api = ServerApi(host, ApiKeys(keys), idempotency=idempotency, rates=rates)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.bus.run, host.hub.deliver)
        await nursery.start(host.presence.run)
        await nursery.start(api.run)
        port = await nursery.start(serve_api_listener, api, "127.0.0.1", 0)
        if api.enabled:
            with trio.fail_after(WAIT_SECONDS):
                await api.cluster.subscribed.wait()
        yield Served(port, host, api)
        nursery.cancel_scope.cancel()


@contextmanager
def in_thread(context: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Enter ``context()`` in a trio run of its own thread, for as long as the ``with`` lasts:
    servers for sync clients, asyncio and schemathesis."""
    started: queue.Queue[tuple[T, trio.CancelScope, trio.lowlevel.TrioToken] | BaseException]
    started = queue.Queue()

    async def main() -> None:
        try:
            with trio.CancelScope() as scope:
                async with context() as value:
                    started.put((value, scope, trio.lowlevel.current_trio_token()))
                    await trio.sleep_forever()
        except BaseException as exc:
            started.put(exc)
            raise

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    item = started.get(timeout=WAIT_SECONDS)
    if isinstance(item, BaseException):
        raise item
    value, scope, token = item
    try:
        yield value
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(WAIT_SECONDS)


def serve_api_in_thread(**options: Any) -> AbstractContextManager[Served]:
    return in_thread(lambda: serve_api(**options))


@asynccontextmanager
async def lossy_proxy(target: int, *, lose: int) -> AsyncIterator[int]:
    """A TCP proxy to ``target`` that loses the answers to the first ``lose`` requests: the
    server did the work, the client sees the connection drop (a timeout, a reset)."""
    remaining = [lose]

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", target) as server:
            async with trio.open_nursery() as nursery:

                async def forward() -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while data := await client.receive_some(65536):
                            await server.send_all(data)

                nursery.start_soon(forward)
                answer = b""
                while data := await server.receive_some(65536):
                    answer += data
                nursery.cancel_scope.cancel()
            if remaining[0] > 0:
                remaining[0] -= 1
                return
            await client.send_all(answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return self.json()["error"]["code"]


def request_bytes(
    method: str,
    target: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    raw = b""
    if body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        head += ["Content-Type: application/json", f"Content-Length: {len(raw)}"]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


async def call(port: int, data: bytes) -> Answer:
    """Send raw request bytes, read the whole answer (the server closes the connection)."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
    return parse_answer(received)


def parse_answer(received: bytes) -> Answer:
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers[b"content-length"]) == len(body)
    return Answer(int(status_line.split()[1]), headers, body)


async def api(port: int, method: str, target: str, body: Any = None, **options: Any) -> Answer:
    return await call(port, request_bytes(method, target, body, **options))
