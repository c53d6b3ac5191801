"""A WebSocket client: wsproto parses what it sends; we encode what it gets (docs/protocol.md).

Incoming frames are parsed by wsproto, the sans-IO engine under trio-websocket. Outgoing frames
are encoded by ``protocol.websocket_frames`` so that one encoded message frame can be written to
every client of the channel.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qs, urlsplit

import trio
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)

from broadcast.bus.base import BusUnavailable
from broadcast.gateway.admission import WebSocketHandshake
from broadcast.gateway.budget import ClientBudget
from broadcast.gateway.context import SessionContext
from broadcast.gateway.session import RECEIVE_BYTES, ClientSession
from broadcast.protocol import commands
from broadcast.protocol.envelope import encode
from broadcast.protocol.errors import CloseCode, ErrorCode, ProtocolError
from broadcast.protocol.limits import MAX_FRAME_BYTES, MAX_TEXT_BYTES, PROTOCOL_VERSION
from broadcast.protocol.validate import check_channel, check_name
from broadcast.protocol.websocket_frames import (
    encode_close_frame,
    encode_ping_frame,
    encode_pong_frame,
    encode_text_frame,
)
from broadcast.security import AuthError

log = logging.getLogger("broadcast.gateway.websocket")
_SMALL_COUNT = re.compile(r"[0-9]{1,9}")


class WebSocketSession(ClientSession):
    speaks_websocket = True

    def __init__(
        self,
        ctx: SessionContext,
        stream: trio.abc.Stream,
        number: int,
        budget: ClientBudget,
        handshake: WebSocketHandshake,
    ) -> None:
        super().__init__(ctx, stream, number, budget)
        self._handshake: WebSocketHandshake | None = handshake
        self._ws: Connection | None = None
        self._query_errors: list[ProtocolError] = []
        self._apply_query(handshake.target)
        self._fragments: list[str] = []
        self._fragment_bytes = 0

    async def start(self) -> None:
        """Send the 101, then keep only wsproto's frame parser: the handshake's h11 objects
        are ~3.5 KiB per client."""
        handshake, self._handshake = self._handshake, None
        assert handshake is not None
        await self.stream.send_all(handshake.connection.send(AcceptConnection(extensions=[])))
        frames = handshake.connection.handshake.connection
        assert frames is not None  # accepting the request made it
        if handshake.trailing:
            frames.receive_data(handshake.trailing)
        self._ws = frames
        self.last_heard = self.ctx.clock()

    def _apply_query(self, resource: str) -> None:
        """``ws://host:port/?name=alice&channel=general`` names the client before it joins.

        Each value is checked on its own: a bad one is reported and left at its default.
        """
        query = {key: values[-1] for key, values in parse_qs(urlsplit(resource).query).items()}
        self.echo = query.get("echo", "0") in ("1", "true")
        self.announce = query.get("announce", "1") not in ("0", "false")
        try:
            if "name" in query:
                self.name = check_name(query["name"])
        except ProtocolError as error:
            self._query_errors.append(error)
        try:
            if "channel" in query:
                self.channel = check_channel(query["channel"])
                self.channel_asked = True
        except ProtocolError as error:
            self._query_errors.append(error)
        try:
            history = query.get("history", "0")
            # A few ASCII digits only: "²".isdigit() is true and int() refuses it, and int()
            # refuses 5,000 digits too.
            count = int(history) if _SMALL_COUNT.fullmatch(history) else -1
            self.recovery = commands.parse_recovery(query.get("since"), count, query.get("epoch"))
        except ProtocolError as error:
            self._query_errors.append(error)

    def send_event(self, event: dict[str, object]) -> None:
        self.send(encode_text_frame(encode(event).encode()))

    def _welcome(self) -> None:
        self.send_event(
            {
                "type": "welcome",
                "protocol": PROTOCOL_VERSION,
                "node": self.ctx.node_id,
                "origin": self.origin,
                "name": self.name,
                "channel": self.channel,
                "limits": {
                    "text_bytes": MAX_TEXT_BYTES,
                    "frame_bytes": MAX_FRAME_BYTES,
                    **self.ctx.access.rates.limits(),
                },
            }
        )

    def error_bytes(self, error: ProtocolError) -> bytes:
        event: dict[str, object] = {
            "type": "error",
            "code": str(error.code),
            "message": error.message,
        }
        if error.ref is not None:
            event["ref"] = error.ref
        if error.retry_after is not None:
            event["retry_after"] = error.retry_after
        return encode_text_frame(encode(event).encode())

    def greet(self) -> None:
        self._welcome()
        for error in self._query_errors:
            self.tell(error)

    def check_alive(self, now: float) -> None:
        """Ping a quiet client; close one that has said nothing, not even a pong, for too long.
        Called by the gateway's sweep, every third of the idle timeout."""
        if self._ws is None:
            return
        idle_timeout = self.ctx.idle_timeout
        quiet_for = now - self.last_heard
        if quiet_for >= idle_timeout:
            self.ctx.stats.count_error("idle_timeout")
            self.outbox.close(encode_close_frame(CloseCode.IDLE, "idle: no reply to ping"))
        elif quiet_for >= idle_timeout / 3:
            self.send(encode_ping_frame(b"keepalive"))

    def recovered(self, count: int, complete: bool, epoch: str, reset: bool) -> None:
        event: dict[str, object] = {
            "type": "recovered",
            "channel": self.channel,
            "count": count,
            "complete": complete,
        }
        if epoch:
            event["epoch"] = epoch
        if reset:
            event["reset"] = True
        self.send_event(event)

    async def read_until_done(self) -> None:
        if await self._handle_events():
            return
        assert self._ws is not None
        while True:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            self.last_heard = self.ctx.clock()
            self._ws.receive_data(bytes(data) if data else None)
            if await self._handle_events() or not data:
                return

    async def _handle_events(self) -> bool:
        """Act on what wsproto parsed; True once the connection is over."""
        assert self._ws is not None
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if self._collect(event):
                    return True
                if event.message_finished:
                    await self._handle_message(event)
            elif isinstance(event, Ping):
                if self.charge():
                    self.send(encode_pong_frame(event.payload))
            elif isinstance(event, CloseConnection):
                self.outbox.close(encode_close_frame(event.code))
                return True
        return False

    def _collect(self, event: TextMessage | BytesMessage) -> bool:
        """Gather a fragmented message; True when it grew past the frame limit (closes 1009)."""
        data = event.data
        # Bytes, not characters: four-byte emoji count four times.
        size = len(data) if isinstance(data, bytes | bytearray) else len(data.encode("utf-8"))
        self._fragment_bytes += size
        if self._fragment_bytes > MAX_FRAME_BYTES:
            self.ctx.stats.count_error("frame_too_large")
            self.outbox.close(
                encode_close_frame(CloseCode.MESSAGE_TOO_BIG, f"frame over {MAX_FRAME_BYTES} bytes")
            )
            return True
        if isinstance(event, TextMessage):
            self._fragments.append(event.data)
        return False

    async def _handle_message(self, event: TextMessage | BytesMessage) -> None:
        text = "".join(self._fragments)
        self._fragments.clear()
        self._fragment_bytes = 0
        if isinstance(event, BytesMessage):
            self.refuse(
                ProtocolError(
                    ErrorCode.BINARY_NOT_SUPPORTED, "send text frames (UTF-8 JSON or text)"
                )
            )
            return
        try:
            command = commands.parse_frame(text)
        except ProtocolError as error:
            self.refuse(error)
            return
        if not self._charge(command):
            return
        try:
            await self._run(command)
        except ProtocolError as error:
            if isinstance(command, commands.Publish):
                error.ref = command.ref
            self.refuse(error)

    def _charge(self, command: commands.Command) -> bool:
        if isinstance(command, commands.Publish):
            return self.charge(message=True, ref=command.ref)
        if isinstance(command, commands.Hello):
            return self.charge(replay=command.recovery)
        return self.charge()

    async def _run(self, command: commands.Command) -> None:
        if isinstance(command, commands.Publish):
            message_id = await self.publish(command.text, command.idempotency_key)
            ack: dict[str, object] = {"type": "ack", "id": message_id}
            if command.ref is not None:
                ack["ref"] = command.ref
            self.send_event(ack)
        elif isinstance(command, commands.Hello):
            self.echo = command.echo
            await self.change_identity(command.name, command.channel, command.recovery)
            self._welcome()
        elif isinstance(command, commands.Ping):
            self.send_event({"type": "pong"})
        elif isinstance(command, commands.Who):
            await self._send_presence()

    async def joined(self) -> None:
        try:
            await self._send_presence()
        except ProtocolError as error:
            self.refuse(error)

    async def _send_presence(self) -> None:
        try:
            event = await self.ctx.notices.presence_event(self.channel)
        except BusUnavailable:
            raise ProtocolError(
                ErrorCode.BUS_UNAVAILABLE, "presence is unavailable, try again"
            ) from None
        self.send(encode_text_frame(event))

    def goodbye(self) -> bytes:
        return encode_close_frame(CloseCode.NORMAL)

    def drain_notice(self, reason: str) -> bytes:
        return encode_close_frame(CloseCode.SERVICE_RESTART, reason)

    def refuse_later(self, error: ProtocolError) -> None:
        self._query_errors.append(error)

    def unauthorized(self, error: AuthError) -> bytes:
        return encode_close_frame(CloseCode.UNAUTHORIZED, f"{error.code}: {error.message}")

    def slow_notice(self) -> bytes:
        return encode_close_frame(CloseCode.SLOW, "slow: outgoing queue over its limit")

    def close_notice(self, code: int, reason: str) -> bytes:
        return encode_close_frame(code, reason)
