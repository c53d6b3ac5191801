"""The server API end to end: real gateway processes with ``--api-key`` on a real Redis, and
the clients people use (WebSocket, lines) on every gateway.

These need the gateway to host ServerApi (Gateway(api=ApiOptions), docs/api.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from trio_websocket import ConnectionClosed

from broadcast.client.api import BroadcastApi
from broadcast.protocol.envelope import parse_id
from tests.support.clients import WAIT_SECONDS, line_client, ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer, free_port
from tests.test_api_support import KEY, api, call

pytestmark = pytest.mark.cluster


@pytest.fixture
def pair(redis_server: RedisServer) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    gateways: list[GatewayProcess] = []
    try:
        for node in ("gw-a", "gw-b"):
            gateways.append(
                GatewayProcess(redis_url=redis_server.url, node_id=node, extra=("--api-key", KEY))
            )
        yield gateways[0], gateways[1]
    finally:
        for gateway in gateways:
            gateway.kill()


async def test_api_publish_reaches_clients_on_every_gateway_in_one_order(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    async with ws_client(a.url, name="alice") as alice, line_client(b.port) as carol:
        await carol.send_line("/name carol")
        first = await alice.publish("one")
        body = {"channel": "general", "text": "from the api", "sender": "deploy"}
        answer = await api(b.port, "POST", "/api/publish", body)
        assert answer.status == 200, answer.body
        middle = answer.json()["id"]
        last = await alice.publish("two")
        (message,) = await alice.messages(1)
        assert (message["id"], message["sender"], message["text"]) == (
            middle, "deploy", "from the api"
        )  # fmt: skip
        assert parse_id(first) < parse_id(middle) < parse_id(last)
        got = [await carol.line_not_starting("* ") for _ in range(3)]
        assert got == ["alice: one", "deploy: from the api", "alice: two"]
        history = (await api(a.port, "GET", "/api/history?channel=general")).json()
        assert [m["id"] for m in history["messages"]] == [first, middle, last]
        presence = (await api(b.port, "GET", "/api/presence?channel=general")).json()
        assert presence["members"] == ["alice", "carol"]


async def test_idempotent_retry_on_another_gateway_publishes_once(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    async with line_client(a.port) as carol:
        body = {"channel": "general", "text": "order 42 shipped", "idempotency_key": "o42"}
        first = await api(a.port, "POST", "/api/publish", body)
        retry = await api(b.port, "POST", "/api/publish", body)
        assert first.json() == retry.json()
        await api(b.port, "POST", "/api/publish", {"channel": "general", "text": "after"})
        got = [await carol.line_not_starting("* ") for _ in range(2)]
        assert got == ["api: order 42 shipped", "api: after"]


async def test_disconnect_closes_the_users_clients_on_every_gateway(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    async with (
        ws_client(a.url, name="mallory") as on_a,
        ws_client(b.url, name="mallory", channel="elsewhere") as on_b,
        ws_client(b.url, name="alice") as alice,
    ):
        with trio.fail_after(WAIT_SECONDS):  # both gateways have heard each other
            # Another process: nothing to wait on but asking.
            while len((await api(a.port, "GET", "/api/info")).json()["gateways"]) < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
        answer = await api(a.port, "POST", "/api/disconnect", {"name": "mallory"})
        assert answer.json() == {"disconnected": 2, "gateways": 2}
        for client in (on_a, on_b):
            with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await client.ws.get_message()
            assert closed.value.reason.code == 4003
        await alice.publish("still here")


async def test_no_key_wrong_key_and_huge_bodies_are_refused(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, _ = pair
    body = {"channel": "general", "text": "spoofed"}
    assert (await api(a.port, "POST", "/api/publish", body, key=None)).status == 401
    wrong = await api(a.port, "POST", "/api/publish", body, key="wrong-key-0123456789")
    assert wrong.status == 401 and wrong.code == "unauthorized"
    head = (
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: 50000000\r\n\r\n"
    ).encode()
    huge = await call(a.port, head)
    assert huge.status == 413 and huge.code == "payload_too_large"
    history = (await api(a.port, "GET", "/api/history?channel=general")).json()
    assert history["messages"] == []
    log = "".join(a.log)
    assert KEY not in log and "wrong-key" not in log
    assert "api POST /api/publish refused: 401" in log


def test_sync_client_and_metrics_through_a_gateway(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, _ = pair
    with BroadcastApi(f"http://127.0.0.1:{a.port}", KEY) as client:
        ids = client.broadcast(["news", "ops"], "hello")
        assert [m.id for m in client.history("ops").messages] == [ids["ops"]]
        assert client.info().node == "gw-a"
    metrics = trio.run(api, a.port, "GET", "/metrics")
    assert b'broadcast_api_requests_total{route="/api/broadcast",status="200"}' in metrics.body


def test_api_listen_moves_the_api_off_the_clients_port() -> None:
    internal = free_port()
    gateway = GatewayProcess(
        node_id="solo", extra=("--api-key", KEY, "--api-listen", f"127.0.0.1:{internal}")
    )
    try:
        public = trio.run(api, gateway.port, "GET", "/api/info")
        assert public.status == 404
        private = trio.run(api, internal, "GET", "/api/info")
        assert private.status == 200 and private.json()["node"] == "solo"
    finally:
        gateway.terminate()
