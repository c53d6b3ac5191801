"""Shared fixtures. Rules for every test here:

- Real parts: a private redis-server per test on a free port, real sockets on 127.0.0.1 only,
  real gateway subprocesses for cluster tests. No mocks of Redis or of the network.
- Synchronise on events and conditions, never on sleeps; bound every wait with ``fail_after``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def gateway_process() -> Iterator[GatewayProcess]:
    """One real gateway process on the in-process bus, shared by a test module (CLI tests:
    each test uses its own channel, so they do not see one another)."""
    process = GatewayProcess(node_id="cli-tests")
    try:
        yield process
    finally:
        process.terminate()
