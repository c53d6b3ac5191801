"""A small in-test WebSocket server speaking docs/protocol.md, for CLI tests.

It does what a gateway does for one node (welcome, hello, publish -> ack + message to the others
in the channel, ping -> pong) and lets a test do what a real gateway never would: send a crafted
frame (an escape sequence in a name), stop dead mid-connection and come back on the same port.
Real sockets on 127.0.0.1; nothing is mocked in the client under test.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket


@dataclass
class FakeClient:
    number: int
    ws: WebSocketConnection
    name: str
    channel: str = "general"
    received: list[dict[str, Any]] = field(default_factory=list)  # commands from the client
    close_code: int | None = None  # the code of the client's close frame, once closed

    @property
    def published(self) -> list[str]:
        return [c["text"] for c in self.received if c.get("type") == "publish"]


class FakeGateway:
    """``async with trio.open_nursery() as n: await fake.start(n)``; ``await fake.stop()``."""

    def __init__(self, node: str = "fake") -> None:
        self.node = node
        self.port = 0
        self.clients: list[FakeClient] = []
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.refuse_hello: str | None = None  # an error code to answer every hello with

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self, nursery: trio.Nursery, port: int | None = None) -> None:
        """Listen (on ``port``, or the one used before, or a free one) until ``stop``."""
        self.port = await nursery.start(self._serve, self.port if port is None else port)

    async def _serve(self, port: int, *, task_status: trio.TaskStatus[int]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", port, None)
                task_status.started(server.port)

    def stop(self) -> None:
        """Die like a killed process: listener and connections closed, no close frames."""
        assert self._scope is not None
        self._scope.cancel()

    async def wait_until(self, condition: Callable[[], object], seconds: float = 15) -> None:
        with trio.fail_after(seconds):
            while not condition():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def in_channel(self, channel: str) -> list[FakeClient]:
        return [c for c in self.clients if c.channel == channel and c.close_code is None]

    async def send_raw(self, client: FakeClient, text: str) -> None:
        await client.ws.send_message(text)

    async def broadcast(self, event: dict[str, Any], channel: str = "general") -> None:
        """Send ``event`` (any dict, however hostile) to everyone in ``channel``."""
        frame = json.dumps(event, separators=(",", ":"))
        for client in self.in_channel(channel):
            await client.ws.send_message(frame)

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        number = next(self._numbers)
        client = FakeClient(number, ws, name=f"guest-{number}")
        self.clients.append(client)
        self._notify()
        try:
            await self._welcome(client)
            while True:
                command = json.loads(await ws.get_message())
                client.received.append(command)
                await self._answer(client, command)
                self._notify()
        except ConnectionClosed as exc:
            client.close_code = exc.reason.code if exc.reason else None
        finally:
            self._notify()

    async def _welcome(self, client: FakeClient) -> None:
        await client.ws.send_message(
            json.dumps(
                {
                    "type": "welcome",
                    "protocol": 1,
                    "node": self.node,
                    "name": client.name,
                    "channel": client.channel,
                    "limits": {"text_bytes": 4096, "frame_bytes": 65536},
                }
            )
        )

    async def _answer(self, client: FakeClient, command: dict[str, Any]) -> None:
        kind = command.get("type")
        if kind == "hello" and self.refuse_hello:
            refusal = {"type": "error", "code": self.refuse_hello, "message": "refused, as asked"}
            await client.ws.send_message(json.dumps(refusal))
        elif kind == "hello":
            client.name = command.get("name") or client.name
            client.channel = command.get("channel") or client.channel
            await self._welcome(client)
        elif kind == "ping":
            await client.ws.send_message('{"type":"pong"}')
        elif kind == "publish":
            message_id = f"{int(time.time() * 1000)}-{next(self._ids)}"
            await client.ws.send_message(
                json.dumps({"type": "ack", "ref": command.get("ref"), "id": message_id})
            )
            event = {
                "type": "message",
                "id": message_id,
                "channel": client.channel,
                "sender": client.name,
                "text": command["text"],
                "ts": time.time(),
                "origin": f"{self.node}/{client.number}",
            }
            for other in self.in_channel(client.channel):
                if other is not client:
                    await other.ws.send_message(json.dumps(event))
