"""Redis behind Sentinel: ask a sentinel where the primary is, and follow it through failovers.

URL (docs/reliability.md, "Redis Sentinel"):

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/MASTER_NAME[/DB]
        [?sentinel_password=SECRET[&sentinel_username=NAME]]

USER and PASSWORD are Redis's (the primary's and the replicas'), as in ``redis://``; the
sentinels' own password, if they have one (``requirepass`` in sentinel.conf), goes in the
``sentinel_password`` query parameter. PORT defaults to 26379. Percent-encode ``@ : / , ? &``
in passwords.

How the primary is followed:

- Every connection is opened at the address a sentinel gives now (``SENTINEL
  get-master-addr-by-name``, asking the sentinels in turn), and is checked with ``ROLE``: a
  server that is not a primary is refused, so a reconnect never settles on a demoted one.
- One watcher task subscribes to ``+switch-master`` on a sentinel, and also asks every
  POLL_INTERVAL seconds, since an event can be missed (a sentinel restarting, a partition).
  When the answer changes, every open connection is closed: their users reconnect (at once,
  not after their backoff) and reach the new primary, and the bus resubscribes and refills.
- A write answered ``READONLY`` (the primary was demoted behind our back, e.g. ``REPLICAOF``)
  makes its user drop the connection and reconnect, which asks again.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote

import trio

from broadcast.redis.resp import (
    RedisAddress,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RedisReplyError,
    encode_command,
    open_connection,
)
from broadcast.redis.urls import parse_host_list_url

log = logging.getLogger("broadcast.redis.sentinel")

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
# Sentinel is asked this often even when no +switch-master came: events are fire-and-forget, so
# a watcher that was reconnecting when one was sent never hears it (the anchors poll every 5 s).
POLL_INTERVAL = 5.0
# The watcher's subscription is PINGed when idle and given up after this long without an answer.
WATCH_PING_INTERVAL = 5.0


@dataclass(frozen=True)
class SentinelConfig:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The URL for logs: passwords appear as ``***``."""
        user = quote(self.username, safe="") if self.username else ""
        secret = ":***" if self.password is not None else ""
        auth = f"{user}{secret}@" if user or secret else ""
        hosts = ",".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.sentinels
        )
        query = "?sentinel_password=***" if self.sentinel_password is not None else ""
        return f"{SCHEME}://{auth}{hosts}/{quote(self.master_name, safe='')}/{self.db}{query}"

    def primary(self, host: str, port: int) -> RedisAddress:
        return RedisAddress(host, port, self.db, self.username, self.password)

    def sentinel(self, index: int) -> RedisAddress:
        host, port = self.sentinels[index]
        return RedisAddress(host, port, 0, self.sentinel_username, self.sentinel_password)


def parse_sentinel_url(url: str) -> SentinelConfig:
    """The URL of the module docstring; ValueError (never quoting the URL) if it is not one."""
    parsed = parse_host_list_url(url, SCHEME, "Sentinel", DEFAULT_SENTINEL_PORT)
    parts = parsed.parts
    path = [unquote(segment) for segment in parts.path.split("/")[1:] if segment]
    if not path or len(path) > 2:
        raise ValueError("the Sentinel URL must end with /MASTER_NAME or /MASTER_NAME/DB")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError("the Redis database must be a number") from None
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    sentinel_username = query.get("sentinel_username", [None])[0]
    return SentinelConfig(
        parsed.hosts,
        path[0],
        db,
        parsed.username,
        parsed.password,
        sentinel_username or None,
        sentinel_password or None,
    )


class Connections:
    """The open connections of a topology, to close them all when the primary moves."""

    def __init__(self) -> None:
        self._open: weakref.WeakSet[RedisConnection] = weakref.WeakSet()

    def add(self, connection: RedisConnection) -> RedisConnection:
        self._open.add(connection)
        return connection

    async def close_all(self) -> int:
        """Close every open connection; returns how many."""
        connections = [c for c in self._open if not c.closed]
        self._open.clear()
        for connection in connections:
            await connection.aclose()
        return len(connections)


class Sentinel:
    """The Topology of topology.py for a primary that Sentinel watches."""

    def __init__(
        self,
        config: SentinelConfig,
        *,
        command_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        if ssl_context is not None:
            raise ValueError("TLS is not supported with Sentinel yet")
        self.config = config
        self.name = config.redacted()
        self._command_timeout = command_timeout
        self._poll_interval = poll_interval
        self._primary: tuple[str, int] | None = None  # the last answer of a sentinel
        self._preferred = 0  # the sentinel that answered last: asked first next time
        self._connections = Connections()
        self.moved = trio.Event()
        """Set (and replaced) when the primary changes: reconnect loops wake up at once."""
        self.switches = 0
        """Primary changes seen (events or polls); for logs, metrics and tests."""

    def describe(self) -> str:
        if self._primary is None:
            return self.name
        host, port = self._primary
        return f"{self.name} (primary {host}:{port})"

    async def primary(self) -> tuple[str, int]:
        """Ask the sentinels in turn, the one that answered last first; RedisConnectionError if
        none knows the primary."""
        reasons = []
        count = len(self.config.sentinels)
        for offset in range(count):
            index = (self._preferred + offset) % count
            try:
                answer = await self._ask(index)
            except RedisError as exc:
                reasons.append(str(exc))
                continue
            if answer is None:
                reasons.append(f"sentinel {index + 1} does not know {self.config.master_name!r}")
                continue
            self._preferred = index
            await self._learn(answer, "asked")
            return answer
        raise RedisConnectionError("no sentinel named the primary: " + "; ".join(reasons))

    async def _ask(self, index: int) -> tuple[str, int] | None:
        connection = await open_connection(
            self.config.sentinel(index), command_timeout=self._command_timeout
        )
        try:
            reply = await connection.execute(
                "SENTINEL", "get-master-addr-by-name", self.config.master_name
            )
        finally:
            await connection.aclose()
        if not reply:
            return None
        host, port = reply
        return host.decode(), int(port)

    async def _learn(self, primary: tuple[str, int], how: str) -> None:
        """A sentinel named ``primary``: if it moved, close every connection to the old one."""
        if primary == self._primary:
            return
        old, self._primary = self._primary, primary
        if old is None:
            return
        self.switches += 1
        log.warning("redis primary moved from %s:%s to %s:%s (%s)", *old, *primary, how)
        moved, self.moved = self.moved, trio.Event()
        moved.set()
        await self._connections.close_all()

    async def connect(self, client_name: str) -> RedisConnection:
        host, port = await self.primary()
        connection = await open_connection(
            self.config.primary(host, port),
            command_timeout=self._command_timeout,
            client_name=client_name,
        )
        try:
            role = await connection.execute("ROLE")
        except BaseException:
            await connection.aclose()
            raise
        if role[0] != b"master":
            await connection.aclose()
            raise RedisConnectionError(f"{host}:{port} is not the primary (it is a {role[0]!r})")
        if (host, port) != self._primary:  # moved while we connected
            await connection.aclose()
            raise RedisConnectionError(f"{host}:{port} is no longer the primary")
        return self._connections.add(connection)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch for failovers until cancelled: a subscription to ``+switch-master`` and a poll."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll)
            nursery.start_soon(self._listen)
            task_status.started()

    async def _poll(self) -> None:
        while True:
            await trio.sleep(self._poll_interval)
            try:
                await self.primary()
            except RedisError as exc:
                log.debug("sentinel poll failed: %s", exc)

    async def _listen(self) -> None:
        """Subscribe to ``+switch-master`` on one sentinel after another, for ever."""
        attempt = 0
        while True:
            index = (self._preferred + attempt) % len(self.config.sentinels)
            try:
                await self._listen_once(index)
            except RedisError as exc:
                log.debug("sentinel %d subscription lost: %s", index + 1, exc)
            attempt += 1
            await trio.sleep(min(self._poll_interval, 0.1 * 2 ** min(attempt, 6)))

    async def _listen_once(self, index: int) -> None:
        connection = await open_connection(
            self.config.sentinel(index), command_timeout=self._command_timeout
        )
        heard = trio.current_time()

        async def read() -> None:
            nonlocal heard
            while True:
                replies = await connection.receive_replies()
                heard = trio.current_time()
                for reply in replies:
                    if isinstance(reply, RedisReplyError):
                        raise reply
                    await self._on_event(reply)

        async def keep_alive() -> None:
            ping = encode_command(("PING",))
            while True:
                await trio.sleep(WATCH_PING_INTERVAL)
                if trio.current_time() - heard > 3 * WATCH_PING_INTERVAL:
                    raise RedisConnectionError(f"sentinel {index + 1} stopped answering")
                await connection.send(ping)

        lost: list[str] = []

        async def until_lost(task: Callable[[], Awaitable[None]]) -> None:
            try:
                await task()
            except RedisError as exc:  # the first failure ends both tasks and is the reason
                lost.append(str(exc))
                nursery.cancel_scope.cancel()

        try:
            await connection.send(encode_command(("SUBSCRIBE", "+switch-master")))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_lost, read)
                nursery.start_soon(until_lost, keep_alive)
        finally:
            await connection.aclose()
        raise RedisConnectionError(lost[0] if lost else "subscription ended")

    async def _on_event(self, reply: object) -> None:
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
            return
        fields = reply[2].decode().split()
        # "<master name> <old ip> <old port> <new ip> <new port>"
        if len(fields) == 5 and fields[0] == self.config.master_name:
            await self._learn((fields[3], int(fields[4])), "+switch-master")
