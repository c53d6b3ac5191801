"""Redis Cluster: which primary owns a channel, and following the slot map as it changes.

URL (docs/reliability.md, "Redis Cluster"):

    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]

The hosts are seeds: any reachable node gives the slot map (``CLUSTER SLOTS``). PORT defaults to
6379; a cluster has only database 0.

All keys of a channel and its shard channel carry the channel as a hash tag
(``broadcast:history:{general}``), so they share one slot: the publish script appends and
``SPUBLISH``es in one atomic step on one shard, and a message reaches only the shard that owns its
channel, and there only the gateways subscribed to it. Channel names are ``[A-Za-z0-9._-]``, so the
tag is always the whole name.

Redirections: ``MOVED`` (the slot has a new owner) makes its users read the map again and send
the command to the new owner. ``ASK <slot> <host:port>`` (the slot is being migrated and this key
is already on the importing node, or not on the migrating one) is followed once, without
changing the map: ``ASKING`` then the same command on a connection to that node
(``Cluster.ask``). ``TRYAGAIN`` (a multi-key command while the slot's keys are split between the
two nodes) is retried after a short backoff, a few times (``TRYAGAIN_DELAYS``). All keys of a
channel share one slot, so its publish script runs whole on one node in every case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import trio

from broadcast.redis.resp import (
    RedisAddress,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    encode_command,
    open_connection,
)
from broadcast.redis.scripts import is_noscript
from broadcast.redis.urls import parse_host_list_url

log = logging.getLogger("broadcast.redis.cluster")

SCHEME = "redis+cluster"
DEFAULT_PORT = 6379
SLOTS = 16384
# The slot map is read again this often even when nothing asked for it: a failover or a
# migration is noticed within this time at worst (MOVED replies and server-side SUNSUBSCRIBEs
# ask for a refresh at once).
REFRESH_INTERVAL = 2.0
# Refreshes asked for (MOVED, a lost shard) are at least this far apart, so a shard that is down
# for seconds costs a few map reads per second, not one per failed call.
REFRESH_GAP = 0.2
# Waits before sending a command answered TRYAGAIN again (the slot's keys are being moved; a
# MIGRATE of one batch of keys takes milliseconds). After the last, the caller is refused.
TRYAGAIN_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)

_ASKING = encode_command(("ASKING",))


Node = tuple[str, int]


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the one Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """The slot of a key, hash tags included (``{tag}``: only the tag is hashed)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


def channel_slot(channel: str) -> int:
    """The slot of every key of ``channel`` (its name is their hash tag)."""
    return crc16(channel.encode()) % SLOTS


@dataclass(frozen=True)
class ClusterConfig:
    seeds: tuple[Node, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        user = quote(self.username, safe="") if self.username else ""
        secret = ":***" if self.password is not None else ""
        auth = f"{user}{secret}@" if user or secret else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.seeds)
        return f"{SCHEME}://{auth}{hosts}"

    def address(self, node: Node) -> RedisAddress:
        return RedisAddress(node[0], node[1], 0, self.username, self.password)


def parse_cluster_url(url: str) -> ClusterConfig:
    """The URL of the module docstring; ValueError (never quoting the URL) if it is not one."""
    parsed = parse_host_list_url(url, SCHEME, "Cluster", DEFAULT_PORT)
    if parsed.parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    return ClusterConfig(parsed.hosts, parsed.username, parsed.password)


class SlotMap:
    """Slot -> primary, from ``CLUSTER SLOTS``."""

    def __init__(self, ranges: list[tuple[int, int, Node]]) -> None:
        self.ranges = sorted(ranges)
        self._owner: list[Node | None] = [None] * SLOTS
        for start, end, node in self.ranges:
            for slot in range(start, end + 1):
                self._owner[slot] = node

    @classmethod
    def decode(cls, reply: list[object]) -> SlotMap:
        ranges = []
        for entry in reply:
            assert isinstance(entry, list)
            start, end, primary = entry[0], entry[1], entry[2]
            ranges.append((int(start), int(end), (primary[0].decode(), int(primary[1]))))
        return cls(ranges)

    def owner(self, slot: int) -> Node | None:
        return self._owner[slot]

    @property
    def primaries(self) -> frozenset[Node]:
        return frozenset(node for _, _, node in self.ranges)

    @property
    def complete(self) -> bool:
        return all(node is not None for node in self._owner)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotMap) and self.ranges == other.ranges

    __hash__ = None  # type: ignore[assignment]


class Cluster:
    """Follows a cluster's slot map: read at start, every REFRESH_INTERVAL, and on request."""

    def __init__(self, config: ClusterConfig, *, command_timeout: float) -> None:
        self.config = config
        self.name = config.redacted()
        self._command_timeout = command_timeout
        self.map: SlotMap | None = None
        self.changed = trio.Event()
        """Set (and replaced) each time the map changes."""
        self._asked = trio.Event()
        self._ask_links: dict[Node, RedisConnection] = {}
        self._ask_locks: dict[Node, trio.Lock] = {}

    def owner(self, channel: str) -> Node | None:
        return None if self.map is None else self.map.owner(channel_slot(channel))

    async def connect(self, node: Node, client_name: str) -> RedisConnection:
        return await open_connection(
            self.config.address(node),
            command_timeout=self._command_timeout,
            client_name=client_name,
        )

    async def ask(self, node: Node, command: bytes, fallback: bytes | None = None) -> Any:
        """Send ``command`` (one encoded command) once to ``node``, an ASK reply's target, right
        after ``ASKING``; the slot map stays as it is. After a NOSCRIPT reply ``fallback`` (the
        EVAL form) goes instead. Returns the reply (an error reply as a RedisReplyError); raises
        RedisError when the node cannot be reached. One connection per node, one call at a
        time on it (ASKING holds for the next command only)."""
        async with self._ask_locks.setdefault(node, trio.Lock()):
            connection = self._ask_links.get(node)
            try:
                if connection is None or connection.closed:
                    connection = await self.connect(node, "broadcast-ask")
                    self._ask_links[node] = connection
                _, reply = await connection.roundtrip(_ASKING + command, 2)
                if is_noscript(reply) and fallback is not None:
                    _, reply = await connection.roundtrip(_ASKING + fallback, 2)
            except RedisError:
                self._ask_links.pop(node, None)
                if connection is not None:
                    await connection.aclose()
                raise
        return reply

    async def close_links(self) -> None:
        """Close the connections ``ask`` opened."""
        links, self._ask_links = self._ask_links, {}
        for connection in links.values():
            await connection.aclose()

    def refresh_soon(self) -> None:
        """Read the map now (a MOVED reply, a SUNSUBSCRIBE from a server, a lost node)."""
        self._asked.set()

    async def refresh(self) -> bool:
        """Read the map from a known primary or a seed; True if it changed."""
        known = sorted(self.map.primaries) if self.map is not None else []
        reasons = []
        for node in [*known, *(seed for seed in self.config.seeds if seed not in known)]:
            try:
                connection = await self.connect(node, "broadcast-cluster")
                try:
                    reply = await connection.execute("CLUSTER", "SLOTS")
                finally:
                    await connection.aclose()
            except RedisError as exc:
                reasons.append(str(exc))
                continue
            fresh = SlotMap.decode(reply)
            if not fresh.complete:
                reasons.append(f"{node[0]}:{node[1]} has slots without a primary")
                continue
            if fresh == self.map:
                return False
            if self.map is not None:
                log.warning("redis cluster slot map changed: %d primaries", len(fresh.primaries))
            self.map = fresh
            changed, self.changed = self.changed, trio.Event()
            changed.set()
            return True
        raise RedisConnectionError("no cluster node gave a slot map: " + "; ".join(reasons))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the map (once before reporting started, successful or not), then keep it fresh."""
        try:
            await self.refresh()
        except RedisError as exc:
            log.warning("redis cluster: %s", exc)
        task_status.started()
        try:
            while True:
                with trio.move_on_after(REFRESH_INTERVAL):
                    await self._asked.wait()
                self._asked = trio.Event()
                try:
                    await self.refresh()
                except RedisError as exc:
                    log.debug("redis cluster: %s", exc)
                await trio.sleep(REFRESH_GAP)
        finally:
            await self.close_links()
