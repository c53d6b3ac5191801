"""Small test clients that speak docs/protocol.md over real sockets, every wait bounded."""

from __future__ import annotations

import itertools
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

WAIT_SECONDS = 10  # generous: a busy 2-core CI machine; a correct run never waits this long


NOTICES = ("join", "leave", "presence", "presence_diff")


class WsClient:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._refs = itertools.count(1)
        self.welcome: dict[str, Any] = {}
        self.presence: list[str] = []
        self._stash: deque[dict[str, Any]] = deque()

    async def event(self) -> dict[str, Any]:
        if self._stash:
            return self._stash.popleft()
        with trio.fail_after(WAIT_SECONDS):
            return json.loads(await self.ws.get_message())

    async def expect(self, kind: str, *, skip: tuple[str, ...] = NOTICES) -> dict[str, Any]:
        """The next event of ``kind``, passing over notices; any other event fails the test."""
        while True:
            event = await self.event()
            if event["type"] == kind:
                return event
            assert event["type"] in skip, f"expected {kind}, got {event}"

    async def take(self, kind: str) -> dict[str, Any]:
        """The next event of ``kind``; others that come first are kept for later, in order."""
        passed = []
        while (event := await self.event())["type"] != kind:
            passed.append(event)
        self._stash.extendleft(reversed(passed))
        return event

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(obj))

    async def publish(self, text: str) -> str:
        """Publish and return the id from the ack (the sender never gets its own message)."""
        ref = f"r{next(self._refs)}"
        await self.send_json({"type": "publish", "text": text, "ref": ref})
        event = await self.take("ack")
        assert event["ref"] == ref, event
        return event["id"]

    async def messages(self, count: int) -> list[dict[str, Any]]:
        return [await self.expect("message") for _ in range(count)]


@asynccontextmanager
async def ws_client(
    url: str, ssl_context: ssl.SSLContext | None = None, **query: str
) -> AsyncIterator[WsClient]:
    full = url + ("?" + urlencode(query) if query else "")
    async with open_websocket_url(full, ssl_context) as ws:
        client = WsClient(ws)
        client.welcome = await client.expect("welcome")
        if not {"since", "history"} & query.keys():
            # The snapshot of who is here follows the welcome (after a replay, when one was asked).
            client.presence = (await client.take("presence"))["members"]
        yield client


class LineClient:
    """A raw TCP line client, like ``nc``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send_line(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        await self.stream.send_all(data + b"\n")

    async def line(self) -> str:
        with trio.fail_after(WAIT_SECONDS):
            while (end := self._buffer.find(b"\n")) < 0:
                data = await self.stream.receive_some(65536)
                assert data, "server closed the connection"
                self._buffer += data
        line = bytes(self._buffer[:end]).decode()
        del self._buffer[: end + 1]
        return line

    async def line_not_starting(self, *prefixes: str) -> str:
        while (line := await self.line()).startswith(prefixes):
            pass
        return line

    async def closed(self) -> bytes:
        """Everything up to EOF."""
        with trio.fail_after(WAIT_SECONDS):
            while data := await self.stream.receive_some(65536):
                self._buffer += data
        return bytes(self._buffer)


@asynccontextmanager
async def line_client(port: int) -> AsyncIterator[LineClient]:
    """Connected and greeted. An empty line (ignored by the server) skips the 300 ms sniff."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = LineClient(stream)
        await client.send_line(b"")
        assert (await client.line()).startswith("* welcome")
        yield client
