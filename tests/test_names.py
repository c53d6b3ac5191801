"""Names are unique in a channel, so nobody can pass for someone else (issue 12); with tokens
one person may be there several times under the name their token gives."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from broadcast.bus.memory import MemoryBus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.server import Gateway
from broadcast.security import TokenVerifier, mint_token
from tests.support.clients import line_client, ws_client
from tests.support.waiting import wait_until

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


@pytest.fixture
async def gateway(nursery: trio.Nursery) -> AsyncIterator[Gateway]:
    gateway = Gateway(MemoryBus(), node_id="gw-names")
    await nursery.start(gateway.run)
    await wait_until(lambda: gateway.ready)
    yield gateway
    nursery.cancel_scope.cancel()


def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/"


async def test_a_taken_name_is_refused_everywhere(gateway: Gateway) -> None:
    async with ws_client(url(gateway), name="bob") as bob:
        async with ws_client(url(gateway), name="bob") as other:
            assert other.welcome["name"].startswith("guest-")
            assert (await other.expect("error"))["code"] == "name_taken"
            await other.send_json({"type": "hello", "name": "bob"})
            assert (await other.expect("error"))["code"] == "name_taken"
        async with line_client(gateway.port) as nc:
            await nc.send_line("/name bob")
            assert (await nc.line_not_starting("* ")).startswith("! name_taken:")
        await bob.send_json({"type": "who"})
        assert (await bob.expect("presence"))["members"].count("bob") == 1


async def test_the_same_name_in_another_channel_is_fine(gateway: Gateway) -> None:
    async with (
        ws_client(url(gateway), name="bob", channel="a"),
        ws_client(url(gateway), name="bob", channel="b") as other,
    ):
        assert other.welcome["name"] == "bob"


async def test_one_token_may_be_used_from_two_tabs(nursery: trio.Nursery) -> None:
    gateway = Gateway(
        MemoryBus(), node_id="gw-tabs", access=AccessPolicy(verifier=TokenVerifier(secret=SECRET))
    )
    await nursery.start(gateway.run)
    token = mint_token(SECRET, "alice", 60)
    async with ws_client(url(gateway), token=token), ws_client(url(gateway), token=token) as tab:
        assert tab.welcome["name"] == "alice"
    nursery.cancel_scope.cancel()
