"""A small in-test WebSocket server speaking docs/protocol.md, for CLI tests.

It does what a gateway does for one node: it honours the handshake query (``name``, ``channel``,
``echo``, ``announce``, ``since``, ``history``), welcomes, keeps a capped history per channel and
replays it (ending with ``recovered``), announces joins and leaves, sends ``presence``, answers
``hello``, ``publish`` (an ``ack``, and the message to the others in the channel), ``who`` and
``ping``. It lets a
test do what a real gateway never would, or not on demand: send a crafted frame (an escape
sequence in a name), stop dead mid-connection and come back on the same port with its history,
close every connection with 1012 (draining) or 4010 (idle), replay sloppily (messages the
client already has) or report a loss. Real sockets on 127.0.0.1; nothing is mocked in the
client under test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from broadcast.protocol.commands import Recovery, parse_recovery
from broadcast.protocol.envelope import parse_id
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.limits import DEFAULT_CHANNEL, HISTORY_LENGTH
from broadcast.protocol.validate import check_channel, check_name


@dataclass
class FakeClient:
    number: int
    ws: WebSocketConnection
    name: str
    channel: str = DEFAULT_CHANNEL
    query: dict[str, str] = field(default_factory=dict)  # the handshake query, last value each
    headers: dict[str, str] = field(default_factory=dict)  # the handshake's headers, lower-case
    echo: bool = False
    announce: bool = True
    joined: bool = False  # in the channel: replay done, live messages reach it
    received: list[dict[str, Any]] = field(default_factory=list)  # commands from the client
    close_code: int | None = None  # the code of the client's close frame, once closed

    @property
    def published(self) -> list[str]:
        return [c["text"] for c in self.received if c.get("type") == "publish"]


class FakeGateway:
    """``async with trio.open_nursery() as n: await fake.start(n)``; ``fake.stop()``."""

    def __init__(self, node: str = "fake") -> None:
        self.node = node
        self.port = 0
        self.clients: list[FakeClient] = []
        self.history: dict[str, deque[dict[str, Any]]] = {}  # like Redis: survives stop/start
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.refuse_name: str | None = None  # an error code for every name a client asks for
        self.replay_overlap = 0  # replay this many messages at or before ``since`` as well
        self.history_lost = False  # every replay says ``complete: false``
        self.refuse_every = 0  # refuse every Nth publish as rate_limited (a hint in words only)
        self.epoch: str | None = None  # the history's epoch, when set: in messages and events
        self._publishes = 0

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

    async def close_all(self, code: int = 1012, reason: str = "draining") -> None:
        """Close every connection with ``code``: 1012 as a draining gateway, 4010 idle, …

        The listener stays open: as behind a load balancer, the clients find a gateway at once.
        """
        for client in self.in_channel(None):
            with contextlib.suppress(ConnectionClosed):
                await client.ws.aclose(code, reason)

    async def wait_until(self, condition: Callable[[], object], seconds: float = 15) -> None:
        with trio.fail_after(seconds):
            while not condition():
                await self._changed.wait()

    async def wait_joined(self, count: int = 1, channel: str | None = None) -> None:
        """Until ``count`` clients are in ``channel`` (any channel for None), replay done.

        A client is welcomed before it joins, as on the gateway: what is published between
        its welcome and its joining is not sent to it, so tests wait for this first.
        """
        await self.wait_until(lambda: len(self.in_channel(channel)) >= count)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def in_channel(self, channel: str | None) -> list[FakeClient]:
        """Connected clients that joined ``channel`` (any channel for None)."""
        return [
            c
            for c in self.clients
            if c.joined and c.close_code is None and channel in (None, c.channel)
        ]

    async def send_raw(self, client: FakeClient, text: str) -> None:
        await client.ws.send_message(text)

    async def broadcast(self, event: dict[str, Any], channel: str = DEFAULT_CHANNEL) -> None:
        """Send ``event`` (any dict, however hostile) to everyone in ``channel``; not stored."""
        await self._fan_out(json.dumps(event, separators=(",", ":")), channel)

    async def publish(
        self, sender: str, text: str, channel: str = DEFAULT_CHANNEL, *, origin: str = "fake/0"
    ) -> dict[str, Any]:
        """A message from someone not connected here: stored in the history, sent to all."""
        event = self._store(sender, text, channel, origin)
        await self._fan_out(json.dumps(event, separators=(",", ":")), channel)
        return event

    async def _fan_out(self, frame: str, channel: str, *, skip: FakeClient | None = None) -> None:
        for client in self.in_channel(channel):
            if client is not skip:
                with contextlib.suppress(ConnectionClosed):  # its handler records the close
                    await client.ws.send_message(frame)

    def _store(self, sender: str, text: str, channel: str, origin: str) -> dict[str, Any]:
        event = {
            "type": "message",
            "id": f"{int(time.time() * 1000)}-{next(self._ids)}",  # increasing, as (ms, seq)
            **({"epoch": self.epoch} if self.epoch else {}),
            "channel": channel,
            "sender": sender,
            "text": text,
            "ts": time.time(),
            "origin": origin,
        }
        self.history.setdefault(channel, deque(maxlen=HISTORY_LENGTH)).append(event)
        return event

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        number = next(self._numbers)
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        client = FakeClient(number, ws, name=f"guest-{number}", query=query, headers=headers)
        self.clients.append(client)
        self._notify()
        try:
            errors, recovery = self._apply_query(client)
            await self._welcome(client)
            for error in errors:
                await self._refuse(client, error)
            await self._join(client, recovery)
            self._notify()
            while True:
                command = json.loads(await ws.get_message())
                client.received.append(command)
                await self._answer(client, command)
                self._notify()
        except ConnectionClosed as exc:
            client.close_code = exc.reason.code if exc.reason else None
            if client.joined:
                await self._announce(client, "leave")
        finally:
            client.joined = False
            self._notify()

    def _apply_query(self, client: FakeClient) -> tuple[list[ProtocolError], Recovery | None]:
        """As the gateway does: a bad value gets an error and leaves the default in place."""
        query, errors, recovery = client.query, [], None
        try:
            if "name" in query:
                client.name = self._check_name(query["name"])
            if "channel" in query:
                client.channel = check_channel(query["channel"])
            history = query.get("history", "0")
            recovery = parse_recovery(query.get("since"), int(history) if history.isdigit() else -1)
        except ProtocolError as error:
            errors.append(error)
        client.echo = query.get("echo", "0") in ("1", "true")
        client.announce = query.get("announce", "1") not in ("0", "false")
        return errors, recovery

    def _check_name(self, name: str) -> str:
        if self.refuse_name:
            raise ProtocolError(self.refuse_name, "refused, as asked")  # type: ignore[arg-type]
        return check_name(name)

    async def _refuse(self, client: FakeClient, error: ProtocolError) -> None:
        event = {"type": "error", "code": str(error.code), "message": error.message}
        await client.ws.send_message(json.dumps(event))

    async def _join(self, client: FakeClient, recovery: Recovery | None) -> None:
        if recovery is not None:
            await self._replay(client, recovery)
        client.joined = True
        await self._announce(client, "join")
        await self._presence(client)

    async def _presence(self, client: FakeClient) -> None:
        members = sorted({c.name for c in self.in_channel(client.channel) if c.announce})
        event = {"type": "presence", "channel": client.channel, "members": members}
        await client.ws.send_message(json.dumps(event))

    async def _replay(self, client: FakeClient, recovery: Recovery) -> None:
        """What was asked for, oldest first, then ``recovered``; sloppy or lossy on demand."""
        stored = list(self.history.get(client.channel, ()))
        asked_epoch = client.query.get("epoch")
        reset = bool(self.epoch and recovery.since is not None and asked_epoch != self.epoch)
        if reset:  # the client's history is gone: this one, from its start
            messages = stored
        elif recovery.since is not None:
            since = parse_id(recovery.since)
            after = [m for m in stored if parse_id(m["id"]) > since]
            before = stored[: len(stored) - len(after)]
            overlap = before[len(before) - self.replay_overlap :] if self.replay_overlap else []
            messages = overlap + after
        else:
            messages = stored[len(stored) - recovery.last :] if recovery.last else []
        for message in messages:
            await client.ws.send_message(json.dumps(message, separators=(",", ":")))
        recovered = {
            "type": "recovered",
            "channel": client.channel,
            "count": len(messages),
            "complete": not self.history_lost,
            **({"epoch": self.epoch} if self.epoch else {}),
            **({"reset": True} if reset else {}),
        }
        await client.ws.send_message(json.dumps(recovered))

    async def _announce(self, client: FakeClient, kind: str) -> None:
        if not client.announce:
            return
        event = {
            "type": kind,
            "channel": client.channel,
            "name": client.name,
            "ts": time.time(),
            "origin": f"{self.node}/{client.number}",
        }
        await self._fan_out(json.dumps(event), client.channel, skip=client)

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
        if kind == "hello":
            try:
                name = command.get("name")
                client.name = self._check_name(name) if name else client.name
            except ProtocolError as error:
                await self._refuse(client, error)
                return
            client.channel = command.get("channel") or client.channel
            await self._welcome(client)
        elif kind == "ping":
            await client.ws.send_message('{"type":"pong"}')
        elif kind == "who":
            await self._presence(client)
        elif kind == "publish":
            self._publishes += 1
            if self.refuse_every and self._publishes % self.refuse_every == 0:
                refusal = {
                    "type": "error",
                    "code": "rate_limited",
                    "message": "too many messages; try again in 0.05 s",
                    "ref": command.get("ref"),
                }
                await client.ws.send_message(json.dumps(refusal))
                return
            origin = f"{self.node}/{client.number}"
            event = self._store(client.name, command["text"], client.channel, origin)
            await client.ws.send_message(
                json.dumps({"type": "ack", "ref": command.get("ref"), "id": event["id"]})
            )
            frame = json.dumps(event, separators=(",", ":"))
            await self._fan_out(frame, client.channel, skip=None if client.echo else client)
