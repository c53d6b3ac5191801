"""RedisSubscriber: the bus's SUBSCRIBE connection, and gapless delivery across its reconnects.

One task reads the connection and hands each socket read to ``deliver`` as one batch. Delivery
of messages is exactly once and in id order across reconnects (continuity.py): the last
delivered id (and epoch) of each channel is remembered; after a reconnect and resubscribe, what
was missed is read from the history and delivered before the live payloads that arrived
meanwhile (held, bounded), duplicates dropped by id within an epoch. Where the history cannot
vouch for everything missed, a gap notice is delivered in its place:

- the stream was trimmed (length or age) past the last delivered id, or more than
  RECOVERY_LIMIT messages were missed;
- Redis restarted without its data (or the stream was deleted): the stream is gone or new, and
  messages accepted just before the loss that this gateway never received cannot be told from
  "nothing was published", so the answer is "some messages may have been lost";
- the channel's epoch changed (docs/reliability.md, "Epochs"): the new epoch's history is then
  delivered from its start, whatever its ids look like;
- the history could not be read within REFILL_GIVE_UP_SECONDS.

A stream that merely expired (no message for ``history_max_age``, while this gateway listened
until recently) is not a gap: nothing it missed could have been in it. Join/leave notices have
no id and stay at-most-once. A channel subscribed while Redis was unreachable has no starting
id until its first message, so it cannot be refilled before then.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from broadcast.bus.base import BusUnavailable, DeliverBatch, Delivery
from broadcast.bus.continuity import Continuity, Fill
from broadcast.bus.keys import STANDALONE, Keys
from broadcast.bus.redis_history import StreamRead
from broadcast.bus.redis_publisher import RedisPublisher
from broadcast.protocol.ids import MessageId
from broadcast.protocol.limits import RECOVERY_LIMIT
from broadcast.redis.cluster import key_slot
from broadcast.redis.resp import (
    RedisConnection,
    RedisError,
    RedisReplyError,
    RedisTimeout,
    encode_command,
)
from broadcast.redis.supervise import BACKOFF_CAP, BACKOFF_START, Connected, Status
from broadcast.redis.topology import Topology

log = logging.getLogger("broadcast.bus.redis")

# A subscriber read of 256 KiB lets a burst arrive as a few large batches (fan-out cost is per
# batch, see the research), while still being a small, fixed amount of memory.
SUBSCRIBER_RECEIVE_SIZE = 262144
# An idle connection is PINGed this often, and declared dead after this many silent intervals:
# quiet enough to cost nothing, quick enough that a wedged Redis shows in readiness within ~15 s.
PING_INTERVAL = 5.0
DEAD_AFTER_INTERVALS = 3
# Channels per SUBSCRIBE when resubscribing: keeps each command a few tens of KB.
SUBSCRIBE_CHUNK = 1000
# Channels whose history is read at once after a reconnect: enough to pipeline the reads of a
# gateway's channels into a few round trips, few enough that the answers (up to RECOVERY_LIMIT
# messages each) stay a few MB.
REFILL_CONCURRENCY = 16
# History reads per channel per reconnect: one normally; another when the channel's held live
# payloads outgrew their budget and the first read did not reach them. Past that, a gap notice.
REFILL_ROUNDS = 3
# How long a refill waits for the history (the publisher may still be reconnecting after the same
# outage: its backoff is at most BACKOFF_CAP, a connection attempt at most the command timeout).
# Past it the channel gets a gap notice and goes live, rather than stalling.
REFILL_GIVE_UP_SECONDS = 20.0


class _Tasks:
    """The tasks serving one connection: the first failure ends them all and is the reason."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.reason: str | None = None

    def start(self, function: Callable[..., Awaitable[None]], *args: Any) -> None:
        self._nursery.start_soon(self._run, function, *args)

    async def _run(self, function: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await function(*args)
        except RedisError as exc:
            self.lose(str(exc))

    def lose(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._nursery.cancel_scope.cancel()


class RedisSubscriber:
    """The subscriptions of one bus on one connection; ``status.up`` while they all work."""

    def __init__(
        self,
        topology: Topology,
        publisher: RedisPublisher,
        *,
        command_timeout: float,
        ping_interval: float,
        on_change: Callable[[], None] | None = None,
        keys: Keys = STANDALONE,
        on_dropped: Callable[[str], None] | None = None,
    ) -> None:
        self._topology = topology
        self._publisher = publisher
        self._keys = keys
        # Redis Cluster: sharded pub/sub, one channel per command (a SSUBSCRIBE of several
        # channels must keep to one slot); a SUNSUBSCRIBE Redis sends on its own (the slot
        # moved to another shard) is reported to ``on_dropped``.
        self._subscribe_verb, self._unsubscribe_verb = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if keys.sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        self._message_kind = b"smessage" if keys.sharded else b"message"
        self._confirm_kind = b"ssubscribe" if keys.sharded else b"subscribe"
        self._on_dropped = on_dropped
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        self.status = Status(on_change)
        self.deliver: DeliverBatch | None = None
        self.nursery: trio.Nursery | None = None  # the bus's, for baseline reads
        self._subscriptions: dict[bytes, str] = {}  # Redis channel name -> our channel
        self._confirmations: dict[bytes, trio.Event] = {}  # SUBSCRIBEs awaiting Redis's reply
        self._connection: RedisConnection | None = None
        self._lock = trio.StrictFIFOLock()  # one writer at a time on that connection
        self._last_received = 0.0
        self._heard_until: float | None = None  # the last sign of life of a lost subscription
        self.continuity = Continuity()

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._subscriptions.values())

    # -- what the bus asks -----------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed, or at once while disconnected: the channel is then
        subscribed by the next connection, before ``status.up`` turns True again.

        The stream's newest id is read meanwhile, in the background, as a baseline: a reconnect
        refills the channel from it even if no message was delivered yet (unknown while Redis
        is unreachable). Not awaited here, because the gateway adds its member once this
        returns: what arrives between the confirmation and that would reach nobody."""
        key = self._keys.channel(channel).encode()
        if key not in self._subscriptions and self.nursery is not None:
            self.nursery.start_soon(self._track_baseline, key, channel)
        async with self._lock:
            self._subscriptions[key] = channel
            connection = self._connection
            if connection is None:
                return
            confirmed = self._confirmation(key)
            try:
                await self._send_shielded(connection, encode_command((self._subscribe_verb, key)))
            except RedisError:
                return  # that connection is lost; its successor subscribes the channel
        with trio.move_on_after(self._command_timeout):
            await confirmed.wait()
            return
        log.warning("redis did not confirm SUBSCRIBE %s in time; reconnecting", channel)
        await connection.aclose()

    async def _track_baseline(self, key: bytes, channel: str) -> None:
        tip = await self._publisher.stream_tip(channel)
        if tip is not None and self._subscriptions.get(key) == channel:  # still subscribed
            # Ignored if a message was delivered already: its id is the better starting point.
            self.continuity.track(channel, *tip)

    async def unsubscribe(self, channel: str) -> None:
        """Stops delivery at once (payloads still in flight are dropped here); Redis is told
        without waiting for its reply."""
        key = self._keys.channel(channel).encode()
        async with self._lock:
            self.continuity.forget(channel)
            if self._subscriptions.pop(key, None) is None or self._connection is None:
                return
            # A lost connection needs nothing: its successor will not subscribe the channel.
            with contextlib.suppress(RedisError):
                command = encode_command((self._unsubscribe_verb, key))
                await self._send_shielded(self._connection, command)

    @staticmethod
    async def _send_shielded(connection: RedisConnection, command: bytes) -> None:
        """A caller cancelled mid-write (a client leaving as it joins) would close the shared
        connection, so the write finishes anyway; it is bounded by the command timeout."""
        with trio.CancelScope(shield=True):
            await connection.send(command)

    def _confirmation(self, key: bytes) -> trio.Event:
        event = self._confirmations.get(key)
        if event is None:
            event = self._confirmations[key] = trio.Event()
        return event

    # -- the connection --------------------------------------------------------------------

    async def session(self, connected: Connected) -> None:
        connection = await self._topology.connect("broadcast-subscriber")
        self._last_received = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                tasks = _Tasks(nursery)
                tasks.start(self._read, connection)
                tasks.start(self._keep_alive, connection)
                tasks.start(self._resubscribe, connection, connected)
            if tasks.reason is not None:
                raise RedisError(tasks.reason)
        finally:
            self.continuity.abandon()
            was_up = self.status.up
            if was_up:
                self._heard_until = self._last_received
            self._connection = None
            self.status.set(False)
            for event in self._confirmations.values():
                event.set()  # subscribe() callers return; the next connection resubscribes
            self._confirmations.clear()
            await connection.aclose()
            if was_up:
                self._publisher.check_soon()  # Redis may be gone altogether

    async def _resubscribe(self, connection: RedisConnection, connected: Connected) -> None:
        """Subscribe every channel, then refill what was missed, before turning up."""
        async with self._lock:
            self._connection = connection
            keys = list(self._subscriptions)
            # From here on, live payloads of channels with a known last id are held.
            fills = self.continuity.begin(self._subscriptions[key] for key in keys)
            confirmations = [self._confirmation(key) for key in keys]
            if self._keys.sharded:
                commands = [encode_command((self._subscribe_verb, key)) for key in keys]
            else:
                commands = [
                    encode_command(("SUBSCRIBE", *keys[start : start + SUBSCRIBE_CHUNK]))
                    for start in range(0, len(keys), SUBSCRIBE_CHUNK)
                ]
            for start in range(0, len(commands), SUBSCRIBE_CHUNK):
                await connection.send(b"".join(commands[start : start + SUBSCRIBE_CHUNK]))
        confirmed_all = False
        with trio.move_on_after(self._command_timeout):
            for confirmed in confirmations:
                await confirmed.wait()
            confirmed_all = True
        if not confirmed_all:
            raise RedisTimeout(f"redis did not confirm {len(keys)} subscriptions in time")
        # Subscribed: whatever the history reads miss from now on arrives live (and is held).
        gaps, refilled = self.continuity.gaps, self.continuity.refilled
        outage = math.inf
        if self._heard_until is not None:
            outage = trio.current_time() - self._heard_until
        if fills:
            limiter = trio.Semaphore(REFILL_CONCURRENCY)
            async with trio.open_nursery() as nursery:
                for fill in fills:
                    nursery.start_soon(self._refill, fill, limiter, outage)
        self.status.set(True)
        detail = f", resubscribed {len(keys)} channels"
        if fills:
            refilled = self.continuity.refilled - refilled
            detail += f", refilled {refilled} missed messages"
            if self.continuity.gaps > gaps:
                detail += f", {self.continuity.gaps - gaps} channels with a gap"
        connected(detail)

    async def _refill(self, fill: Fill, limiter: trio.Semaphore, outage: float) -> None:
        """Deliver what one channel missed (continuity.py); ``outage``: seconds since the
        previous connection last heard from Redis."""
        assert self.deliver is not None
        max_age_ms = self._publisher.max_age_ms
        async with limiter:
            for round_number in range(1, REFILL_ROUNDS + 1):
                epoch = None if fill.epoch is None else fill.epoch.decode()
                read = await self._read_missed(fill, epoch)
                reset = False
                if read is None:
                    messages, gap = [], True
                elif read.reset:
                    # Another epoch: the stream this gateway followed is gone, and with it
                    # whatever it held that this gateway had not received yet.
                    messages, gap, reset = read.messages(RECOVERY_LIMIT), True, True
                else:
                    messages = read.messages(RECOVERY_LIMIT)
                    gap = not read.complete(fill.after, RECOVERY_LIMIT) and not (
                        outage * 1000 < max_age_ms
                        and not read.cut(RECOVERY_LIMIT)
                        and read.lost_only_to_expiry(fill.after, max_age_ms)
                    )
                batch, done = self.continuity.finish(
                    fill,
                    messages,
                    gap=gap,
                    final=round_number == REFILL_ROUNDS,
                    reset=reset,
                    epoch=None if read is None else read.epoch.encode() or None,
                )
                if gap:
                    log.warning(
                        "channel %s: messages missed while reconnecting may be lost", fill.channel
                    )
                if batch:
                    self.deliver(batch)
                if done:
                    return

    async def _read_missed(self, fill: Fill, epoch: str | None) -> StreamRead | None:
        """Read the history after ``fill.after``, waiting for the publisher (it may be
        reconnecting after the same outage) and retrying while the fill is still wanted; None
        after REFILL_GIVE_UP_SECONDS."""
        channel = fill.channel
        delay = BACKOFF_START
        with trio.move_on_after(REFILL_GIVE_UP_SECONDS):
            while self.continuity.filling_with(fill):
                await self._publisher.status.wait()
                try:
                    return await self._publisher.read_stream(
                        channel, fill.after, RECOVERY_LIMIT + 1, epoch
                    )
                except BusUnavailable as exc:
                    log.info("channel %s: cannot read its history yet (%s)", channel, exc)
                await trio.sleep(delay)
                delay = min(BACKOFF_CAP, delay * 2)
            return None  # unsubscribed, or the connection was lost: nothing to deliver
        log.warning("channel %s: history unreadable for %.0f s", channel, REFILL_GIVE_UP_SECONDS)
        return None

    async def _read(self, connection: RedisConnection) -> None:
        """Each socket read becomes at most one ``deliver`` call, in Redis's order."""
        subscriptions = self._subscriptions
        confirmations = self._confirmations
        admit = self.continuity.admit
        deliver = self.deliver
        message_kind, confirm_kind = self._message_kind, self._confirm_kind
        assert deliver is not None
        while True:
            replies = await connection.receive_replies(SUBSCRIBER_RECEIVE_SIZE)
            self._last_received = trio.current_time()
            batch: list[Delivery] = []
            for reply in replies:
                if isinstance(reply, RedisReplyError):
                    if reply.code == "MOVED" and self._keys.sharded:
                        self._moved(reply)  # a SSUBSCRIBE sent to a shard that lost the slot
                        continue
                    raise reply
                if type(reply) is not list:
                    continue  # +PONG outside subscribed mode (no channels)
                kind = reply[0]
                if kind == message_kind:
                    channel = subscriptions.get(reply[1])
                    # Else unsubscribed meanwhile: drop it. admit() drops duplicates and holds
                    # the payloads of channels being refilled.
                    if channel is not None and admit(channel, reply[2]):
                        batch.append(Delivery(channel, reply[2]))
                elif kind == confirm_kind:
                    confirmed = confirmations.pop(reply[1], None)
                    if confirmed is not None:
                        confirmed.set()
                elif kind == b"sunsubscribe" and reply[1] in subscriptions:
                    # Not asked for (unsubscribe() forgets the channel first): its slot moved.
                    self._dropped(reply[1])
            if batch:
                deliver(batch)

    def _moved(self, reply: RedisReplyError) -> None:
        slot = int(str(reply).split()[1])
        for key in [key for key in self._subscriptions if key_slot(key) == slot]:
            confirmed = self._confirmations.pop(key, None)
            if confirmed is not None:
                confirmed.set()
            self._dropped(key)

    def _dropped(self, key: bytes) -> None:
        channel = self._subscriptions.pop(key)
        log.info("redis dropped the subscription of %s (its slot moved)", channel)
        if self._on_dropped is not None:
            self._on_dropped(channel)

    async def adopt(self, channel: str, last: MessageId | None, epoch: bytes | None) -> None:
        """Take over ``channel`` from another subscriber (its slot moved to this shard), which
        delivered up to ``last`` of ``epoch``: subscribe, then deliver what the history holds
        after it, as after a reconnect (a gap notice where it cannot vouch)."""
        if last is not None:
            self.continuity.track(channel, last, epoch)
        fill = self.continuity.begin_one(channel)
        await self.subscribe(channel)
        if fill is not None and self.nursery is not None:
            # In the background: a shard that turns out not to own the channel (MOVED) must
            # not hold up the bus, which moves the channel again meanwhile.
            self.nursery.start_soon(self._refill, fill, trio.Semaphore(1), 0.0)

    async def _keep_alive(self, connection: RedisConnection) -> None:
        """PING when idle; silence for DEAD_AFTER_INTERVALS intervals means a dead connection
        (a wedged Redis, a dropped network path) that would otherwise look merely quiet."""
        ping = encode_command(("PING",))
        interval = self._ping_interval
        last_ping = trio.current_time()
        while True:
            await trio.sleep_until(max(self._last_received, last_ping) + interval)
            silence = trio.current_time() - self._last_received
            if silence < interval:
                continue
            if silence >= interval * DEAD_AFTER_INTERVALS:
                raise RedisTimeout(f"no data from redis for {silence:.1f} s")
            async with self._lock:
                await connection.send(ping)
            last_ping = trio.current_time()
