"""Three real gateway processes on one private redis-server: what a cluster's users see."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from broadcast.protocol.envelope import parse_id
from tests.support.clients import WAIT_SECONDS, WsClient, line_client, ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[list[GatewayProcess]]:
    gateways: list[GatewayProcess] = []
    try:
        for number in range(3):
            gateways.append(GatewayProcess(redis_url=redis_server.url, node_id=f"gw{number}"))
        yield gateways
    finally:
        for gateway in gateways:
            gateway.kill()


async def test_clients_on_every_gateway_see_each_other(cluster: list[GatewayProcess]) -> None:
    a, b, c = cluster
    async with (
        ws_client(a.url, name="alice") as alice,
        ws_client(b.url, name="bob") as bob,
        line_client(c.port) as carol,
    ):
        assert {alice.welcome["node"], bob.welcome["node"]} == {"gw0", "gw1"}
        await carol.send_line("/name carol")
        await alice.publish("from gw0")
        await bob.publish("from gw1")
        await carol.send_line("from gw2")
        assert [m["text"] for m in await bob.messages(2)] == ["from gw0", "from gw2"]
        assert [m["text"] for m in await alice.messages(2)] == ["from gw1", "from gw2"]
        got = [await carol.line_not_starting("* ") for _ in range(2)]
        assert got == ["alice: from gw0", "bob: from gw1"]


async def test_one_order_at_every_client_with_concurrent_senders(
    cluster: list[GatewayProcess],
) -> None:
    """Senders on three nodes publish at once; every listener on every node sees one order."""
    per_sender = 60
    listeners: dict[str, list[str]] = {}

    async def listen(client: WsClient, key: str) -> None:
        listeners[key] = [m["id"] for m in await client.messages(3 * per_sender)]

    async def send(client: WsClient, tag: str) -> None:
        for i in range(per_sender):
            await client.publish(f"{tag}-{i}")

    async with (
        ws_client(cluster[0].url, name="s0") as s0,
        ws_client(cluster[1].url, name="s1") as s1,
        ws_client(cluster[2].url, name="s2") as s2,
        ws_client(cluster[0].url, name="l0") as l0,
        ws_client(cluster[1].url, name="l1") as l1,
        ws_client(cluster[2].url, name="l2") as l2,
        trio.open_nursery() as nursery,
    ):
        for key, listener in (("l0", l0), ("l1", l1), ("l2", l2)):
            nursery.start_soon(listen, listener, key)
        for tag, sender in (("s0", s0), ("s1", s1), ("s2", s2)):
            nursery.start_soon(send, sender, tag)
    orders = list(listeners.values())
    assert len(orders[0]) == 3 * per_sender
    assert orders[0] == orders[1] == orders[2]
    assert [parse_id(i) for i in orders[0]] == sorted({parse_id(i) for i in orders[0]})


async def test_redis_monitor_shows_readable_json(
    cluster: list[GatewayProcess], redis_server: RedisServer
) -> None:
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("redis-cli is not installed")
    monitor = await trio.lowlevel.open_process(
        [redis_cli, "-p", str(redis_server.port), "monitor"], stdout=subprocess.PIPE
    )
    output = b""

    async def read_until(needle: bytes) -> None:
        nonlocal output
        with trio.fail_after(WAIT_SECONDS):
            while needle not in output:
                output += await monitor.stdout.receive_some(65536)

    try:
        await read_until(b"OK\n")
        async with ws_client(cluster[0].url, name="mon") as client:
            await client.publish("visible in monitor")
        await read_until(b"visible in monitor")
        await read_until(b"\n")
        line = next(
            x for x in output.decode().splitlines() if '"PUBLISH"' in x and "visible in" in x
        )
        payload = line.rsplit('" "', 1)[1].removesuffix('"')
        event = json.loads(payload.encode().decode("unicode_escape"))
        assert event["type"] == "message"
        assert (event["sender"], event["text"]) == ("mon", "visible in monitor")
        assert {"id", "channel", "ts", "origin"} <= event.keys()
    finally:
        monitor.kill()
        await monitor.wait()


async def test_sigterm_drains_a_gateway_and_the_rest_carry_on(
    cluster: list[GatewayProcess],
) -> None:
    leaving, staying = cluster[0], cluster[1]
    async with ws_client(staying.url, name="stays") as stays:
        async with open_websocket_url(leaving.url) as doomed:
            json.loads(await doomed.get_message())
            leaving.signal(signal.SIGTERM)
            with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await doomed.get_message()
            assert closed.value.reason.code == 1012
        assert await trio.to_thread.run_sync(leaving.process.wait, WAIT_SECONDS) == 0
        async with ws_client(cluster[2].url, name="other") as other:
            await other.publish("still here")
            assert (await stays.expect("message"))["text"] == "still here"
