"""The server API of two gateways sharing a real Redis (RedisBus, RedisPresence and
RedisIdempotency; each "gateway" is a ServerApi with its own connections, in one process).

The cluster promises: an idempotency key is recognised on any gateway, a disconnect reaches
every gateway, info and channels are cluster-wide, and a Redis outage is a 503 to retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from broadcast.api import RedisIdempotency
from broadcast.api.idempotency import CLAIM_SECONDS, KEY_PREFIX
from broadcast.bus.redis_bus import RedisBus
from broadcast.presence import RedisPresence
from tests.support.redis_server import RedisServer
from tests.test_api_support import WAIT_SECONDS, Served, api, serve_api


@asynccontextmanager
async def two_gateways(redis: RedisServer) -> AsyncIterator[tuple[Served, Served]]:
    async with trio.open_nursery() as nursery:
        served = []
        for node in ("gw-a", "gw-b"):

            async def one(node: str = node, *, task_status: trio.TaskStatus[Served]) -> None:
                async with serve_api(
                    bus=RedisBus(redis.url),
                    presence=RedisPresence(redis.url, on_expired=lambda *args: None),
                    idempotency=RedisIdempotency(redis.url),
                    node_id=node,
                ) as gateway:
                    task_status.started(gateway)
                    await trio.sleep_forever()

            served.append(await nursery.start(one))
        yield served[0], served[1]
        nursery.cancel_scope.cancel()


async def wait_for_each_other(a: Served, b: Served) -> None:
    """Until each gateway heard the other's heartbeat on the control channel."""
    with trio.fail_after(WAIT_SECONDS):
        await a.api.cluster.wait_for_gateways(2)
        await b.api.cluster.wait_for_gateways(2)


async def test_idempotency_key_is_recognised_on_another_gateway(redis_server: RedisServer) -> None:
    async with two_gateways(redis_server) as (a, b):
        body = {"channel": "orders", "text": "order 7 shipped", "idempotency_key": "order-7"}
        first = await api(a.port, "POST", "/api/publish", body)
        again = await api(b.port, "POST", "/api/publish", body)
        assert first.status == again.status == 200
        assert first.json()["id"] == again.json()["id"]
        history = (await api(b.port, "GET", "/api/history?channel=orders")).json()
        assert [m["text"] for m in history["messages"]] == ["order 7 shipped"]


async def test_concurrent_duplicates_on_two_gateways_publish_once(
    redis_server: RedisServer,
) -> None:
    async with two_gateways(redis_server) as (a, b):
        body = {"channel": "orders", "text": "racing", "idempotency_key": "race"}
        ids: list[str] = []

        async def publish(port: int) -> None:
            answer = await api(port, "POST", "/api/publish", body)
            assert answer.status == 200, answer.body
            ids.append(answer.json()["id"])

        async with trio.open_nursery() as nursery:
            for port in (a.port, b.port, a.port, b.port):
                nursery.start_soon(publish, port)
        assert len(set(ids)) == 1
        history = (await api(a.port, "GET", "/api/history?channel=orders")).json()
        assert len(history["messages"]) == 1


async def test_disconnect_reaches_every_gateway(redis_server: RedisServer) -> None:
    async with two_gateways(redis_server) as (a, b):
        a.host.sessions.update(mallory=1, alice=1)
        b.host.sessions.update(mallory=2)
        await wait_for_each_other(a, b)
        answer = await api(a.port, "POST", "/api/disconnect", {"name": "mallory"})
        assert answer.json() == {"disconnected": 3, "gateways": 2}
        assert [c[:2] for c in a.host.closed + b.host.closed] == [("mallory", 4003)] * 2
        info = (await api(b.port, "GET", "/api/info")).json()
        assert info["node"] == "gw-b"
        assert sorted(g["node"] for g in info["gateways"]) == ["gw-a", "gw-b"]


async def test_channels_and_presence_are_cluster_wide(redis_server: RedisServer) -> None:
    async with two_gateways(redis_server) as (a, b):
        await a.host.presence.enter("lobby", "gw-a/1", "alice")
        await b.host.presence.enter("lobby", "gw-b/1", "bob")
        await b.host.presence.enter("ops", "gw-b/2", "alice")
        members = (await api(a.port, "GET", "/api/presence?channel=lobby")).json()["members"]
        assert members == ["alice", "bob"]
        channels = (await api(a.port, "GET", "/api/channels")).json()["channels"]
        assert channels == {"lobby": 2, "ops": 1}


async def test_redis_down_is_a_503_to_retry(redis_server: RedisServer) -> None:
    async with two_gateways(redis_server) as (a, _):
        redis_server.stop()
        body = {"channel": "news", "text": "lost?", "idempotency_key": "k"}
        answer = await api(a.port, "POST", "/api/publish", body)
        assert answer.status == 503 and answer.code == "bus_unavailable"
        assert answer.headers[b"retry-after"] == b"1"
        presence = await api(a.port, "GET", "/api/presence?channel=news")
        assert presence.status == 503


async def test_a_claim_expires_soon_an_answer_after_the_window(redis_server: RedisServer) -> None:
    """A gateway that dies between claim and answer blocks the key for CLAIM_SECONDS only."""
    store = RedisIdempotency(redis_server.url)
    redis = redis_server.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert await store.claim("publish:k") is None
        claim_ttl = redis.pttl(KEY_PREFIX + "publish:k")
        assert 0 < claim_ttl <= CLAIM_SECONDS * 1000
        await store.complete("publish:k", "1-0")
        assert redis.pttl(KEY_PREFIX + "publish:k") > CLAIM_SECONDS * 1000
        assert await store.claim("publish:k") == "1-0"
        await store.release("publish:k")
        assert redis.exists(KEY_PREFIX + "publish:k") == 0
        nursery.cancel_scope.cancel()
