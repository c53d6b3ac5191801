"""Shared fixtures. Rules for every test here:

- Real parts: a private redis-server per test on a free port, real sockets on 127.0.0.1 only,
  real gateway subprocesses for cluster tests. No mocks of Redis or of the network.
- Synchronise on events and conditions, never on sleeps; bound every wait with ``fail_after``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
