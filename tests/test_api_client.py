"""The Python clients of the server API (broadcast.client.api), end to end against a live
server: the sync one, and the async one under trio and under asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from broadcast.client.api import ApiError, AsyncBroadcastApi, BroadcastApi
from broadcast.client.command import main
from tests.test_api_support import KEY, Served, in_thread, lossy_proxy, serve_api_in_thread


@pytest.fixture
def server() -> Iterator[Served]:
    with serve_api_in_thread() as served:
        yield served


def test_sync_client_does_everything(server: Served) -> None:
    with BroadcastApi(server.url, KEY, timeout=5) as client:
        first = client.publish("news", "deploy finished", sender="ci")
        ids = client.broadcast(["news", "ops"], "all hands")
        assert set(ids) == {"news", "ops"}
        history = client.history("news")
        assert [(m.id, m.sender, m.text) for m in history.messages] == [
            (first, "ci", "deploy finished"),
            (ids["news"], "api", "all hands"),
        ]
        assert history.complete
        assert [m.id for m in client.history("news", since=first).messages] == [ids["news"]]
        assert [m.id for m in client.history("news", limit=1).messages] == [ids["news"]]
        assert client.presence("news") == []
        assert client.channels() == {}
        info = client.info()
        assert info.node == "api-test" and [g.node for g in info.gateways] == ["api-test"]
        server.host.sessions["mallory"] = 2
        assert client.disconnect("mallory") == 2


def test_sync_client_raises_api_errors_with_the_code(server: Served) -> None:
    with BroadcastApi(server.url, KEY) as client:
        with pytest.raises(ApiError) as refused:
            client.publish("no spaces", "x")
        assert (refused.value.code, refused.value.status) == ("bad_channel", 400)
    with BroadcastApi(server.url, "wrong-key-0123456789") as client:
        with pytest.raises(ApiError) as refused:
            client.info()
        assert (refused.value.code, refused.value.status) == ("unauthorized", 401)
    with BroadcastApi("http://127.0.0.1:1", KEY, retries=1, timeout=1) as client:
        with pytest.raises(ApiError) as refused:
            client.info()
        assert refused.value.code == "unreachable"


def test_sync_retry_after_a_lost_answer_publishes_once(server: Served) -> None:
    with (
        in_thread(lambda: lossy_proxy(server.port, lose=2)) as port,
        BroadcastApi(f"http://127.0.0.1:{port}", KEY, retries=3) as client,
    ):
        message_id = client.publish("orders", "order 42 shipped")
    with BroadcastApi(server.url, KEY) as direct:
        assert [m.id for m in direct.history("orders").messages] == [message_id]
    # The proxy does lose answers: one retry is not enough for two lost ones.
    with (
        in_thread(lambda: lossy_proxy(server.port, lose=2)) as port,
        BroadcastApi(f"http://127.0.0.1:{port}", KEY, retries=1) as client,
        pytest.raises(ApiError, match="unreachable"),
    ):
        client.publish("lost", "twice")


async def test_async_client_under_trio(server: Served) -> None:
    async with AsyncBroadcastApi(server.url, KEY) as client:
        message_id = await client.publish("news", "from trio", idempotency_key="trio-1")
        assert await client.publish("news", "again", idempotency_key="trio-1") == message_id
        history = await client.history("news")
        assert [(m.id, m.text) for m in history.messages] == [(message_id, "from trio")]
        assert (await client.info()).connections == 0
        with pytest.raises(ApiError) as refused:
            await client.broadcast([], "nobody")
        assert refused.value.code == "bad_channel"


async def test_async_retry_after_a_lost_answer_publishes_once_under_trio(server: Served) -> None:
    async with (
        lossy_proxy(server.port, lose=1) as port,
        AsyncBroadcastApi(f"http://127.0.0.1:{port}", KEY) as client,
    ):
        ids = await client.broadcast(["a", "b"], "once each")
    async with AsyncBroadcastApi(server.url, KEY) as direct:
        for channel in ("a", "b"):
            history = await direct.history(channel)
            assert [m.id for m in history.messages] == [ids[channel]]


def test_async_client_under_asyncio(server: Served) -> None:
    async def main() -> tuple[str, list[str], int]:
        async with AsyncBroadcastApi(server.url, KEY) as client:
            message_id = await client.publish("news", "from asyncio")
            texts = [m.text for m in (await client.history("news")).messages]
            return message_id, texts, await client.disconnect("nobody")

    message_id, texts, disconnected = asyncio.run(main())
    assert message_id and texts == ["from asyncio"] and disconnected == 0


def test_cli_publish_for_shell_scripts(server: Served, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"BROADCAST_API_KEY": KEY}
    argv = ["publish", "--url", server.url, "--idempotency-key", "job-1", "news", "nightly ok"]
    assert main(argv, environ) == 0
    message_id = capsys.readouterr().out.strip()
    assert main(argv, environ) == 0  # the same job again: the same message
    assert capsys.readouterr().out.strip() == message_id
    with BroadcastApi(server.url, KEY) as client:
        assert [(m.id, m.text) for m in client.history("news").messages] == [
            (message_id, "nightly ok")
        ]
    assert main(["publish", "--url", server.url, "bad channel", "x"], environ) == 1
    assert "bad_channel" in capsys.readouterr().err
    assert main(["publish", "--url", server.url, "news", "x"], {}) == 2
    assert "BROADCAST_API_KEY" in capsys.readouterr().err
    wrong = {"BROADCAST_API_KEY": "wrong-key-0123456789"}
    assert main(["publish", "--url", server.url, "news", "x"], wrong) == 1
    assert "unauthorized" in capsys.readouterr().err
