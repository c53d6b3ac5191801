"""What every client session shares, whatever its protocol: identity, outbox, publishing.

A session owns one nursery holding its writer and its reader. The fan-out reaches it only
through ``send`` (a push onto the bounded outbox); leaving is done in ``finally``, shielded and
bounded, so a cancelled or crashed connection still says goodbye to its channel. Every command
a client sends is charged to its budget (``budget.py``) before it is carried out.
"""

from __future__ import annotations

import logging
import time

import trio

from broadcast.api.idempotency import IdempotencyPending
from broadcast.bus.base import BusUnavailable
from broadcast.gateway.budget import ClientBudget, TooManyRequests
from broadcast.gateway.context import SessionContext
from broadcast.gateway.outbox import Outbox
from broadcast.gateway.replay import Replay
from broadcast.protocol.commands import Recovery
from broadcast.protocol.envelope import message_body, parse_id
from broadcast.protocol.errors import CloseCode, ErrorCode, ProtocolError
from broadcast.protocol.limits import OUTBOX_LIMIT_BYTES, RECOVERY_LIMIT
from broadcast.security import AuthCode, AuthError, Identity

log = logging.getLogger("broadcast.gateway.session")

# A replay is queued this much at a time, then waits until the socket took it: the outbox limit
# still catches a client that stops reading, and one that reads recovers any history there is.
REPLAY_WINDOW_BYTES = 256 * 1024
# Rounds of re-reading the history when live traffic outgrows what a replaying client may hold;
# past them the channel is faster than the client, which is then slow.
_REPLAY_ROUNDS = 4
# A session that ended on its own gets this long to flush its outbox to a client still reading.
FLUSH_TIMEOUT_SECONDS = 5.0
# A client found slow gets this long to take its last words (close 4008) before it is cut.
SLOW_CLOSE_SECONDS = 2.0
# Leaving (hub membership, the leave notice) happens while cancelled; bound it.
LEAVE_TIMEOUT_SECONDS = 2.0
RECEIVE_BYTES = 65536


class ClientSession:
    speaks_websocket = False

    def __init__(
        self, ctx: SessionContext, stream: trio.abc.Stream, number: int, budget: ClientBudget
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.number = number
        self.budget = budget
        self.origin = f"{ctx.node_id}/{number}"
        self.default_name = self.name = f"guest-{number}"
        self.channel = ctx.default_channel
        self.echo = False
        self.channel_asked = False
        """Whether the client named its channel (then being moved elsewhere is an error)."""
        self.announce = True
        """Whether others see this client: join/leave notices and presence (off for scripts)."""
        self.outbox = Outbox(
            OUTBOX_LIMIT_BYTES, stream, on_slow=self._found_slow, on_done=self._outbox_done
        )
        self.recovery: Recovery | None = None
        """What to replay on joining, as asked in the handshake."""
        self.identity: Identity | None = None
        """Who a verified token says this client is; None while authentication is off."""
        self.held: list[tuple[str | None, bytes]] | None = None
        """Live deliveries kept back while history is replayed, so the client sees one order."""
        self._held_bytes = 0
        self._held_dropped = False
        self._scope: trio.CancelScope | None = None
        self._joined = False
        self.last_heard = ctx.clock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.origin} {self.name}@{self.channel}>"

    def send(self, data: bytes) -> None:
        """Send to this client alone (a reply, an error): queued and flushed at once."""
        self.outbox.send(data)

    def _found_slow(self) -> bytes:
        """Over the outbox limit: the last words, then the end (bounded, if it never reads)."""
        log.warning(
            "%s is too slow (over %d bytes unsent): disconnecting", self, OUTBOX_LIMIT_BYTES
        )
        self.ctx.stats.slow_disconnects += 1
        if self._scope is not None:
            self._scope.deadline = min(
                self._scope.deadline, trio.current_time() + SLOW_CLOSE_SECONDS
            )
        return self.slow_notice()

    def _outbox_done(self) -> None:
        """Closed and flushed (or broken): nothing more to say, so the reader ends too."""
        if self.outbox.broken is not None:
            log.debug("%s: connection broken: %r", self, self.outbox.broken)
        if self._scope is not None:
            self._scope.cancel()

    # -- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the session to its end: greet, join, read until the client or gateway ends it."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self.outbox.attach(nursery)
                await self.start()
                if self.identity is not None:
                    nursery.start_soon(self._end_when_token_expires, self.identity)
                if self.recovery is not None:
                    self._charge_replay(self.recovery)
                resuming = self.recovery is not None and self.recovery.since is not None
                if self.name != self.default_name and not resuming:
                    # A client resuming (since=) is taken to be the one that had the name: its
                    # old entry may outlive a gateway that died, for up to a presence expiry.
                    await self._keep_name_unless_taken()
                await self.join(self.recovery, greeting=True)
                await self.read_until_done()
                self.outbox.close(self.goodbye())
                nursery.cancel_scope.deadline = trio.current_time() + FLUSH_TIMEOUT_SECONDS
        finally:
            self.outbox.attach(None)
            with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT_SECONDS):
                await self.leave()

    async def start(self) -> None:
        """Protocol-specific: what must be said before the session joins (the 101)."""

    def apply_identity(self, identity: Identity) -> None:
        """A verified token names the client and bounds where it may go."""
        self.identity = identity
        self.name = identity.name
        if not identity.allows(self.channel):
            asked, self.channel = self.channel, identity.pick_channel(self.ctx.default_channel)
            if self.channel_asked:
                self.refuse_later(
                    ProtocolError(
                        ErrorCode.CHANNEL_FORBIDDEN,
                        f"your token does not allow #{asked}; you are in #{self.channel}",
                    )
                )

    async def _end_when_token_expires(self, identity: Identity) -> None:
        verifier = self.ctx.access.verifier
        leeway = verifier.leeway if verifier is not None else 0.0
        await trio.sleep(identity.seconds_left(time.time(), leeway))
        self.ctx.stats.count_error(AuthCode.TOKEN_EXPIRED)
        self.outbox.close(
            self.unauthorized(AuthError(AuthCode.TOKEN_EXPIRED, "your token expired"))
        )

    def _check_identity(self, name: str | None, channel: str | None) -> None:
        if self.identity is None:
            return
        if name is not None and name != self.identity.name:
            raise ProtocolError(ErrorCode.BAD_NAME, "your name comes from your token")
        if channel is not None and not self.identity.allows(channel):
            raise ProtocolError(
                ErrorCode.CHANNEL_FORBIDDEN, f"your token does not allow #{channel}"
            )

    def shut_down(self, reason: str, retry_after: float = 0.0) -> None:
        """The gateway is draining: tell the client to go elsewhere (after ``retry_after``
        seconds, so a drain's clients do not all arrive elsewhere at once), then end."""
        self.outbox.close(self.drain_notice(f"{reason}; reconnect in {retry_after:.2f} s"))

    def disconnect(self, code: int, reason: str) -> None:
        """Close this client with ``code`` (an operator's disconnect, a client cut for abuse)."""
        self.outbox.close(self.close_notice(code, reason))

    # -- budgets ---------------------------------------------------------------------------

    def tell(self, error: ProtocolError) -> None:
        """Count a refusal and tell the client of it."""
        self.ctx.stats.count_error(error.code)
        self.send(self.error_bytes(error))

    def refuse(self, error: ProtocolError) -> None:
        """Tell the client its input was refused. Rate-limit refusals count as strikes; a
        client that keeps going after being told is cut (4029, ``too_many_errors``)."""
        self.ctx.stats.count_error(error.code)
        if error.code is not ErrorCode.RATE_LIMITED:
            try:
                self.budget.charge_command()
            except ProtocolError as limited:
                error = limited
            except TooManyRequests:
                self._cut()
                return
        self.send(self.error_bytes(error))

    def _cut(self) -> None:
        self.ctx.stats.count_error(ErrorCode.TOO_MANY_ERRORS)
        log.info("%s kept going over its limits after being told: disconnecting", self)
        self.disconnect(
            CloseCode.TOO_MANY_REQUESTS, "too_many_errors: you kept going after rate_limited"
        )

    def charge(
        self, *, message: bool = False, replay: Recovery | None = None, ref: str | None = None
    ) -> bool:
        """Charge one message, or one command (and a replay's size); False when refused (the
        client was told, or cut)."""
        try:
            if message:
                self.budget.charge_message()
            elif replay is not None:
                self.budget.charge_replay(_replay_size(replay))
            else:
                self.budget.charge_command()
        except ProtocolError as error:
            error.ref = ref
            self.tell(error)
            return False
        except TooManyRequests:
            self._cut()
            return False
        return True

    def _charge_replay(self, recovery: Recovery) -> None:
        """A replay costs by its size; over budget, the join goes on without it."""
        try:
            self.budget.charge_replay(_replay_size(recovery))
        except (ProtocolError, TooManyRequests):
            self.refuse_later(
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    "too many replays; reconnect later with since= to recover",
                    retry_after=1.0,
                )
            )
            self.recovery = None

    # -- channel membership ----------------------------------------------------------------

    async def join(self, recovery: Recovery | None = None, *, greeting: bool = False) -> None:
        """Subscribe, then greet, then replay, then go live: the client sees them in that order,
        and everything published after its greeting reaches it."""
        self.held = []
        await self.ctx.hub.add(self)
        self._joined = True
        if self.announce:
            await self.ctx.presence.enter(self.channel, self.origin, self.name)
        if greeting:
            self.greet()
        await self._release_held(recovery)
        self._announce("join")
        await self.joined()

    def hold(self, message_id: str | None, data: bytes) -> None:
        """Keep a live delivery back during a replay, bounded like the outbox. Past the bound
        the held messages are dropped and fetched again from the history after the replay."""
        assert self.held is not None
        self.held.append((message_id, data))
        self._held_bytes += len(data)
        if self._held_bytes > OUTBOX_LIMIT_BYTES:
            self.held.clear()
            self._held_bytes = 0
            self._held_dropped = True

    async def _release_held(self, recovery: Recovery | None) -> None:
        """Replay history if asked, then release what arrived live meanwhile, minus what was
        replayed. The caller started holding (``self.held = []``) before the subscription.

        The replay goes out a window at a time, each sent before the next is queued, so any
        history the server holds reaches a client that reads. Live messages that arrive
        meanwhile are held; if they outgrow the bound, they are read again from the history."""
        assert self.held is not None
        self._held_dropped = False
        asked = recovery is not None
        count, complete, epoch, reset = 0, True, "", False
        # The client has everything up to ``since``: a live message it already saw (one in
        # flight to this gateway while the client reconnected) must not come again.
        newest = parse_id(recovery.since) if recovery is not None and recovery.since else (-1, -1)
        rounds = 0
        while recovery is not None:
            try:
                replay = await self.ctx.replays.read(self.channel, recovery)
            except BusUnavailable:
                complete = False
                break
            if rounds == 0:
                complete, epoch, reset = replay.complete, replay.epoch, replay.reset
                if reset:  # the client's ids belong to another history: they say nothing here
                    newest = (-1, -1)
            rounds += 1
            count += replay.count
            if replay.count:
                newest = replay.newest
            await self._send_replay(replay)
            if not self._held_dropped:
                break
            if rounds >= _REPLAY_ROUNDS:
                self.outbox.overflow()  # the channel outruns this client: it is slow
                return
            # Live messages were dropped while replaying: they are in the history after
            # ``newest``; hold anew from now, and read on from there.
            self._held_dropped = False
            since = f"{newest[0]}-{newest[1]}" if newest != (-1, -1) else recovery.since
            recovery = Recovery(since, 0 if since else recovery.last, epoch or None)
        held, self.held, self._held_bytes = self.held, None, 0
        for message_id, data in held:
            if message_id is None or parse_id(message_id) > newest:
                self.outbox.push(data)
        self.outbox.flush()
        if asked:
            self.recovered(count, complete, epoch, reset)

    async def _send_replay(self, replay: Replay) -> None:
        """Queue the replay a window at a time, waiting for the socket between windows."""
        pieces = replay.frames() if self.speaks_websocket else replay.lines()
        queued = 0
        for data in pieces:
            self.outbox.push(data)
            queued += len(data)
            if queued >= REPLAY_WINDOW_BYTES:
                self.outbox.flush()
                await self.outbox.wait_for_room()
                queued = 0
        self.outbox.flush()

    async def leave(self) -> None:
        if not self._joined:
            return
        self._joined = False
        await self.ctx.hub.remove(self)
        if self.announce:
            await self.ctx.presence.leave(self.channel, self.origin)
        self._announce("leave")

    async def change_identity(
        self, name: str | None, channel: str | None, recovery: Recovery | None = None
    ) -> None:
        """A rename or a move reads as leaving and joining again, for everyone."""
        self._check_identity(name, channel)
        new_name, new_channel = name or self.name, channel or self.channel
        if (new_name, new_channel) != (self.name, self.channel) and await self._taken(
            new_name, new_channel
        ):
            raise ProtocolError(
                ErrorCode.NAME_TAKEN, f"someone in #{new_channel} is already called {new_name}"
            )
        if new_channel != self.channel:
            await self.leave()
            self.name, self.channel = new_name, new_channel
            await self.join(recovery)
            return
        if recovery is not None:
            self.held = []
            await self._release_held(recovery)
        if new_name != self.name:
            # Same channel: stay a member throughout, so no message is missed while renaming.
            self._announce("leave")
            self.name = new_name
            if self.announce:
                await self.ctx.presence.enter(self.channel, self.origin, self.name)
            self._announce("join")

    async def _taken(self, name: str, channel: str) -> bool:
        """Whether another client in ``channel`` goes by ``name``. Without tokens names are
        unique per channel, so nobody can pass for someone else; with tokens, one person may be
        there several times (tabs, devices) under the name their token gives."""
        if self.identity is not None or name.startswith("guest-"):
            return False
        if self._joined and (name, channel) == (self.name, self.channel):
            return False
        try:
            return await self.ctx.notices.contains(channel, name)
        except BusUnavailable:
            return False

    async def _keep_name_unless_taken(self) -> None:
        if await self._taken(self.name, self.channel):
            self.refuse_later(
                ProtocolError(
                    ErrorCode.NAME_TAKEN,
                    f"someone in #{self.channel} is already called {self.name}; "
                    f"you are {self.default_name}",
                )
            )
            self.name = self.default_name

    def _announce(self, kind: str) -> None:
        """Others learn of it in the channel's next ``presence_diff`` (presence_notices.py)."""
        if not self.announce:
            return
        notices = self.ctx.notices
        (notices.joined if kind == "join" else notices.left)(self.channel, self.name)

    async def publish(self, text: str, idempotency_key: str | None = None) -> str:
        """Publish through the bus; the id is Redis's. Raises ProtocolError when not accepted.
        The caller has charged the message to the budget. With ``idempotency_key``, a repeat
        within the window (on any gateway) publishes nothing and returns the first id."""
        body = message_body(self.channel, self.name, text, round(time.time(), 3), self.origin)
        publish_once = self.ctx.publish_once
        try:
            if idempotency_key is not None and publish_once is not None:
                scoped = self._idempotency_scope(idempotency_key)
                message_id = await publish_once(scoped, self.channel, body)
            else:
                message_id = await self.ctx.bus.publish_message(self.channel, body)
        except BusUnavailable as exc:
            self.ctx.stats.publish_failures += 1
            raise ProtocolError(
                ErrorCode.BUS_UNAVAILABLE, f"message not accepted, try again: {exc}"
            ) from None
        except IdempotencyPending:
            raise ProtocolError(
                ErrorCode.IDEMPOTENCY_PENDING,
                "a publish with this idempotency_key is still running; try again",
                retry_after=1.0,
            ) from None
        self.ctx.stats.messages_in += 1
        return message_id

    def _idempotency_scope(self, key: str) -> str:
        """The client's own key space, so no client can answer another's retries: its name (a
        token's ``sub``, or the name it chose, which is unique in a channel) and channel; a
        guest's is its connection (``guest-N`` is per gateway and per connection)."""
        if self.identity is None and self.name == self.default_name:
            return f"ws-guest:{self.origin}:{self.channel}:{key}"
        return f"ws:{self.name}:{self.channel}:{key}"

    async def who(self) -> list[str]:
        """Who is in this client's channel, on every gateway."""
        try:
            return await self.ctx.notices.members(self.channel)
        except BusUnavailable:
            raise ProtocolError(
                ErrorCode.BUS_UNAVAILABLE, "presence is unavailable, try again"
            ) from None

    # -- protocol-specific -----------------------------------------------------------------

    def check_alive(self, now: float) -> None:
        """Protocol-specific liveness, from the gateway's periodic sweep."""

    def greet(self) -> None:
        """The first thing a client gets, before any channel traffic."""

    async def joined(self) -> None:
        """Called once the client is in its channel (after any replay)."""

    def error_bytes(self, error: ProtocolError) -> bytes:
        """A refusal as this client reads it."""
        raise NotImplementedError

    def recovered(self, count: int, complete: bool, epoch: str, reset: bool) -> None:
        """Tell the client that the replay is over, whether anything was lost, and whether the
        history restarted (``reset``: its ids belong to another epoch)."""

    async def read_until_done(self) -> None:
        raise NotImplementedError

    def goodbye(self) -> bytes:
        """The last bytes for a client when the session ends normally."""
        return b""

    def refuse_later(self, error: ProtocolError) -> None:
        """An error found before the session started, told right after the greeting."""

    def unauthorized(self, error: AuthError) -> bytes:
        """The last bytes for a client whose token is refused or has expired."""
        return b""

    def slow_notice(self) -> bytes:
        """What a slow client is told, if its socket still takes it."""
        return b""

    def drain_notice(self, reason: str) -> bytes:
        """The last bytes for a client when the gateway drains."""
        return b""

    def close_notice(self, code: int, reason: str) -> bytes:
        """The last bytes for a client closed with ``code``."""
        return b""


def _replay_size(recovery: Recovery) -> int:
    """Messages a replay may send: the count asked for, or up to the recovery limit."""
    return recovery.last if recovery.since is None else RECOVERY_LIMIT
