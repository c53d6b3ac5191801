"""WebSocket ``publish`` with an ``idempotency_key``, end to end: real gateway processes on a
real Redis, without an API key (the API is off; its idempotency store still serves clients).

What a client can rely on: a publish resent with its key, on any gateway, gets the first ack's
id and is delivered once; keys are the client's own (another name, another guest, another
channel publishes anew); a malformed key is refused with ``bad_command`` and publishes nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from broadcast.protocol.commands import Publish, parse_frame
from broadcast.protocol.errors import ProtocolError
from tests.support.clients import WAIT_SECONDS, WsClient, ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.cluster


@pytest.fixture
def pair(redis_server: RedisServer) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    gateways: list[GatewayProcess] = []
    try:
        for node in ("gw-a", "gw-b"):
            gateways.append(GatewayProcess(redis_url=redis_server.url, node_id=node))
        yield gateways[0], gateways[1]
    finally:
        for gateway in gateways:
            gateway.kill()


async def publish(client: WsClient, text: str, key: str, ref: str = "r") -> dict[str, object]:
    """The ``ack`` or ``error`` answering one publish with ``key``."""
    await client.send_json({"type": "publish", "text": text, "ref": ref, "idempotency_key": key})
    while True:
        event = await client.event()
        if event["type"] in ("ack", "error"):
            assert event["ref"] == ref, event
            return event


@asynccontextmanager
async def connect_as(url: str, name: str) -> AsyncIterator[WsClient]:
    """Connected under ``name``: a name is unique in a channel, and the gateway the client just
    left may not have said goodbye yet (until it has, the name is taken)."""
    with trio.fail_after(WAIT_SECONDS):
        while True:
            async with ws_client(url, name=name) as client:
                if client.welcome["name"] == name:
                    yield client
                    return
            # Another process's presence: nothing to wait on but asking again.
            await trio.sleep(0.05)


async def test_a_publish_resent_on_another_gateway_is_delivered_once(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    async with ws_client(b.url, name="carol") as carol:
        async with connect_as(a.url, "alice") as alice:
            first = await publish(alice, "deploy 4711 done", "deploy-4711")
            assert first["type"] == "ack"
        # The connection dropped before alice knew: she reconnects elsewhere and resends.
        async with connect_as(b.url, "alice") as alice:
            again = await publish(alice, "deploy 4711 done", "deploy-4711", ref="r2")
            assert again["type"] == "ack" and again["id"] == first["id"]
            # Another client's key space: bob's message with the same key is his own.
            async with connect_as(a.url, "bob") as bob:
                bobs = await publish(bob, "deploy 4711 done", "deploy-4711")
            assert bobs["type"] == "ack" and bobs["id"] != first["id"]
            last = await alice.publish("after")
        got = [(m["id"], m["sender"]) for m in await carol.messages(3)]
        assert got == [(first["id"], "alice"), (bobs["id"], "bob"), (last, "alice")]


async def test_guests_and_channels_have_their_own_keys(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    async with ws_client(a.url) as one, ws_client(b.url) as two, ws_client(a.url) as three:
        # Both may be guest-1: a guest's keys are its connection's, not its name's.
        ids = {(await publish(c, "hi", "same-key"))["id"] for c in (one, two)}
        assert len(ids) == 2
        again = await publish(one, "hi", "same-key")
        assert again["id"] in ids
        await three.send_json({"type": "hello", "channel": "elsewhere"})
        await three.take("welcome")
        other = await publish(three, "hi", "same-key")
        assert other["type"] == "ack" and other["id"] not in ids


@pytest.mark.parametrize("key", ["", "x" * 65, "tab\there", "é", 7, ["k"]])
def test_a_malformed_key_is_bad_command(key: object) -> None:
    frame = json.dumps({"type": "publish", "text": "no", "ref": "k", "idempotency_key": key})
    with pytest.raises(ProtocolError) as refused:
        parse_frame(frame)
    assert (refused.value.code, refused.value.ref) == ("bad_command", "k")


def test_a_key_is_optional_and_printable_ascii_up_to_64() -> None:
    key = "".join(chr(c) for c in range(0x20, 0x7F))[:64]
    frame = {"type": "publish", "text": "yes", "idempotency_key": key}
    assert parse_frame(json.dumps(frame)) == Publish("yes", None, key)
    assert parse_frame('{"type": "publish", "text": "yes"}') == Publish("yes", None, None)


async def test_a_refused_key_publishes_nothing(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, _ = pair
    async with ws_client(a.url, name="alice") as alice, ws_client(a.url, name="carol") as carol:
        refused = await publish(alice, "no", "x" * 65)
        assert (refused["type"], refused["code"]) == ("error", "bad_command")
        last = await alice.publish("yes")
        (message,) = await carol.messages(1)
        assert (message["id"], message["text"]) == (last, "yes")
