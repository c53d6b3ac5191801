"""A plain TCP client speaking lines (``nc``): one line in is one message (docs/protocol.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from broadcast.gateway.session import RECEIVE_BYTES, ClientSession
from broadcast.protocol.envelope import decode
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.lines import (
    JoinChannel,
    LineSplitter,
    Quit,
    SayText,
    SetName,
    Who,
    parse_line,
    render_error,
    render_event,
    render_notice,
)
from broadcast.protocol.validate import check_channel, check_name, check_text
from broadcast.security import AuthError, parse_auth_line

if TYPE_CHECKING:
    from broadcast.gateway.server import Gateway


class LineSession(ClientSession):
    def __init__(
        self, gateway: Gateway, stream: trio.abc.Stream, number: int, initial: bytes
    ) -> None:
        super().__init__(gateway, stream, number)
        self._initial = initial
        self._splitter = LineSplitter()

    def _welcome(self) -> bytes:
        return render_notice(
            f"welcome to broadcast on {self.gateway.node_id}: you are {self.name} in "
            f"#{self.channel} (/name NAME, /join CHANNEL, /who, /quit)"
        )

    async def authenticate(self) -> bool:
        """With tokens required, the first line must be ``/auth TOKEN``."""
        verifier = self.gateway.access.verifier
        if verifier is None:
            return True
        line = await self._first_line()
        try:
            self.apply_identity(verifier.verify(parse_auth_line(line or "")))
        except AuthError as error:
            self.gateway.stats.count_error(error.code)
            await self.stream.send_all(self.unauthorized(error))
            return False
        return True

    async def _first_line(self) -> str | None:
        """The first non-empty line, within the handshake timeout; None if none came."""
        data, self._initial = self._initial, b""
        with trio.move_on_after(self.gateway.handshake_timeout):
            while True:
                for item in self._splitter.feed(data):
                    if isinstance(item, str) and item.strip():
                        return item
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return None
        return None

    def unauthorized(self, error: AuthError) -> bytes:
        return f"! {error.code}: {error.message}\n".encode()

    def greet(self) -> None:
        self.send(self._welcome())

    def render_payload(self, payload: bytes) -> bytes:
        return render_event(decode(payload)) or b""

    async def read_until_done(self) -> None:
        data = self._initial
        while True:
            for item in self._splitter.feed(data):
                if isinstance(item, ProtocolError):
                    self._refuse(item)
                elif await self._handle_line(item) is Quit:
                    return
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                return

    async def _handle_line(self, line: str) -> type[Quit] | None:
        try:
            command = parse_line(line)
            if isinstance(command, SayText):
                await self.publish(check_text(command.text))
            elif isinstance(command, SetName):
                await self.change_identity(check_name(command.name), None)
                self.send(render_notice(f"you are now {self.name}"))
            elif isinstance(command, JoinChannel):
                await self.change_identity(None, check_channel(command.channel))
                self.send(render_notice(f"you are now in #{self.channel}"))
            elif isinstance(command, Who):
                members = ", ".join(await self.who())
                self.send(render_notice(f"here in #{self.channel}: {members}"))
            elif isinstance(command, Quit):
                return Quit
        except ProtocolError as error:
            self._refuse(error)
        return None

    def _refuse(self, error: ProtocolError) -> None:
        self.gateway.stats.count_error(error.code)
        self.send(render_error(error))

    def goodbye(self) -> bytes:
        return render_notice("bye")

    def drain_notice(self, reason: str) -> bytes:
        return render_notice(f"{reason}; please reconnect")

    def slow_notice(self) -> bytes:
        return b"! slow: you did not read fast enough and were disconnected\n"
