"""RedisPresence: who is where, for the whole cluster, in one sorted set per channel.

Each gateway writes its own clients' entries with an expiry time (``scripts.py`` has the data
model) and rewrites them all every ``refresh_interval``, which keeps them alive and heals
presence after a Redis restart or an outage. A gateway that dies stops refreshing: its entries
expire after ``ttl`` and the next sweep of a surviving gateway (every ``refresh_interval``)
removes them and reports each one, exactly once in the cluster, to ``on_expired``. So a killed
gateway's clients drop out within ``ttl + refresh_interval``.

One connection serves the refresh loop and the calls, one at a time under a lock: presence is a
few commands per client join or leave, not a hot path. Every call is bounded by
``command_timeout``, waiting for its turn included. ``enter`` and ``leave`` never raise: while
Redis is unreachable they only update the local entries, which the next refresh writes.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from broadcast.presence.base import OnExpired
from broadcast.presence.entries import LocalEntries, Update
from broadcast.presence.scripts import (
    MEMBERS,
    SCRIPTS,
    UPDATE,
    decode_member,
    encode_member,
    presence_key,
)
from broadcast.redis.cluster import SCHEME as CLUSTER_SCHEME
from broadcast.redis.errors import Unavailable
from broadcast.redis.resp import (
    Arg,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RedisReplyError,
    RedisTimeout,
)
from broadcast.redis.scripts import Script, is_read_only, load_scripts, run_scripts
from broadcast.redis.supervise import Connected, keep_connected
from broadcast.redis.topology import Topology, topology_for

log = logging.getLogger("broadcast.presence.redis")

# A channel's set expires this many TTLs after its last write. Every write renews it and no
# entry lives longer than one TTL past a write, so a live entry never loses its set, while the
# set of a channel whose gateways all died vanishes by itself.
KEY_EXPIRY_TTLS = 2
# After ``members(channel)`` this store sweeps ``channel`` for this many TTLs even without an
# entry there, so a gateway that only shows the list still sees the dead leave it promptly.
WATCH_TTLS = 4
# Script calls per pipelined write in a refresh: each write and its replies stay a few hundred
# KB even when a gateway's clients are spread over thousands of channels.
REFRESH_BATCH = 1000

Command = tuple[Script, str, Sequence[Arg]]  # script, channel, arguments


@dataclass(eq=False)
class _PendingWrite:
    command: Command
    done: trio.Event = field(default_factory=trio.Event)
    reply: Any = None
    error: RedisError | None = None


class RedisPresence:
    """The PresenceStore of base.py on Redis; see the module docstring for the design."""

    def __init__(
        self,
        url: str,
        *,
        on_expired: OnExpired,
        ttl: float = 15.0,
        refresh_interval: float = 5.0,
        command_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not 0 < refresh_interval < ttl:
            raise ValueError("refresh_interval must be positive and shorter than ttl")
        if command_timeout <= 0:
            raise ValueError("command_timeout must be positive")
        self._topology = self._make_topology(url, command_timeout, ssl_context)
        self.name = self._topology.name
        """The redacted URL, for logs: the password never appears."""
        self._on_expired = on_expired
        self._ttl = ttl
        self._refresh_interval = refresh_interval
        self._command_timeout = command_timeout
        self._key_expiry_ms = math.ceil(KEY_EXPIRY_TTLS * ttl * 1000)
        self._entries = LocalEntries(watch_seconds=WATCH_TTLS * ttl)
        self._connection: RedisConnection | None = None
        self._lock = trio.Lock()  # one command (or pipeline) on the connection at a time
        self._pending_writes: list[_PendingWrite] = []
        self._flushing = False
        self._lost = trio.Event()  # set by a call that lost the connection: reconnect now
        self._lost_reason = ""
        self._running = False

        self.reconnects = 0
        """Connections re-established after a loss; for metrics."""
        self.refreshes = 0
        """Refresh-and-sweep rounds completed; for metrics (and tests that wait for rounds)."""
        self.expired = 0
        """Entries of other gateways this store swept and reported to ``on_expired``."""

    def __new__(cls, url: str, **options: Any) -> Any:
        """``RedisPresence("redis+cluster://…")`` makes a ClusterPresence, with the same
        interface (redis_cluster_presence.py)."""
        if cls is RedisPresence and url.startswith(CLUSTER_SCHEME + "://"):
            from broadcast.presence.redis_cluster_presence import ClusterPresence

            return ClusterPresence(url, **options)
        return super().__new__(cls)

    def _make_topology(self, url: str, command_timeout: float, ssl_context: Any) -> Topology:
        return topology_for(url, command_timeout=command_timeout, ssl_context=ssl_context)

    @property
    def ready(self) -> bool:
        """True while connected to Redis (``members`` can answer)."""
        return self._connection is not None

    # -- the PresenceStore protocol --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reports started after the first connection attempt, successful or not."""
        if self._running:
            raise RuntimeError("this RedisPresence is already running")
        self._running = True
        started = False

        def tried() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        def reconnected() -> None:
            self.reconnects += 1

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._topology.run)
                await keep_connected(
                    "presence",
                    self._topology.describe,
                    self._session,
                    log=log,
                    tried=tried,
                    reconnected=reconnected,
                    wake=lambda: self._topology.moved,
                )
        finally:
            self._running = False

    async def enter(self, channel: str, key: str, name: str) -> None:
        replaced = self._entries.enter(channel, key, name)
        removals = [replaced] if replaced is not None else []
        written = await self._write(channel, removals, [encode_member(key, name)], "enter")
        if not written and replaced is not None:
            self._entries.owe_removal(channel, replaced)

    async def leave(self, channel: str, key: str) -> None:
        member = self._entries.leave(channel, key)
        if member is None:
            await trio.lowlevel.checkpoint()
            return
        if not await self._write(channel, [member], [], "leave"):
            self._entries.owe_removal(channel, member)

    async def members(self, channel: str) -> list[str]:
        self._entries.watch(channel, trio.current_time())
        try:
            (reply,) = await self._call([(MEMBERS, channel, ())])
        except RedisError as exc:
            raise Unavailable(f"presence unavailable: {exc}") from None
        if isinstance(reply, RedisReplyError):
            raise Unavailable(f"redis refused the presence query ({reply.code})")
        return sorted({decode_member(member)[1] for member in reply})

    async def channels(self) -> dict[str, int]:
        try:
            channels = await self._scan_channels()
            replies = await self._call([(MEMBERS, channel, ()) for channel in channels])
        except RedisError as exc:
            raise Unavailable(f"presence unavailable: {exc}") from None
        counts = {}
        for channel, reply in zip(channels, replies, strict=True):
            if isinstance(reply, RedisReplyError):
                raise Unavailable(f"redis refused the presence query ({reply.code})")
            if names := {decode_member(member)[1] for member in reply}:
                counts[channel] = len(names)
        return counts

    async def _scan_channels(self) -> list[str]:
        """Every channel with a presence set, by SCAN (never blocks Redis as KEYS would), within
        ``command_timeout``; each SCAN runs under the lock, shielded as in ``_call``."""
        found: set[str] = set()
        cursor: bytes | int = 0
        with trio.move_on_after(self._command_timeout):
            while True:
                async with self._lock:
                    connection = self._connection
                    if connection is None:
                        raise RedisConnectionError(f"{self.name}: not connected")
                    with trio.CancelScope(shield=True):
                        try:
                            cursor, keys = await connection.execute(
                                "SCAN", cursor, "MATCH", presence_key("*"), "COUNT", 1000
                            )
                        except RedisError as exc:
                            if connection.closed:
                                self._lose(connection, str(exc))
                            raise
                found.update(key.decode()[len(presence_key("")) :] for key in keys)
                if int(cursor) == 0:
                    return sorted(found)
        raise RedisTimeout(f"{self.name}: presence channels not listed within the timeout")

    # -- calls -----------------------------------------------------------------------------

    def _update(
        self, channel: str, removals: list[str], additions: list[str], *, sweep: bool
    ) -> Command:
        arguments = (
            self._ttl,
            self._key_expiry_ms,
            "1" if sweep else "0",
            len(removals),
            *removals,
            *additions,
        )
        return UPDATE, channel, arguments

    async def _write(
        self, channel: str, removals: list[str], additions: list[str], what: str
    ) -> bool:
        """One update now; False (logged at debug) if Redis did not take it.

        Writes that arrive while one is on its way go together in the next round trip (a
        group commit): a storm of joins costs a few pipelined round trips, not one each in
        turn behind the connection's lock."""
        pending = _PendingWrite(self._update(channel, removals, additions, sweep=False))
        self._pending_writes.append(pending)
        if self._flushing:
            await pending.done.wait()
        else:
            await self._flush_writes()
        if pending.error is not None:
            log.debug(
                "presence %s in %s left for the next refresh: %s", what, channel, pending.error
            )
            return False
        reply = pending.reply
        if isinstance(reply, RedisReplyError):
            log.debug("redis refused a presence %s in %s: %s", what, channel, reply)
            return False
        return True

    async def _flush_writes(self) -> None:
        """Send every pending write, in batches, until none is left. Shielded: the writers
        waiting on this batch must not hang because the task that carries it was cancelled
        (each round trip is bounded by ``command_timeout``)."""
        self._flushing = True
        try:
            with trio.CancelScope(shield=True):
                while self._pending_writes:
                    batch, self._pending_writes = self._pending_writes, []
                    try:
                        replies = await self._call([write.command for write in batch])
                    except RedisError as exc:
                        for write in batch:
                            write.error = exc
                    else:
                        for write, reply in zip(batch, replies, strict=True):
                            write.reply = reply
                    for write in batch:
                        write.done.set()
        finally:
            self._flushing = False

    async def _call(self, commands: list[Command]) -> list[Any]:
        """Run ``commands`` on the shared connection within ``command_timeout``, the wait for the
        lock included. The round trip is shielded from the caller's cancellation (a client that
        leaves as it joins): a command cut in half would cost every caller the connection."""
        if self._connection is None:  # fail fast while Redis is unreachable
            await trio.lowlevel.checkpoint()
            raise RedisConnectionError(f"{self.name}: not connected")
        deadline = trio.current_time() + self._command_timeout
        with trio.move_on_at(deadline):
            async with self._lock:
                connection = self._connection
                if connection is None:
                    raise RedisConnectionError(f"{self.name}: not connected")
                with trio.CancelScope(deadline=deadline, shield=True):
                    try:
                        replies = await self._run_scripts(connection, commands)
                    except RedisError as exc:
                        if connection.closed:
                            self._lose(connection, str(exc))
                        raise
                    if any(map(is_read_only, replies)):  # a demoted primary: find the new one
                        self._lose(connection, "redis is a read-only replica now")
                    return replies
                # Our deadline struck mid round trip; resp closed the connection.
                self._lose(connection, f"no answer within {self._command_timeout} s")
                raise RedisTimeout(f"{self.name}: no answer within {self._command_timeout} s")
        raise RedisTimeout(f"{self.name}: connection busy for {self._command_timeout} s")

    def _lose(self, connection: RedisConnection, reason: str) -> None:
        """A call found ``connection`` broken: fail later calls fast and have the loop reconnect."""
        if self._connection is connection:
            self._connection = None
            self._lost_reason = reason
            self._lost.set()

    @staticmethod
    async def _run_scripts(connection: RedisConnection, commands: Sequence[Command]) -> list[Any]:
        """EVALSHA each command in one pipelined write (EVAL for what Redis forgot)."""
        return await run_scripts(
            connection,
            [(script, (1, presence_key(channel), *args)) for script, channel, args in commands],
        )

    # -- the loop --------------------------------------------------------------------------

    async def _session(self, connected: Connected) -> None:
        """Connect, load the scripts, then refresh and sweep every ``refresh_interval`` (the
        first round at once: that is the healing) until the connection fails."""
        connection = await self._topology.connect("broadcast-presence")
        try:
            await load_scripts(connection, SCRIPTS)
            lost = self._lost = trio.Event()
            self._connection = connection
            connected(f", refreshing {len(self._entries)} entries")
            next_round = trio.current_time()
            while True:
                await self._refresh(connection)
                next_round = max(next_round + self._refresh_interval, trio.current_time())
                with trio.move_on_at(next_round):
                    await lost.wait()
                if lost.is_set():
                    raise RedisConnectionError(self._lost_reason)
        finally:
            if self._connection is connection:
                self._connection = None
            await connection.aclose()

    async def _refresh(self, connection: RedisConnection) -> None:
        """Rewrite every local entry, retry owed removals and sweep, in pipelined batches under
        the lock (so no call interleaves with a stale snapshot); then report what expired."""
        replies: list[Any] = []
        async with self._lock:
            updates = self._entries.refresh_plan(trio.current_time())
            for start in range(0, len(updates), REFRESH_BATCH):
                batch = updates[start : start + REFRESH_BATCH]
                commands = [
                    self._update(u.channel, u.removals, u.additions, sweep=True) for u in batch
                ]
                replies += await self._run_scripts(connection, commands)
            self._entries.removals_done(
                update
                for update, reply in zip(updates, replies, strict=True)
                if not isinstance(reply, RedisReplyError)
            )
        self.refreshes += 1
        reported = 0
        for update, reply in zip(updates, replies, strict=True):
            if isinstance(reply, RedisReplyError):
                log.warning("redis refused the presence refresh of %s: %s", update.channel, reply)
                continue
            for member in reply:
                reported += self._report_expired(update, member)
        if reported:
            log.info("presence: %d entries of other gateways expired", reported)

    def _report_expired(self, update: Update, member: bytes) -> int:
        """Hand one swept entry to ``on_expired``, unless it is ours; returns 1 if reported."""
        key, name = decode_member(member)
        if self._entries.knows(update.channel, key, name):
            return 0  # ours, rewritten by the same script before the sweep: cannot happen
        self.expired += 1
        try:
            self._on_expired(update.channel, key, name)
        except Exception:  # one failing callback must not stop the notices for the others
            log.exception("on_expired failed for %s in %s", key, update.channel)
        return 1
