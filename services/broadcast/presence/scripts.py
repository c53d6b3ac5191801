"""The Redis data model of presence and the two Lua scripts that read and write it.

One sorted set per channel, ``broadcast:presence:<channel>``; a member is ``"<key>\\n<name>"``
(names never contain control characters), its score the Unix time (seconds) at which the entry
expires unless refreshed. Both scripts take "now" from Redis's own ``TIME``: every gateway then
compares against one clock, so gateways whose clocks differ cannot expire each other's entries
early or keep them late. (Redis 5+ replicates a script's effects, not the script, so calling
TIME before writing is allowed; Redis 7 has no other mode.)
"""

from __future__ import annotations

from broadcast.redis.scripts import Script

KEY_PREFIX = "broadcast:presence:"

_NOW = """\
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""


# KEYS[1] the channel's set. ARGV: [1] ttl seconds, [2] the key's expiry in ms, [3] '1' to sweep,
# [4] how many members to remove, then those members, then the members to add or refresh.
# Order matters: removals before additions (a member both removed and added stays), writes before
# the sweep (what this call refreshes is not swept). The sweep reads and deletes the expired
# entries in one atomic step, so exactly one caller in the cluster gets each of them.
# ZADD/ZREM one member per call: no unpack() of a long ARGV, which Lua limits to ~8000 values.
UPDATE = Script(
    _NOW
    + """\
local removals = tonumber(ARGV[4])
for i = 5, 4 + removals do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
if #ARGV > 4 + removals then
  local expiry = string.format('%.6f', now + tonumber(ARGV[1]))
  for i = 5 + removals, #ARGV do
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] ~= '1' then
  return {}
end
local before = '(' .. string.format('%.6f', now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', before)
end
return expired
"""
)

# KEYS[1] the channel's set: the members that have not expired (score >= now), swept or not.
MEMBERS = Script(
    _NOW
    + """\
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.6f', now), '+inf')
"""
)

SCRIPTS = (UPDATE, MEMBERS)


def presence_key(channel: str) -> str:
    return KEY_PREFIX + channel


def encode_member(key: str, name: str) -> str:
    return f"{key}\n{name}"


def decode_member(member: bytes) -> tuple[str, str]:
    """``(key, name)``: the name is everything after the last newline (names have none)."""
    key, _, name = member.decode().rpartition("\n")
    return key, name
