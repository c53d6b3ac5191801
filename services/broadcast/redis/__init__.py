"""Talking to Redis, for the bus and presence alike.

- ``resp``: one trio-native RESP connection (hiredis parses), every call bounded by a timeout.
- ``topology``: where the primary is: one address (``redis://``), or asked of Sentinel
  (``redis+sentinel://``, ``sentinel``), followed through failovers.
- ``cluster``: Redis Cluster (``redis+cluster://``): slots, the slot map and how it is followed;
  the bus and presence run one connection per primary on it (``bus/redis_cluster_bus.py``,
  ``presence/redis_cluster_presence.py``).
- ``supervise``: the reconnect loop with backoff and jitter every long-lived connection runs in.
- ``scripts``: Lua scripts by SHA (``SCRIPT LOAD``, ``EVALSHA``, and ``EVAL`` after ``NOSCRIPT``).
- ``errors``: ``Unavailable``, what callers see when Redis cannot answer.
"""
