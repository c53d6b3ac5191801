"""A gateway under faults and hostile clients: idle and half-open connections, slow handshakes,
floods of connections, and Redis going away under traffic. Real sockets, a real redis-server."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from trio_websocket import ConnectionClosed

from broadcast.bus.memory import MemoryBus
from broadcast.bus.redis_bus import RedisBus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.server import Gateway
from tests.support.clients import WAIT_SECONDS, LineClient, ws_client
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(nursery: trio.Nursery) -> AsyncIterator[StartGateway]:
    async def start(bus: object = None, **options: object) -> Gateway:
        gateway = Gateway(bus or MemoryBus(), node_id="gw-faults", **options)  # type: ignore[arg-type]
        await nursery.start(gateway.run)
        await wait_until(lambda: gateway.ready)
        return gateway

    yield start
    nursery.cancel_scope.cancel()


async def raw_websocket(port: int) -> trio.SocketStream:
    """A WebSocket handshake by hand, then a client that never says anything again."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return stream


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(WAIT_SECONDS):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_silent_websocket_is_pinged_then_closed_as_idle(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(idle_timeout=0.6)
    stream = await raw_websocket(gateway.port)
    async with stream:
        data = await read_to_eof(stream)
    assert b"\x89\x09keepalive" in data  # the ping
    assert data.endswith(b"\x88\x18" + (4010).to_bytes(2, "big") + b"idle: no reply to ping")
    assert gateway.stats.errors["idle_timeout"] == 1


async def test_client_that_answers_pings_stays(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(idle_timeout=0.6)
    async with ws_client(f"ws://127.0.0.1:{gateway.port}/", name="alive") as alive:
        # trio-websocket answers pings by itself; outlive several idle timeouts.
        with trio.move_on_after(2.0):
            while (await alive.event())["type"] == "presence_diff":  # its own arrival
                pass
            pytest.fail("nothing else should arrive")
        await alive.publish("still connected")
    assert gateway.stats.errors["idle_timeout"] == 0


async def test_slow_handshake_is_dropped(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(handshake_timeout=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert await read_to_eof(stream) == b""
    assert gateway.stats.errors["handshake_timeout"] == 1


async def test_connection_flood_meets_a_clear_refusal(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(max_connections=2)
    url = f"ws://127.0.0.1:{gateway.port}/"
    async with ws_client(url, name="one") as one, ws_client(url, name="two"):
        stream = await raw_websocket(gateway.port)
        async with stream:
            reply = await read_to_eof(stream)
        assert reply.startswith(b"HTTP/1.1 503")
        assert b"gateway is full" in reply
        nc = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        async with nc:
            await nc.send_all(b"hello\n")
            assert (await read_to_eof(nc)).startswith(b"! server_full:")
        await one.publish("the admitted are unaffected")
    assert gateway.stats.errors["server_full"] == 2


async def test_redis_outage_under_traffic(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    """Redis stops: the gateway stays up, clients stay connected, publishes are refused clearly,
    /readyz says not ready; Redis returns: readiness and delivery come back by themselves."""
    gateway = await start_gateway(RedisBus(redis_server.url, command_timeout=1.0))
    url = f"ws://127.0.0.1:{gateway.port}/"
    async with ws_client(url, name="a") as a, ws_client(url, name="b") as b:
        await a.publish("before")
        assert (await b.expect("message"))["text"] == "before"

        redis_server.stop()
        await a.send_json({"type": "publish", "text": "during", "ref": "d"})
        error = await a.expect("error")
        assert (error["code"], error["ref"]) == ("bus_unavailable", "d")
        await wait_until(lambda: not gateway.ready)

        redis_server.start()
        await wait_until(lambda: gateway.ready)
        # Redis came back empty: what it held is gone, and clients are told so.
        assert (await b.expect("gap"))["channel"] == "general"
        await a.publish("after")
        assert (await b.expect("message"))["text"] == "after"
    assert gateway.stats.publish_failures >= 1


async def test_line_client_keeps_its_connection_through_an_outage(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gateway = await start_gateway(RedisBus(redis_server.url, command_timeout=1.0))
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream, ws_client(f"ws://127.0.0.1:{gateway.port}/", name="web") as web:
        nc = LineClient(stream)
        await nc.send_line("")
        assert (await nc.line()).startswith("* welcome")
        redis_server.stop()
        await nc.send_line("into the void")
        assert (await nc.line_not_starting("* ")).startswith("! bus_unavailable:")
        redis_server.start()
        await wait_until(lambda: gateway.ready)
        await nc.send_line("back again")
        assert (await web.expect("message"))["text"] == "back again"


async def test_websocket_close_by_the_client_is_answered(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    async with ws_client(f"ws://127.0.0.1:{gateway.port}/") as client:
        await client.ws.aclose(code=1000)
        with pytest.raises(ConnectionClosed):
            await client.ws.get_message()
        assert client.ws.closed.code == 1000
    await wait_until(lambda: gateway.stats.connections_open == 0)


async def test_flooding_client_is_throttled_and_others_are_not(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(access=AccessPolicy(message_rate=1, message_burst=3))
    url = f"ws://127.0.0.1:{gateway.port}/"
    async with ws_client(url, name="flood") as flood, ws_client(url, name="calm") as calm:
        for i in range(3):
            await flood.publish(f"burst {i}")
        await flood.send_json({"type": "publish", "text": "one too many", "ref": "x"})
        error = await flood.expect("error", skip=("join", "leave", "message"))
        assert (error["code"], error["ref"]) == ("rate_limited", "x")
        assert "try again in" in error["message"]
        await calm.publish("calm is unaffected")
        assert [m["text"] for m in await flood.messages(1)] == ["calm is unaffected"]
    assert gateway.stats.errors["rate_limited"] == 1
