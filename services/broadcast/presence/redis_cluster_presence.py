"""ClusterPresence: RedisPresence on Redis Cluster (``redis+cluster://``).

The data model and scripts are RedisPresence's; only where they run differs. Each channel's set
is ``broadcast:presence:{<channel>}``, on the shard that owns the channel's slot (the same shard
as its messages, redis/cluster.py). Calls and refreshes are grouped by owner and pipelined per
shard on one connection to each primary, opened when first needed. A shard that cannot be reached
fails only the calls for its channels; its entries are written by the next refresh that reaches
it (after a failover, on the promoted replica). Every call and refresh holds one lock, as on one
Redis, so a refresh never rewrites an entry from a stale snapshot.

A call answered ``MOVED`` is sent again, once, after the slot map is read again; one answered
``ASK`` (its channel's slot is being migrated and the key has left) is sent once
more to the importing node after ``ASKING`` (``Cluster.ask``). Each script has one key, so
``TRYAGAIN`` (a multi-key command during a migration) cannot happen.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import trio

from broadcast.presence.base import OnExpired
from broadcast.presence.redis_presence import REFRESH_BATCH, Command, RedisPresence
from broadcast.presence.scripts import SCRIPTS
from broadcast.redis.cluster import Cluster, Node, parse_cluster_url
from broadcast.redis.errors import Redirected
from broadcast.redis.resp import RedisConnection, RedisConnectionError, RedisError, RedisReplyError
from broadcast.redis.scripts import ScriptCall, load_scripts, run_scripts

log = logging.getLogger("broadcast.presence.redis")

KEY_PREFIX = "broadcast:presence:"


def cluster_presence_key(channel: str) -> str:
    return f"{KEY_PREFIX}{{{channel}}}"


def _moved(reply: Any) -> bool:
    return isinstance(reply, RedisReplyError) and reply.code == "MOVED"


class ClusterPresence(RedisPresence):
    """The PresenceStore of base.py on Redis Cluster; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        on_expired: OnExpired,
        ttl: float = 15.0,
        refresh_interval: float = 5.0,
        command_timeout: float = 5.0,
        ssl_context: object = None,
    ) -> None:
        if ssl_context is not None:
            raise ValueError("TLS is not supported with Redis Cluster yet")
        self._cluster = Cluster(parse_cluster_url(url), command_timeout=command_timeout)
        super().__init__(
            url,
            on_expired=on_expired,
            ttl=ttl,
            refresh_interval=refresh_interval,
            command_timeout=command_timeout,
        )
        self._links: dict[Node, RedisConnection] = {}
        self._round_ok = False

    def _make_topology(self, url: str, command_timeout: float, ssl_context: Any) -> Any:
        return self._cluster

    @property
    def ready(self) -> bool:
        """True while the last refresh reached every shard."""
        return self._round_ok

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._running:
            raise RuntimeError("this presence store is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._cluster.run)
                started = False
                while True:
                    await self._refresh_all()
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep(self._refresh_interval)
        finally:
            self._running = False
            for connection in self._links.values():
                await connection.aclose()
            self._links.clear()

    # -- calls, grouped by shard -----------------------------------------------------------

    def _group(self, channels: Sequence[str]) -> dict[Node, list[int]]:
        """The indexes of ``channels``, by the primary that owns each."""
        groups: dict[Node, list[int]] = {}
        for index, channel in enumerate(channels):
            owner = self._cluster.owner(channel)
            if owner is None:
                raise RedisConnectionError(f"{self.name}: no slot map yet")
            groups.setdefault(owner, []).append(index)
        return groups

    async def _on_node(self, node: Node, commands: Sequence[Command]) -> list[Any]:
        """Run ``commands`` on ``node``'s connection (opened and given the scripts if needed)."""
        connection = self._links.get(node)
        calls: list[ScriptCall] = [
            (s, (1, cluster_presence_key(ch), *args)) for s, ch, args in commands
        ]
        try:
            if connection is None or connection.closed:
                connection = await self._cluster.connect(node, "broadcast-presence")
                self._links[node] = connection
                await load_scripts(connection, SCRIPTS)
            replies = await run_scripts(connection, calls)
        except RedisError:
            if connection is not None:
                await connection.aclose()
            self._links.pop(node, None)
            self._cluster.refresh_soon()
            raise
        if any(isinstance(r, RedisReplyError) and r.code == "MOVED" for r in replies):
            self._cluster.refresh_soon()
        for index, reply in enumerate(replies):
            if isinstance(reply, RedisReplyError) and reply.code == "ASK":
                replies[index] = await self._ask(reply, calls[index])
        return replies

    async def _ask(self, reply: RedisReplyError, call: ScriptCall) -> Any:
        """``call`` once more on the node an ASK reply names, after ``ASKING``."""
        target = Redirected(str(reply), str(reply)).node
        if target is None:
            return reply
        script, args = call
        return await self._cluster.ask(target, script.evalsha(args), script.eval(args))

    async def _call(self, commands: list[Command]) -> list[Any]:
        """As RedisPresence._call, shard by shard, within ``command_timeout`` in all."""
        replies: list[Any] = [None] * len(commands)
        deadline = trio.current_time() + self._command_timeout
        with trio.move_on_at(deadline):
            async with self._lock:
                with trio.CancelScope(deadline=deadline, shield=True):
                    pending = list(range(len(commands)))
                    for attempt in (1, 2):
                        channels = [commands[i][1] for i in pending]
                        for node, places in self._group(channels).items():
                            indexes = [pending[p] for p in places]
                            answers = await self._on_node(node, [commands[i] for i in indexes])
                            for index, answer in zip(indexes, answers, strict=True):
                                replies[index] = answer
                        pending = [i for i in pending if _moved(replies[i])]
                        if not pending or attempt == 2:
                            return replies
                        # The slot has a new owner: read the map, send those once more there.
                        with contextlib.suppress(RedisError):
                            await self._cluster.refresh()
                    return replies
                raise RedisConnectionError(f"{self.name}: no answer within the timeout")
        raise RedisConnectionError(f"{self.name}: busy for {self._command_timeout} s")

    async def _scan_channels(self) -> list[str]:
        found: set[str] = set()
        cluster_map = self._cluster.map
        if cluster_map is None:
            raise RedisConnectionError(f"{self.name}: no slot map yet")
        with trio.fail_after(self._command_timeout):
            for node in sorted(cluster_map.primaries):
                connection = await self._cluster.connect(node, "broadcast-presence-scan")
                try:
                    cursor: bytes | int = 0
                    while True:
                        cursor, keys = await connection.execute(
                            "SCAN", cursor, "MATCH", cluster_presence_key("*"), "COUNT", 1000
                        )
                        found.update(key.decode()[len(KEY_PREFIX) + 1 : -1] for key in keys)
                        if int(cursor) == 0:
                            break
                finally:
                    await connection.aclose()
        return sorted(found)

    # -- the refresh -----------------------------------------------------------------------

    async def _refresh_all(self) -> None:
        """RedisPresence._refresh, shard by shard: a shard that fails leaves its updates (and
        owed removals) for the next round."""
        done: list[Any] = []
        answered: list[tuple[Any, Any]] = []
        all_ok = self._cluster.map is not None
        async with self._lock:
            updates = self._entries.refresh_plan(trio.current_time())
            try:
                groups = self._group([update.channel for update in updates])
            except RedisError:
                groups, all_ok = {}, False
            for node, indexes in groups.items():
                mine = [updates[i] for i in indexes]
                try:
                    for start in range(0, len(mine), REFRESH_BATCH):
                        batch = mine[start : start + REFRESH_BATCH]
                        commands = [
                            self._update(u.channel, u.removals, u.additions, sweep=True)
                            for u in batch
                        ]
                        replies = await self._on_node(node, commands)
                        answered += zip(batch, replies, strict=True)
                except RedisError as exc:
                    all_ok = False
                    log.debug("presence refresh of %s:%s failed: %s", *node, exc)
            for update, reply in answered:
                if isinstance(reply, RedisReplyError):
                    all_ok = False
                else:
                    done.append(update)
            self._entries.removals_done(done)
        if cluster_map := self._cluster.map:  # reach every shard, even with no entries there
            for node in cluster_map.primaries - set(groups):
                with contextlib.suppress(RedisError):
                    await self._ping(node)
                all_ok = all_ok and node in self._links
        self._round_ok = all_ok
        self.refreshes += 1
        for update, reply in answered:
            if not isinstance(reply, RedisReplyError):
                for member in reply:
                    self._report_expired(update, member)

    async def _ping(self, node: Node) -> None:
        connection = self._links.get(node)
        try:
            if connection is None or connection.closed:
                connection = await self._cluster.connect(node, "broadcast-presence")
                self._links[node] = connection
                await load_scripts(connection, SCRIPTS)
            await connection.execute("PING")
        except RedisError:
            self._links.pop(node, None)
            raise
