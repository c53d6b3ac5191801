"""RedisPublisher: the bus's write and read connection to Redis.

Callers hand publishes and history reads to one task that pipelines whatever is queued into one
write and hands out the replies. Every message goes through one Lua script that appends it to
the channel's capped stream and publishes it with the stream id and the channel's epoch, so ids
increase per channel and their order is the order every gateway delivers (docs/protocol.md,
"Redis"). History reads (redis_history.py) share the queue, the pipelining and the timeouts.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

from broadcast.bus.base import BusUnavailable
from broadcast.bus.keys import STANDALONE, Keys
from broadcast.bus.redis_history import HISTORY, StreamRead, history_args
from broadcast.protocol.ids import ZERO_ID, MessageId
from broadcast.redis.cluster import TRYAGAIN_DELAYS, Node
from broadcast.redis.errors import Redirected, StorageFull
from broadcast.redis.resp import (
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RedisReplyError,
    encode_command,
)
from broadcast.redis.scripts import Script, is_noscript, is_read_only, load_scripts
from broadcast.redis.supervise import Connected, Status
from broadcast.redis.topology import Topology

log = logging.getLogger("broadcast.bus.redis")


# XADD then PUBLISH in one script, so nothing can come between the id and its publication. The
# concatenation must equal envelope.message_payload byte for byte. Argument layout as in
# docs/protocol.md: KEYS[1] stream, KEYS[2] epoch, ARGV[1] pub/sub channel, ARGV[2] cap, ARGV[3]
# max age in ms, ARGV[4] the epoch's lifetime in ms, ARGV[5] this gateway's epoch tag, ARGV[6]
# body (last, so everything before it is a cached prefix).
# The age trim (whole nodes only, like the length cap) and the expiries, which make a stream
# nobody writes to vanish once its last message is as old as the history keeps, run for the
# first message of each millisecond (sequence 0). Its id's ms is then exactly Redis's clock (a
# stream id is max(now, last) ms), so no TIME call is needed, and the rest of that millisecond
# would only repeat them: a busy channel pays ~0.4 µs of Redis CPU per message for them instead
# of ~2.4 (`broadcast-bench roundtrip`). A clock stepping back pauses them until it catches up.
# KEYS[2] holds the channel's epoch (docs/reliability.md, "Epochs"): made here when missing, so
# a Redis that lost its data starts a new epoch with its first message. It is Redis's TIME in
# hex and the publishing gateway's random tag, so two epochs of a channel never match; it lives
# ARGV[4] ms after the channel's last message, longer than the stream.
_PUBLISH_SOURCE = """\
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local t = redis.call('TIME')
  epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2])) .. ARGV[5]
  redis.call('SET', KEYS[2], epoch, 'PX', ARGV[4])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[6])
if string.sub(id, -2) == '-0' then
  local age = tonumber(ARGV[3])
  local oldest = tonumber(string.sub(id, 1, -3)) - age
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', oldest))
  redis.call('PEXPIRE', KEYS[1], age)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[1],
  '{"type":"message","id":"' .. id .. '","epoch":"' .. epoch .. '",' .. ARGV[6])
return id
"""
PUBLISH = Script(_PUBLISH_SOURCE)
# The same on Redis Cluster: sharded pub/sub, so only the shard that owns the channel sends it.
SPUBLISH = Script(_PUBLISH_SOURCE.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"))

# The readiness probe (gateway/readiness.py): a write first, so that it is refused exactly when
# a message would be (Redis at maxmemory refuses a script's first write with OOM; PUBLISH alone
# is allowed), then the event. KEYS[1] a key of the probe channel's slot, ARGV[1] the pub/sub
# channel, ARGV[2] the payload. The key lives a second: one small key per gateway at most.
_PROBE_SOURCE = """\
redis.call('SET', KEYS[1], '1', 'PX', 1000)
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
PROBE = Script(_PROBE_SOURCE)
SPROBE = Script(_PROBE_SOURCE.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"))

# How long a channel's epoch outlives its last message: a day, or twice the history's age if
# that is longer. Longer than the stream, so a stream that merely expired keeps its epoch (a
# client resuming then reads "incomplete", not "restarted"); short enough that the keys of
# channels nobody uses any more go away (one ~80-byte key each).
EPOCH_MIN_TTL_SECONDS = 86400.0
# Publishes waiting for the publisher task: two full batches. Past that, callers wait (within
# their timeout) instead of memory growing: the queue is the bus's backpressure.
QUEUE_SIZE = 1024
# Requests per pipelined write. 512 typical messages are ~100 KB, a few socket buffers; bigger
# batches only make the first caller in them wait longer.
BATCH_LIMIT = 512
# Encoded EVALSHA prefixes kept per channel; cleared past this so channel churn cannot grow it.
PREFIX_CACHE_LIMIT = 4096

# While Redis refuses writes for lack of memory, say so in the log at most this often.
OOM_LOG_INTERVAL_SECONDS = 10.0

# Redis Cluster's answers that mean "not executed here" (redis/cluster.py).
REDIRECTIONS = ("MOVED", "ASK", "TRYAGAIN")

_CHECK = object()
"""Queued to make the publisher PING its connection now (the subscriber saw Redis go away)."""


class _Request:
    """One command (a publish, a history read) handed to the publisher task, and its outcome."""

    __slots__ = (
        "abandoned",
        "body",
        "channel",
        "command",
        "done",
        "error",
        "fallback",
        "full",
        "redirect",
        "result",
    )

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
        self.full = False  # refused because Redis is out of memory
        self.redirect: str | None = None  # Redis Cluster's MOVED/ASK/TRYAGAIN reply
        self.abandoned = False  # the caller gave up: do not send it

    def again(self) -> _Request:
        """The same command, to be sent anew."""
        return _Request(self.command, self.channel, self.body, self.fallback)

    def succeed(self, result: Any) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    def fail(self, reason: str) -> None:
        if not self.done.is_set():
            self.error = reason
            self.done.set()


class RedisPublisher:
    """Publishes and history reads on one pipelined connection; ``status.up`` while it works."""

    def __init__(
        self,
        topology: Topology,
        *,
        history_length: int,
        history_max_age: float,
        command_timeout: float,
        ping_interval: float,
        on_change: Callable[[], None] | None = None,
        keys: Keys = STANDALONE,
    ) -> None:
        self._topology = topology
        self._keys = keys
        self._publish = SPUBLISH if keys.sharded else PUBLISH
        self._probe = SPROBE if keys.sharded else PROBE
        self._history_length = history_length
        self._max_age_ms = max(1, round(history_max_age * 1000))
        self._epoch_ttl_ms = round(max(EPOCH_MIN_TTL_SECONDS, 2 * history_max_age) * 1000)
        self._epoch_tag = secrets.token_hex(2)  # this gateway's part of the epochs it makes
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        self._requests_send, self._requests = trio.open_memory_channel[Any](QUEUE_SIZE)
        self._prefixes: dict[str, bytes] = {}
        self.status = Status(on_change)
        self.refused_writes = 0
        """Messages Redis refused with ``OOM`` (at ``maxmemory`` with ``noeviction``)."""
        self._oom_logged_at = -OOM_LOG_INTERVAL_SECONDS
        self.retried = 0
        """Commands sent again after ``TRYAGAIN`` (Redis Cluster, mid-migration)."""
        self.on_ask: Callable[[Node, bytes, bytes | None], Awaitable[Any]] | None = None
        """Redis Cluster: sends a command answered ``ASK`` to the node named (with ``ASKING``),
        given the node, the command and its EVAL form; returns the reply (Cluster.ask)."""

    @property
    def max_age_ms(self) -> int:
        return self._max_age_ms

    # -- what the bus asks -----------------------------------------------------------------

    async def publish_message(self, channel: str, body: bytes) -> str:
        prefix = self._prefixes.get(channel)
        if prefix is None:
            if len(self._prefixes) >= PREFIX_CACHE_LIMIT:
                self._prefixes.clear()
            prefix = self._script_prefix(self._publish.evalsha, channel)
            self._prefixes[channel] = prefix
        request = _Request(prefix + b"$%d\r\n%s\r\n" % (len(body), body), channel, body)
        message_id: bytes = await self._submit(request)
        return message_id.decode()

    async def publish_event(self, channel: str, payload: bytes) -> None:
        command = encode_command((self._keys.publish, self._keys.channel(channel), payload))
        await self._submit(_Request(command))

    async def probe(self, channel: str, payload: bytes) -> None:
        """A write on the channel's slot, then ``payload`` published (see PROBE)."""
        args = (1, self._keys.probe(channel), self._keys.channel(channel), payload)
        await self._submit(_Request(self._probe.evalsha(args), fallback=self._probe.eval(args)))

    async def read_stream(
        self, channel: str, after: MessageId, count: int, epoch: str | None = None
    ) -> StreamRead:
        """The newest ``count`` entries after ``after`` (of ``epoch``: from the start if that
        is not the channel's epoch) and the stream's account of itself."""
        keys = (2, self._keys.history(channel), self._keys.epoch(channel))
        args = keys + history_args(after, count, epoch)
        request = _Request(HISTORY.evalsha(args), fallback=HISTORY.eval(args))
        return StreamRead.decode(await self._submit(request))

    async def stream_tip(self, channel: str) -> tuple[MessageId, bytes | None] | None:
        """The stream's newest id (``0-0`` when it does not exist) and the channel's epoch (None
        when it has none); None when unreachable."""
        if not self.status.up:
            return None
        try:
            read = await self.read_stream(channel, ZERO_ID, 0)
        except BusUnavailable:
            return None
        return read.last_generated if read.exists else ZERO_ID, read.epoch.encode() or None

    def check_soon(self) -> None:
        """Have the connection PINGed now (the subscriber saw Redis go away). If the queue is
        full the publisher is busy, so it will find out anyway."""
        with contextlib.suppress(trio.WouldBlock):
            self._requests_send.send_nowait(_CHECK)

    # -- the connection --------------------------------------------------------------------

    async def session(self, connected: Connected) -> None:
        """One connection: load the scripts, then serve the queue until the connection fails."""
        connection = await self._topology.connect("broadcast-publisher")
        try:
            await load_scripts(connection, (self._publish, HISTORY, self._probe))
            self.status.set(True)
            connected("")
            await self._serve(connection)
        finally:
            self.status.set(False)
            self._fail_queued("redis connection lost")
            await connection.aclose()

    def _script_prefix(self, encode: Callable[..., bytes], channel: str) -> bytes:
        """Everything of the script call but its last argument (the body), already encoded."""
        fixed = (
            2,
            self._keys.history(channel),
            self._keys.epoch(channel),
            self._keys.channel(channel),
            self._history_length,
            self._max_age_ms,
            self._epoch_ttl_ms,
            self._epoch_tag,
        )
        return encode(fixed, extra=1)

    async def _submit(self, request: _Request) -> Any:
        """Queue ``request`` for the publisher and wait for its reply. On Redis Cluster, a
        ``TRYAGAIN`` (a multi-key command while its slot's keys are being migrated) is sent
        again after a short wait, a few times within the timeout; ``ASK`` is followed."""
        deadline = trio.current_time() + self._command_timeout
        for delay in (*TRYAGAIN_DELAYS, None):
            try:
                return await self._submit_once(request)
            except Redirected as exc:
                if exc.code != "TRYAGAIN" or delay is None:
                    raise
                if trio.current_time() + delay > deadline:
                    raise
            self.retried += 1
            await trio.sleep(delay)
            request = request.again()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _submit_once(self, request: _Request) -> Any:
        """Queue ``request`` for the publisher and wait for its reply, never past the timeout."""
        if not self.status.up:
            raise BusUnavailable("redis is unreachable")
        try:
            with trio.move_on_after(self._command_timeout):
                try:  # no schedule point when there is room: waiting below is one anyway
                    self._requests_send.send_nowait(request)
                except trio.WouldBlock:
                    await self._requests_send.send(request)
                if not request.done.is_set() and not self.status.up:
                    raise BusUnavailable("redis is unreachable")  # lost while we queued
                await request.done.wait()
        finally:
            if not request.done.is_set():
                request.abandoned = True
        if not request.done.is_set():
            raise BusUnavailable(f"redis did not answer within {self._command_timeout} s")
        if request.error is not None:
            if request.redirect is not None and self.on_ask is not None:
                redirected = Redirected(request.error, request.redirect)
                if redirected.code == "ASK" and redirected.node is not None:
                    return await self._ask(request, redirected.node)
            self._raise(request)
        return request.result

    async def _ask(self, request: _Request, node: Node) -> Any:
        """``request`` once more on ``node`` after ``ASKING`` (its slot is being imported
        there). An ASK from that node is not followed again."""
        assert self.on_ask is not None
        try:
            with trio.fail_after(self._command_timeout):
                reply = await self.on_ask(node, request.command, self._eval_form(request))
        except (RedisError, trio.TooSlowError) as exc:
            raise BusUnavailable(f"redis cluster: no answer from the node asked: {exc}") from None
        if isinstance(reply, RedisReplyError):
            refused = request.again()
            self._refused(refused, reply)
            self._raise(refused)
        return reply

    @staticmethod
    def _raise(request: _Request) -> NoReturn:
        """The failure of a request Redis answered with an error."""
        error = request.error or "redis refused the command"
        if request.full:
            raise StorageFull(error)
        if request.redirect is not None:
            raise Redirected(error, request.redirect)
        raise BusUnavailable(error)

    async def _serve(self, connection: RedisConnection) -> None:
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
        read_only = False
        for request, reply in zip(live, replies, strict=True):
            if is_noscript(reply) and (request.channel is not None or request.fallback is not None):
                unknown_script.append(request)
            elif is_read_only(reply):
                read_only = True
                request.fail("redis is a read-only replica now")
            elif isinstance(reply, RedisReplyError):
                self._refused(request, reply)
            else:
                request.succeed(reply)
        if read_only:  # a demoted primary: reconnecting finds the new one (topology.py)
            raise RedisConnectionError(f"{connection.name} is a read-only replica now")
        if unknown_script:  # the script cache was flushed: EVAL also caches it again
            log.info("redis lost its scripts; sending them again")
            data = b"".join(self._eval_form(request) or b"" for request in unknown_script)
            replies = await connection.roundtrip(data, len(unknown_script))
            for request, reply in zip(unknown_script, replies, strict=True):
                if isinstance(reply, RedisReplyError):
                    self._refused(request, reply)
                else:
                    request.succeed(reply)

    def _eval_form(self, request: _Request) -> bytes | None:
        """The request as EVAL (it caches the script again); None if it is no script call."""
        if request.fallback is not None:
            return request.fallback
        if request.channel is None:
            return None
        body = request.body
        prefix = self._script_prefix(self._publish.eval, request.channel)
        return prefix + b"$%d\r\n%s\r\n" % (len(body), body)

    def _refused(self, request: _Request, reply: RedisReplyError) -> None:
        what = "message" if request.channel is not None else "command"
        if reply.code == "OOM":
            # Redis is at maxmemory and evicts nothing (noeviction): every write is refused
            # until memory is freed. Counted, so readiness can tell (gateway/readiness.py).
            if request.channel is not None:
                self.refused_writes += 1
            request.full = True
            now = trio.current_time()
            if now - self._oom_logged_at >= OOM_LOG_INTERVAL_SECONDS:  # not once per message
                self._oom_logged_at = now
                log.warning("redis is out of memory (OOM), writes are refused: %s", reply)
            request.fail(f"redis is out of memory (OOM, maxmemory reached): {what} not stored")
            return
        # Redis Cluster's redirections are routine (the cluster bus follows MOVED at once).
        level = logging.WARNING
        if reply.code in REDIRECTIONS:
            level = logging.DEBUG
            request.redirect = str(reply)
        log.log(level, "redis refused a %s: %s", what, reply)
        request.fail(f"redis refused the {what} ({reply.code})")

    def _fail_queued(self, reason: str) -> None:
        while True:
            try:
                request = self._requests.receive_nowait()
            except trio.WouldBlock:
                return
            if request is not _CHECK:
                request.fail(reason)
