"""A plain TCP client speaking lines (``nc``): one line in is one message (docs/protocol.md).

A line client cannot answer pings, so silence is its only sign of life: after the line idle
timeout it is asked to send a line, and closed if it stays silent. Its first line must not be an
HTTP request line: a client that turns out to speak HTTP after being greeted (a handshake that
came very late) is refused rather than having its headers read as chat.
"""

from __future__ import annotations

import trio

from broadcast.gateway.budget import ClientBudget
from broadcast.gateway.context import SessionContext
from broadcast.gateway.session import RECEIVE_BYTES, ClientSession
from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.lines import (
    JoinChannel,
    LineSplitter,
    Quit,
    SayText,
    SetName,
    Who,
    parse_line,
    render_error,
    render_notice,
)
from broadcast.protocol.sniff import is_request_line
from broadcast.protocol.validate import check_channel, check_name, check_text
from broadcast.security import AuthError

# Names in a line client's /who answer at most (one line, under the line limit).
_WHO_NAMES_SHOWN = 100
# Of the line idle timeout, the part after which a silent client is asked to say something.
_NUDGE_FRACTION = 3 / 4


class LineSession(ClientSession):
    def __init__(
        self,
        ctx: SessionContext,
        stream: trio.abc.Stream,
        number: int,
        budget: ClientBudget,
        initial: bytes,
    ) -> None:
        super().__init__(ctx, stream, number, budget)
        self._initial = initial
        self._splitter = LineSplitter()
        self._first_line = True
        self._nudged_at: float | None = None

    def _welcome(self) -> bytes:
        return render_notice(
            f"welcome to broadcast on {self.ctx.node_id}: you are {self.name} in "
            f"#{self.channel} (/name NAME, /join CHANNEL, /who, /quit)"
        )

    def unauthorized(self, error: AuthError) -> bytes:
        return f"! {error.code}: {error.message}\n".encode()

    def greet(self) -> None:
        self.send(self._welcome())

    def error_bytes(self, error: ProtocolError) -> bytes:
        return render_error(error)

    def check_alive(self, now: float) -> None:
        """Ask a silent client to speak; close it if it stays silent."""
        timeout = self.ctx.line_idle_timeout
        grace = timeout * (1 - _NUDGE_FRACTION)
        if self._nudged_at is not None:
            if now - self._nudged_at >= grace:
                self.ctx.stats.count_error("idle_timeout")
                self.outbox.close(render_notice("idle: nothing heard from you; bye"))
        elif now - self.last_heard >= timeout * _NUDGE_FRACTION:
            self._nudged_at = now
            self.send(render_notice(f"still there? send any line (Enter) within {grace:.0f} s"))

    async def read_until_done(self) -> None:
        data, self._initial = self._initial, b""
        while True:
            for item in self._splitter.feed(data):
                if isinstance(item, ProtocolError):
                    self.refuse(item)
                elif await self._handle_line(item) is Quit:
                    return
            data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
            if not data:
                return
            self.last_heard = self.ctx.clock()
            self._nudged_at = None

    async def _handle_line(self, line: str) -> type[Quit] | None:
        if self._first_line and line.strip():
            self._first_line = False
            if is_request_line(line.encode("utf-8")):
                self.refuse(
                    ProtocolError(
                        ErrorCode.BAD_COMMAND,
                        "this connection was taken for a line client; HTTP and WebSocket "
                        "clients must send their request at once",
                    )
                )
                return Quit
        try:
            command = parse_line(line)
        except ProtocolError as error:
            self.refuse(error)
            return None
        if command is None:
            return None
        if not self.charge(message=isinstance(command, SayText)):
            return None
        try:
            if isinstance(command, SayText):
                await self.publish(check_text(command.text))
            elif isinstance(command, SetName):
                await self.change_identity(check_name(command.name), None)
                self.send(render_notice(f"you are now {self.name}"))
            elif isinstance(command, JoinChannel):
                await self.change_identity(None, check_channel(command.channel))
                self.send(render_notice(f"you are now in #{self.channel}"))
            elif isinstance(command, Who):
                members = await self.who()
                shown = ", ".join(members[:_WHO_NAMES_SHOWN])
                if len(members) > _WHO_NAMES_SHOWN:
                    shown += f" and {len(members) - _WHO_NAMES_SHOWN} more"
                self.send(render_notice(f"here in #{self.channel}: {shown}"))
            elif isinstance(command, Quit):
                return Quit
        except ProtocolError as error:
            self.refuse(error)
        return None

    def goodbye(self) -> bytes:
        return render_notice("bye")

    def drain_notice(self, reason: str) -> bytes:
        return render_notice(reason)

    def slow_notice(self) -> bytes:
        return b"! slow: you did not read fast enough and were disconnected\n"

    def close_notice(self, code: int, reason: str) -> bytes:
        return f"! {reason}\n".encode()
