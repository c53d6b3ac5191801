"""Lua scripts by SHA1: loaded once per connection, called with EVALSHA, and sent again with
EVAL when Redis answers NOSCRIPT (its script cache was flushed, or it failed over to a replica
that never loaded them). Used by the bus and by presence."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from broadcast.redis.resp import (
    Arg,
    RedisConnection,
    RedisError,
    RedisReplyError,
    encode_bulk_strings,
)

log = logging.getLogger("broadcast.redis")


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    def evalsha(self, args: Sequence[Arg], extra: int = 0) -> bytes:
        """``EVALSHA sha *args`` encoded, as a prefix when ``extra`` more arguments follow (so
        callers can cache everything but a last argument and append it encoded)."""
        head = b"*%d\r\n" % (len(args) + 2 + extra)
        return head + encode_bulk_strings(("EVALSHA", self.sha, *args))

    def eval(self, args: Sequence[Arg], extra: int = 0) -> bytes:
        """``EVAL source *args`` encoded, like ``evalsha``."""
        head = b"*%d\r\n" % (len(args) + 2 + extra)
        return head + encode_bulk_strings(("EVAL", self.source, *args))


async def load_scripts(connection: RedisConnection, scripts: Sequence[Script]) -> None:
    """SCRIPT LOAD each in one round trip; raises RedisError unless Redis took them all."""
    replies = await connection.pipeline(("SCRIPT", "LOAD", script.source) for script in scripts)
    for script, reply in zip(scripts, replies, strict=True):
        if isinstance(reply, RedisReplyError):
            raise reply
        if reply.decode() != script.sha:
            raise RedisError(f"SCRIPT LOAD returned {reply!r}, expected {script.sha}")


ScriptCall = tuple[Script, Sequence[Arg]]  # the script, then numkeys, keys and arguments


async def run_scripts(connection: RedisConnection, calls: Sequence[ScriptCall]) -> list[Any]:
    """EVALSHA each call in one pipelined write and return the replies in order (an error reply
    in its place, as a RedisReplyError); what Redis forgot goes again as EVAL, which also caches
    the script again."""
    data = b"".join(script.evalsha(args) for script, args in calls)
    replies = await connection.roundtrip(data, len(calls))
    unknown = [i for i, reply in enumerate(replies) if is_noscript(reply)]
    if unknown:
        log.info("redis lost its scripts; sending them again")
        data = b"".join(calls[i][0].eval(calls[i][1]) for i in unknown)
        again = await connection.roundtrip(data, len(unknown))
        for i, reply in zip(unknown, again, strict=True):
            replies[i] = reply
    return replies


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, RedisReplyError) and reply.code == "NOSCRIPT"


def is_read_only(reply: Any) -> bool:
    """A write refused by a replica: the server was a primary and is one no more (a failover, or
    ``REPLICAOF`` behind our back). Its user reconnects, which finds the primary again."""
    return isinstance(reply, RedisReplyError) and "READONLY" in str(reply)[:80]
