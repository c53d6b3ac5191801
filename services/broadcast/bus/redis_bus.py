"""RedisBus: the cluster bus, on two raw RESP connections, one to publish and one to subscribe.

Every message goes through one Lua script that appends it to the channel's capped stream and
publishes it with the stream id, so ids increase per channel and their order is the order every
gateway delivers (docs/protocol.md, "Redis"). Callers hand publishes to one publisher task that
pipelines whatever is queued into one write; one subscriber task reads the SUBSCRIBE connection
and hands each socket read to ``deliver`` as one batch.

Startup: ``run()`` reports started once both connections have made their first attempt. With
Redis up, ``ready`` is then True; with Redis down it is False, publishes fail fast with
BusUnavailable, and both connections keep retrying in the background (``wait_ready`` waits).

History reads (``history``) are one Lua script (redis_history.py) sent through the publisher's
queue, so they share its connection, pipelining and timeouts.

Delivery of messages is exactly once and in id order across subscriber reconnects
(continuity.py): the last delivered id of each channel is remembered; after a reconnect and
resubscribe, what was missed is read from the history and delivered before the live payloads
that arrived meanwhile (held, bounded), duplicates dropped by id. Where the history cannot vouch
for everything missed, a gap notice is delivered in its place:

- the stream was trimmed (length or age) past the last delivered id, or more than
  RECOVERY_LIMIT messages were missed;
- Redis restarted without its data (or the stream was deleted): the stream is gone or new, and
  messages accepted just before the loss that this gateway never received cannot be told from
  "nothing was published", so the answer is "some messages may have been lost";
- the history could not be read within REFILL_GIVE_UP_SECONDS.

A stream that merely expired (no message for ``history_max_age``, while this gateway listened
until recently) is not a gap: nothing it missed could have been in it. Join/leave notices have
no id and stay at-most-once. A channel subscribed while Redis was unreachable has no starting
id until its first message, so it cannot be refilled before then.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from broadcast.bus.base import BusUnavailable, DeliverBatch, Delivery, History
from broadcast.bus.continuity import Continuity, Fill
from broadcast.bus.ids import ZERO_ID, MessageId, format_id, parse_message_id
from broadcast.bus.redis_history import (
    HISTORY_SCRIPT,
    HISTORY_SCRIPT_SHA,
    StreamRead,
    entry_payloads,
    history_args,
)
from broadcast.bus.resp import (
    RedisConnection,
    RedisError,
    RedisReplyError,
    RedisTimeout,
    encode_bulk_strings,
    encode_command,
    open_connection,
    parse_url,
)
from broadcast.protocol.limits import HISTORY_LENGTH, HISTORY_MAX_AGE_SECONDS, RECOVERY_LIMIT

log = logging.getLogger("broadcast.bus.redis")

CHANNEL_PREFIX = "broadcast:channel:"
HISTORY_PREFIX = "broadcast:history:"

# XADD then PUBLISH in one script, so nothing can come between the id and its publication. The
# concatenation must equal envelope.message_payload byte for byte. Argument layout as in
# docs/protocol.md: KEYS[1] stream, ARGV[1] pub/sub channel, ARGV[2] cap, ARGV[3] max age in ms,
# ARGV[4] body (last, so everything before it is a cached prefix).
# The age trim (whole nodes only, like the length cap) and the expiry, which makes a stream
# nobody writes to vanish once its last message is as old as the history keeps, run for the
# first message of each millisecond (sequence 0). Its id's ms is then exactly Redis's clock (a
# stream id is max(now, last) ms), so no TIME call is needed, and the rest of that millisecond
# would only repeat both: a busy channel pays ~0.4 µs of Redis CPU per message for them instead
# of ~2.4 (benchmarks/redis_roundtrip.py). A clock stepping back pauses them until it catches up.
PUBLISH_SCRIPT = """\
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[4])
if string.sub(id, -2) == '-0' then
  local age = tonumber(ARGV[3])
  local oldest = tonumber(string.sub(id, 1, -3)) - age
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', oldest))
  redis.call('PEXPIRE', KEYS[1], age)
end
redis.call('PUBLISH', ARGV[1], '{"type":"message","id":"' .. id .. '",' .. ARGV[4])
return id
"""
PUBLISH_SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

# Publishes waiting for the publisher task: two full batches. Past that, callers wait (within
# their timeout) instead of memory growing: the queue is the bus's backpressure.
QUEUE_SIZE = 1024
# Requests per pipelined write. 512 typical messages are ~100 KB, a few socket buffers; bigger
# batches only make the first caller in them wait longer.
BATCH_LIMIT = 512
# A subscriber read of 256 KiB lets a burst arrive as a few large batches (fan-out cost is per
# batch, see the research), while still being a small, fixed amount of memory.
SUBSCRIBER_RECEIVE_SIZE = 262144
# An idle connection is PINGed this often, and declared dead after this many silent intervals:
# quiet enough to cost nothing, quick enough that a wedged Redis shows in readiness within ~15 s.
PING_INTERVAL = 5.0
DEAD_AFTER_INTERVALS = 3
# Reconnect delays: full jitter over an exponential range, so a restarted Redis is not hit by
# every gateway at once, and a Redis that is down costs one attempt per ~5 s per connection.
BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
# A connection that stayed up this long resets the backoff; shorter lives count as flapping.
STABLE_AFTER = 5.0
# Channels per SUBSCRIBE when resubscribing: keeps each command a few tens of KB.
SUBSCRIBE_CHUNK = 1000
# Encoded EVALSHA prefixes kept per channel; cleared past this so channel churn cannot grow it.
PREFIX_CACHE_LIMIT = 4096
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

_CHECK = object()
"""Queued to make the publisher PING its connection now (the subscriber saw Redis go away)."""


class _Request:
    """One command (a publish, a history read) handed to the publisher task, and its outcome."""

    __slots__ = ("abandoned", "body", "channel", "command", "done", "error", "fallback", "result")

    def __init__(
        self,
        command: bytes,
        channel: str | None = None,
        body: bytes = b"",
        fallback: bytes | None = None,
    ) -> None:
        self.command = command
        self.channel = channel  # set for messages: a NOSCRIPT reply re-sends them with EVAL
        self.body = body
        self.fallback = fallback  # another script's EVAL form, sent after a NOSCRIPT reply
        self.done = trio.Event()
        self.result: Any = None
        self.error: str | None = None
        self.abandoned = False  # the caller gave up: do not send it

    def succeed(self, result: Any) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    def fail(self, reason: str) -> None:
        if not self.done.is_set():
            self.error = reason
            self.done.set()


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


class RedisBus:
    """The Bus of base.py on Redis; see the module docstring for the design."""

    def __init__(
        self,
        url: str,
        *,
        history_length: int = HISTORY_LENGTH,
        history_max_age: float = HISTORY_MAX_AGE_SECONDS,
        command_timeout: float = 5.0,
        ping_interval: float = PING_INTERVAL,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if history_length < 1:
            raise ValueError("history_length must be at least 1")
        if history_max_age <= 0:
            raise ValueError("history_max_age must be positive")
        self._address = parse_url(url)
        self.name = self._address.redacted()
        self._history_length = history_length
        self._max_age_ms = max(1, round(history_max_age * 1000))
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        self._ssl_context = ssl_context

        self.reconnects = 0
        """Connections (publisher or subscriber) re-established after a loss; for metrics."""

        self._requests_send, self._requests = trio.open_memory_channel[Any](QUEUE_SIZE)
        self._prefixes: dict[str, bytes] = {}
        self._publisher_up = False
        self._subscriber_up = False
        self._state_changed = trio.Event()
        self._running = False
        self._nursery: trio.Nursery | None = None  # run()'s, for baseline reads

        self._deliver: DeliverBatch | None = None
        self._subscriptions: dict[bytes, str] = {}  # Redis channel name -> our channel
        self._confirmations: dict[bytes, trio.Event] = {}  # SUBSCRIBEs awaiting Redis's reply
        self._subscriber: RedisConnection | None = None
        self._subscriber_lock = trio.StrictFIFOLock()  # one writer at a time on that connection
        self._last_received = 0.0
        self._heard_until: float | None = None  # the last sign of life of a lost subscription
        self._continuity = Continuity()

    # -- the Bus protocol ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._publisher_up and self._subscriber_up

    @property
    def channels(self) -> frozenset[str]:
        """The channels this bus subscribes to (and resubscribes after a reconnect)."""
        return frozenset(self._subscriptions.values())

    async def run(
        self,
        deliver: DeliverBatch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._running:
            raise RuntimeError("this RedisBus is already running")
        self._running = True
        self._deliver = deliver
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                publisher_tried, subscriber_tried = trio.Event(), trio.Event()
                nursery.start_soon(
                    self._keep_connected, "publisher", self._publisher_session, publisher_tried
                )
                nursery.start_soon(
                    self._keep_connected, "subscriber", self._subscriber_session, subscriber_tried
                )
                await publisher_tried.wait()
                await subscriber_tried.wait()
                task_status.started()
        finally:
            self._running = False
            self._deliver = None
            self._nursery = None

    async def publish_message(self, channel: str, body: bytes) -> str:
        prefix = self._prefixes.get(channel)
        if prefix is None:
            if len(self._prefixes) >= PREFIX_CACHE_LIMIT:
                self._prefixes.clear()
            prefix = self._script_prefix("EVALSHA", PUBLISH_SCRIPT_SHA, channel)
            self._prefixes[channel] = prefix
        request = _Request(prefix + b"$%d\r\n%s\r\n" % (len(body), body), channel, body)
        message_id: bytes = await self._submit(request)
        return message_id.decode()

    async def publish_event(self, channel: str, payload: bytes) -> None:
        command = encode_command(("PUBLISH", CHANNEL_PREFIX + channel, payload))
        await self._submit(_Request(command))

    async def history(
        self,
        channel: str,
        *,
        after: str | None = None,
        last: int = 0,
        limit: int = RECOVERY_LIMIT,
    ) -> History:
        """See base.py; completeness is decided as redis_history.py explains (conservative:
        a stream that cannot vouch for ``after`` answers incomplete)."""
        after_id = None if after is None else parse_message_id(after)
        if last < 0 or limit < 1:
            raise ValueError("last must be at least 0 and limit at least 1")
        if after_id is not None:
            read = await self._read_stream(channel, after_id, limit + 1)
            return History(read.messages(limit), read.complete(after_id, limit))
        if last == 0:
            await trio.lowlevel.checkpoint()
            return History([], True)
        wanted = min(last, limit + 1)  # one more tells whether the limit cut anything
        command = encode_command(("XREVRANGE", HISTORY_PREFIX + channel, "+", "-", "COUNT", wanted))
        entries: list[Any] = await self._submit(_Request(command))
        return History(entry_payloads(entries[:limit][::-1]), len(entries) <= limit)

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed, or at once while disconnected: the channel is then
        subscribed by the next connection, before ``ready`` turns True again.

        The stream's newest id is read meanwhile, in the background, as a baseline: a reconnect
        refills the channel from it even if no message was delivered yet (unknown while Redis
        is unreachable). Not awaited here, because the gateway adds its member once this
        returns: what arrives between the confirmation and that would reach nobody."""
        key = (CHANNEL_PREFIX + channel).encode()
        if key not in self._subscriptions and self._nursery is not None:
            self._nursery.start_soon(self._track_baseline, key, channel)
        await self._subscribe(key, channel)

    async def _track_baseline(self, key: bytes, channel: str) -> None:
        baseline = await self._stream_tip(channel)
        if self._subscriptions.get(key) == channel:  # not unsubscribed meanwhile
            # Ignored if a message was delivered already: its id is the better starting point.
            self._continuity.track(channel, baseline)

    async def _subscribe(self, key: bytes, channel: str) -> None:
        async with self._subscriber_lock:
            self._subscriptions[key] = channel
            connection = self._subscriber
            if connection is None:
                return
            confirmed = self._confirmation(key)
            try:
                await self._send_shielded(connection, encode_command(("SUBSCRIBE", key)))
            except RedisError:
                return  # that connection is lost; its successor subscribes the channel
        with trio.move_on_after(self._command_timeout):
            await confirmed.wait()
            return
        log.warning("redis did not confirm SUBSCRIBE %s in time; reconnecting", channel)
        await connection.aclose()

    async def unsubscribe(self, channel: str) -> None:
        """Stops delivery at once (payloads still in flight are dropped here); Redis is told
        without waiting for its reply."""
        key = (CHANNEL_PREFIX + channel).encode()
        async with self._subscriber_lock:
            self._continuity.forget(channel)
            if self._subscriptions.pop(key, None) is None or self._subscriber is None:
                return
            # A lost connection needs nothing: its successor will not subscribe the channel.
            with contextlib.suppress(RedisError):
                await self._send_shielded(self._subscriber, encode_command(("UNSUBSCRIBE", key)))

    @staticmethod
    async def _send_shielded(connection: RedisConnection, command: bytes) -> None:
        """A caller cancelled mid-write (a client leaving as it joins) would close the shared
        connection, so the write finishes anyway; it is bounded by the command timeout."""
        with trio.CancelScope(shield=True):
            await connection.send(command)

    # -- beyond the protocol ---------------------------------------------------------------

    async def wait_ready(self, ready: bool = True) -> None:
        """Wait until ``self.ready == ready`` (to log readiness, or in tests)."""
        await trio.lowlevel.checkpoint()
        while self.ready != ready:
            await self._state_changed.wait()

    def last_delivered(self, channel: str) -> str | None:
        """Where a reconnect would refill ``channel`` from: the last id delivered, or the
        stream's newest id when it was subscribed; None while unknown."""
        message_id = self._continuity.last(channel)
        return None if message_id is None else format_id(message_id)

    @property
    def gaps(self) -> int:
        """Gap notices delivered (history that could not be recovered after a reconnect)."""
        return self._continuity.gaps

    @property
    def refilled(self) -> int:
        """Messages delivered from the history after reconnects, instead of being lost."""
        return self._continuity.refilled

    @property
    def duplicates(self) -> int:
        """Messages dropped because they were already delivered (live and refilled)."""
        return self._continuity.duplicates

    # -- history ---------------------------------------------------------------------------

    async def _read_stream(self, channel: str, after: MessageId, count: int) -> StreamRead:
        """The newest ``count`` entries after ``after`` and the stream's account of itself."""
        fixed = (1, HISTORY_PREFIX + channel, *history_args(after, count))
        command = encode_command(("EVALSHA", HISTORY_SCRIPT_SHA, *fixed))
        fallback = encode_command(("EVAL", HISTORY_SCRIPT, *fixed))
        reply = await self._submit(_Request(command, fallback=fallback))
        return StreamRead.decode(reply)

    async def _stream_tip(self, channel: str) -> MessageId | None:
        """The stream's newest id (``0-0`` when it does not exist); None when unreachable."""
        if not self._publisher_up:
            return None
        try:
            read = await self._read_stream(channel, ZERO_ID, 0)
        except BusUnavailable:
            return None
        return read.last_generated if read.exists else ZERO_ID

    # -- connections -----------------------------------------------------------------------

    async def _keep_connected(
        self,
        role: str,
        session: Callable[[Callable[[str], None]], Awaitable[None]],
        first_attempt: trio.Event,
    ) -> None:
        """Run ``session`` again and again with backoff. It calls ``connected(detail)`` once the
        connection is fully set up, and raises RedisError when the connection is lost."""
        attempt = 0
        ever_up = False
        outage: str | None = None  # why we are down; each new reason is logged once
        while True:
            up_since: float | None = None

            def connected(detail: str) -> None:
                nonlocal up_since, ever_up, outage
                up_since = trio.current_time()
                if ever_up:
                    self.reconnects += 1
                if ever_up or outage is not None:
                    log.info("redis %s connected to %s%s", role, self.name, detail)
                ever_up, outage = True, None
                first_attempt.set()

            try:
                await session(connected)
            except RedisError as exc:
                reason = str(exc)
            else:  # pragma: no cover - sessions only end by raising
                reason = "session ended"
            first_attempt.set()
            if up_since is not None:
                log.warning("redis connection lost (%s: %s), reconnecting", role, reason)
                if trio.current_time() - up_since >= STABLE_AFTER:
                    attempt = 0
            elif reason != outage:
                log.warning("redis %s cannot connect (%s), retrying", role, reason)
            else:
                log.debug("redis %s still cannot connect (%s)", role, reason)
            outage = reason
            await trio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_START * 2**attempt)))
            attempt += 1

    async def _open(self, client_name: str) -> RedisConnection:
        return await open_connection(
            self._address,
            command_timeout=self._command_timeout,
            client_name=client_name,
            ssl_context=self._ssl_context,
        )

    def _set_state(self, *, publisher: bool | None = None, subscriber: bool | None = None) -> None:
        if publisher is not None:
            self._publisher_up = publisher
        if subscriber is not None:
            self._subscriber_up = subscriber
        self._state_changed.set()
        self._state_changed = trio.Event()

    # -- publishing ------------------------------------------------------------------------

    def _script_prefix(self, verb: str, script: str, channel: str) -> bytes:
        """Everything of the script call but its last argument (the body), already encoded."""
        fixed = (
            verb,
            script,
            1,
            HISTORY_PREFIX + channel,
            CHANNEL_PREFIX + channel,
            self._history_length,
            self._max_age_ms,
        )
        return b"*8\r\n" + encode_bulk_strings(fixed)

    async def _submit(self, request: _Request) -> Any:
        """Queue ``request`` for the publisher and wait for its reply, never past the timeout."""
        if not self._publisher_up:
            raise BusUnavailable("redis is unreachable")
        try:
            with trio.move_on_after(self._command_timeout):
                try:  # no schedule point when there is room: waiting below is one anyway
                    self._requests_send.send_nowait(request)
                except trio.WouldBlock:
                    await self._requests_send.send(request)
                if not request.done.is_set() and not self._publisher_up:
                    raise BusUnavailable("redis is unreachable")  # lost while we queued
                await request.done.wait()
        finally:
            if not request.done.is_set():
                request.abandoned = True
        if not request.done.is_set():
            raise BusUnavailable(f"redis did not answer within {self._command_timeout} s")
        if request.error is not None:
            raise BusUnavailable(request.error)
        return request.result

    async def _publisher_session(self, connected: Callable[[str], None]) -> None:
        connection = await self._open("broadcast-publisher")
        try:
            scripts = {PUBLISH_SCRIPT_SHA: PUBLISH_SCRIPT, HISTORY_SCRIPT_SHA: HISTORY_SCRIPT}
            replies = await connection.pipeline(
                [("SCRIPT", "LOAD", script) for script in scripts.values()]
            )
            for expected, sha in zip(scripts, replies, strict=True):
                if isinstance(sha, RedisReplyError):
                    raise sha
                if sha.decode() != expected:
                    raise RedisError(f"SCRIPT LOAD returned {sha!r}, expected {expected}")
            self._set_state(publisher=True)
            connected("")
            await self._serve_publishes(connection)
        finally:
            self._set_state(publisher=False)
            self._fail_queued("redis connection lost")
            await connection.aclose()

    async def _serve_publishes(self, connection: RedisConnection) -> None:
        """Take a request, drain what else is queued, write the batch at once, hand out replies."""
        requests = self._requests
        while True:
            first: Any = None
            with trio.move_on_after(self._ping_interval):
                first = await requests.receive()
            if first is None or first is _CHECK:
                await connection.execute("PING")
                continue
            batch: list[_Request] = [first]
            while len(batch) < BATCH_LIMIT:
                try:
                    request = requests.receive_nowait()
                except trio.WouldBlock:
                    break
                if request is not _CHECK:
                    batch.append(request)
            try:
                await self._send_batch(connection, batch)
            except BaseException:
                for request in batch:
                    request.fail("redis connection lost")
                raise

    async def _send_batch(self, connection: RedisConnection, batch: list[_Request]) -> None:
        live = [request for request in batch if not request.abandoned]
        if not live:
            return
        data = b"".join(request.command for request in live)
        replies = await connection.roundtrip(data, len(live))
        unknown_script: list[_Request] = []
        for request, reply in zip(live, replies, strict=True):
            if isinstance(reply, RedisReplyError):
                if reply.code == "NOSCRIPT" and (
                    request.channel is not None or request.fallback is not None
                ):
                    unknown_script.append(request)
                else:
                    self._refused(request, reply)
            else:
                request.succeed(reply)
        if unknown_script:  # the script cache was flushed: EVAL also caches it again
            log.info("redis lost its scripts; sending them again")
            data = b"".join(
                request.fallback
                if request.fallback is not None
                else self._script_prefix("EVAL", PUBLISH_SCRIPT, request.channel or "")
                + b"$%d\r\n%s\r\n" % (len(request.body), request.body)
                for request in unknown_script
            )
            replies = await connection.roundtrip(data, len(unknown_script))
            for request, reply in zip(unknown_script, replies, strict=True):
                if isinstance(reply, RedisReplyError):
                    self._refused(request, reply)
                else:
                    request.succeed(reply)

    @staticmethod
    def _refused(request: _Request, reply: RedisReplyError) -> None:
        what = "message" if request.channel is not None else "command"
        log.warning("redis refused a %s: %s", what, reply)
        request.fail(f"redis refused the {what} ({reply.code})")

    def _fail_queued(self, reason: str) -> None:
        while True:
            try:
                request = self._requests.receive_nowait()
            except trio.WouldBlock:
                return
            if request is not _CHECK:
                request.fail(reason)

    # -- subscribing -----------------------------------------------------------------------

    def _confirmation(self, key: bytes) -> trio.Event:
        event = self._confirmations.get(key)
        if event is None:
            event = self._confirmations[key] = trio.Event()
        return event

    async def _subscriber_session(self, connected: Callable[[str], None]) -> None:
        connection = await self._open("broadcast-subscriber")
        self._last_received = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                tasks = _Tasks(nursery)
                tasks.start(self._read_subscription, connection)
                tasks.start(self._keep_alive, connection)
                tasks.start(self._resubscribe, connection, connected)
            if tasks.reason is not None:
                raise RedisError(tasks.reason)
        finally:
            self._continuity.abandon()
            was_up = self._subscriber_up
            if was_up:
                self._heard_until = self._last_received
            self._subscriber = None
            self._set_state(subscriber=False)
            for event in self._confirmations.values():
                event.set()  # subscribe() callers return; the next connection resubscribes
            self._confirmations.clear()
            await connection.aclose()
            if was_up:
                # Redis may be gone altogether: have the publisher find out now. If the queue
                # is full the publisher is busy, so it will find out anyway.
                with contextlib.suppress(trio.WouldBlock):
                    self._requests_send.send_nowait(_CHECK)

    async def _resubscribe(
        self, connection: RedisConnection, connected: Callable[[str], None]
    ) -> None:
        """Subscribe every channel, then refill what was missed, before turning ready."""
        async with self._subscriber_lock:
            self._subscriber = connection
            keys = list(self._subscriptions)
            # From here on, live payloads of channels with a known last id are held.
            fills = self._continuity.begin(self._subscriptions[key] for key in keys)
            confirmations = [self._confirmation(key) for key in keys]
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                command = encode_command(("SUBSCRIBE", *keys[start : start + SUBSCRIBE_CHUNK]))
                await connection.send(command)
        confirmed_all = False
        with trio.move_on_after(self._command_timeout):
            for confirmed in confirmations:
                await confirmed.wait()
            confirmed_all = True
        if not confirmed_all:
            raise RedisTimeout(f"redis did not confirm {len(keys)} subscriptions in time")
        # Subscribed: whatever the history reads miss from now on arrives live (and is held).
        gaps, refilled = self._continuity.gaps, self._continuity.refilled
        outage = math.inf
        if self._heard_until is not None:
            outage = trio.current_time() - self._heard_until
        if fills:
            limiter = trio.Semaphore(REFILL_CONCURRENCY)
            async with trio.open_nursery() as nursery:
                for fill in fills:
                    nursery.start_soon(self._refill, fill, limiter, outage)
        self._set_state(subscriber=True)
        detail = f", resubscribed {len(keys)} channels"
        if fills:
            refilled = self._continuity.refilled - refilled
            detail += f", refilled {refilled} missed messages"
            if self._continuity.gaps > gaps:
                detail += f", {self._continuity.gaps - gaps} channels with a gap"
        connected(detail)

    async def _refill(self, fill: Fill, limiter: trio.Semaphore, outage: float) -> None:
        """Deliver what one channel missed (continuity.py); ``outage``: seconds since the
        previous connection last heard from Redis."""
        assert self._deliver is not None
        async with limiter:
            for round_number in range(1, REFILL_ROUNDS + 1):
                read = await self._read_missed(fill.channel, fill.after)
                if read is None:
                    messages, gap = [], True
                else:
                    messages = read.messages(RECOVERY_LIMIT)
                    gap = not read.complete(fill.after, RECOVERY_LIMIT) and not (
                        outage * 1000 < self._max_age_ms
                        and not read.cut(RECOVERY_LIMIT)
                        and read.lost_only_to_expiry(fill.after, self._max_age_ms)
                    )
                batch, done = self._continuity.finish(
                    fill, messages, gap=gap, final=round_number == REFILL_ROUNDS
                )
                if gap:
                    log.warning(
                        "channel %s: messages missed while reconnecting may be lost", fill.channel
                    )
                if batch:
                    self._deliver(batch)
                if done:
                    return

    async def _read_missed(self, channel: str, after: MessageId) -> StreamRead | None:
        """Read the history after ``after``, waiting for the publisher (it may be reconnecting
        after the same outage) and retrying; None after REFILL_GIVE_UP_SECONDS."""
        delay = BACKOFF_START
        with trio.move_on_after(REFILL_GIVE_UP_SECONDS):
            while True:
                while not self._publisher_up:
                    await self._state_changed.wait()
                try:
                    return await self._read_stream(channel, after, RECOVERY_LIMIT + 1)
                except BusUnavailable as exc:
                    log.info("channel %s: cannot read its history yet (%s)", channel, exc)
                await trio.sleep(delay)
                delay = min(BACKOFF_CAP, delay * 2)
        log.warning("channel %s: history unreadable for %.0f s", channel, REFILL_GIVE_UP_SECONDS)
        return None

    async def _read_subscription(self, connection: RedisConnection) -> None:
        """Each socket read becomes at most one ``deliver`` call, in Redis's order."""
        subscriptions = self._subscriptions
        confirmations = self._confirmations
        admit = self._continuity.admit
        deliver = self._deliver
        assert deliver is not None
        while True:
            replies = await connection.receive_replies(SUBSCRIBER_RECEIVE_SIZE)
            self._last_received = trio.current_time()
            batch: list[Delivery] = []
            for reply in replies:
                if isinstance(reply, RedisReplyError):
                    raise reply
                if type(reply) is not list:
                    continue  # +PONG outside subscribed mode (no channels)
                kind = reply[0]
                if kind == b"message":
                    channel = subscriptions.get(reply[1])
                    # Else unsubscribed meanwhile: drop it. admit() drops duplicates and holds
                    # the payloads of channels being refilled.
                    if channel is not None and admit(channel, reply[2]):
                        batch.append(Delivery(channel, reply[2]))
                elif kind == b"subscribe":
                    confirmed = confirmations.pop(reply[1], None)
                    if confirmed is not None:
                        confirmed.set()
            if batch:
                deliver(batch)

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
            async with self._subscriber_lock:
                await connection.send(ping)
            last_ping = trio.current_time()
