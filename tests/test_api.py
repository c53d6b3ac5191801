"""The server API on a real socket, with a real MemoryBus, hub and presence (test_api_support).

What a client of the API can rely on: publishes go through the bus as client frames, an
idempotency key publishes once, refusals have one JSON shape with stable codes, bodies are
bounded before they are read, and the key is never logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from broadcast.api import ApiCollector, ApiKeys, MemoryIdempotency
from broadcast.api.cluster import CONTROL_CHANNEL
from broadcast.api.http import MAX_BODY_BYTES
from broadcast.api.idempotency import IdempotencyPending
from broadcast.api.limits import MAX_TRACKED_ADDRESSES, ApiLimits, ApiRates, peer_address
from broadcast.api.openapi import openapi_document
from broadcast.api.options import parse_listen
from broadcast.protocol.errors import CloseCode
from broadcast.protocol.http_request import RequestHeadParser
from broadcast.security import PrefixedStream
from tests.test_api_support import (
    KEY,
    WAIT_SECONDS,
    Answer,
    Served,
    api,
    call,
    parse_answer,
    request_bytes,
    serve_api,
)

ROOT = Path(__file__).resolve().parent.parent


async def test_publish_goes_through_the_bus_as_a_client_frame() -> None:
    async with serve_api() as served:
        seen: list[bytes] = []
        served.host.hub.watch("news", seen.append)
        await served.host.bus.subscribe("news")
        answer = await api(served.port, "POST", "/api/publish", {"channel": "news", "text": "hi"})
        assert answer.status == 200, answer.body
        message_id = answer.json()["id"]
        assert answer.headers[b"content-type"] == b"application/json"
        (payload,) = seen
        frame = json.loads(payload)
        assert frame["type"] == "message" and frame["id"] == message_id
        assert (frame["channel"], frame["sender"], frame["text"]) == ("news", "api", "hi")
        assert frame["origin"] == "api-test/api"


async def test_sender_multiline_text_and_history() -> None:
    async with serve_api() as served:
        ids = []
        for text in ("one", "two\nlines", "three"):
            body = {"channel": "log", "text": text, "sender": "deploy bot"}
            ids.append((await api(served.port, "POST", "/api/publish", body)).json()["id"])
        history = (await api(served.port, "GET", "/api/history?channel=log")).json()
        assert [m["id"] for m in history["messages"]] == ids
        assert [m["text"] for m in history["messages"]] == ["one", "two\nlines", "three"]
        assert {m["sender"] for m in history["messages"]} == {"deploy bot"}
        assert history["complete"] is True
        after = (await api(served.port, "GET", f"/api/history?channel=log&since={ids[0]}")).json()
        assert [m["id"] for m in after["messages"]] == ids[1:]
        newest = (await api(served.port, "GET", "/api/history?channel=log&limit=1")).json()
        assert [m["id"] for m in newest["messages"]] == ids[2:]
        assert newest["complete"] is False


async def test_idempotency_key_publishes_once() -> None:
    async with serve_api() as served:
        body = {"channel": "orders", "text": "order 42 shipped", "idempotency_key": "order-42"}
        first = (await api(served.port, "POST", "/api/publish", body)).json()["id"]
        again = (await api(served.port, "POST", "/api/publish", body)).json()["id"]
        other = {**body, "idempotency_key": "order-43"}
        third = (await api(served.port, "POST", "/api/publish", other)).json()["id"]
        assert first == again != third
        history = (await api(served.port, "GET", "/api/history?channel=orders")).json()
        assert [m["id"] for m in history["messages"]] == [first, third]


async def test_concurrent_duplicates_publish_once() -> None:
    async with serve_api() as served:
        body = {"channel": "orders", "text": "once", "idempotency_key": "same"}
        ids: list[str] = []

        async def publish() -> None:
            ids.append((await api(served.port, "POST", "/api/publish", body)).json()["id"])

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(publish)
        assert len(ids) == 5 and len(set(ids)) == 1
        history = (await api(served.port, "GET", "/api/history?channel=orders")).json()
        assert len(history["messages"]) == 1


async def test_broadcast_publishes_to_each_channel_once() -> None:
    async with serve_api() as served:
        body = {"channels": ["a", "b", "a"], "text": "to all", "idempotency_key": "k1"}
        answer = await api(served.port, "POST", "/api/broadcast", body)
        ids = answer.json()["ids"]
        assert sorted(ids) == ["a", "b"]
        assert (await api(served.port, "POST", "/api/broadcast", body)).json()["ids"] == ids
        for channel in ("a", "b"):
            history = (await api(served.port, "GET", f"/api/history?channel={channel}")).json()
            assert [m["id"] for m in history["messages"]] == [ids[channel]]


async def test_presence_channels_and_info() -> None:
    async with serve_api() as served:
        presence = served.host.presence
        await presence.enter("lobby", "n/1", "alice")
        await presence.enter("lobby", "n/2", "bob")
        await presence.enter("lobby", "n/3", "alice")
        await presence.enter("ops", "n/4", "carol")
        served.host.sessions.update(alice=2, bob=1, carol=1)
        answer = (await api(served.port, "GET", "/api/presence?channel=lobby")).json()
        assert answer == {"channel": "lobby", "members": ["alice", "bob"]}
        channels = (await api(served.port, "GET", "/api/channels")).json()
        assert channels == {"channels": {"lobby": 2, "ops": 1}}
        info = (await api(served.port, "GET", "/api/info")).json()
        assert info["node"] == "api-test" and info["connections"] == 4
        assert [(g["node"], g["connections"]) for g in info["gateways"]] == [("api-test", 4)]


async def test_disconnect_closes_the_users_sessions_with_4003() -> None:
    async with serve_api() as served:
        served.host.sessions.update(mallory=2, alice=1)
        answer = await api(served.port, "POST", "/api/disconnect", {"name": "mallory"})
        assert answer.json() == {"disconnected": 2, "gateways": 1}
        assert served.host.closed == [
            ("mallory", CloseCode.DISCONNECTED, "disconnected by the server API")
        ]
        assert served.host.sessions == {"alice": 1}


@pytest.mark.parametrize(
    ("headers", "key"),
    [({}, None), ({}, "wrong-key-0123456789"), ({"X-API-Key": "wrong-key-0123456789"}, None)],
)
async def test_missing_or_wrong_key_is_refused_and_not_logged(
    headers: dict[str, str], key: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve_api() as served:
        body = {"channel": "news", "text": "spoof"}
        data = request_bytes("POST", "/api/publish", body, key=key, headers=headers)
        answer = await call(served.port, data)
        assert answer.status == 401 and answer.code == "unauthorized"
        assert answer.headers[b"www-authenticate"].startswith(b"Bearer")
        history = (await api(served.port, "GET", "/api/history?channel=news")).json()
        assert history["messages"] == []
    assert "api POST /api/publish refused: 401 unauthorized" in caplog.text
    assert "wrong-key" not in caplog.text and KEY not in caplog.text


async def test_x_api_key_header_works() -> None:
    async with serve_api() as served:
        data = request_bytes("GET", "/api/info", key=None, headers={"X-API-Key": KEY})
        assert (await call(served.port, data)).status == 200


async def test_api_is_off_without_keys() -> None:
    async with serve_api(keys=()) as served:
        answer = await api(served.port, "POST", "/api/publish", {"channel": "a", "text": "b"})
        assert answer.status == 404 and answer.code == "not_found"


async def test_huge_body_is_refused_without_reading_it() -> None:
    async with serve_api() as served:
        head = (
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {100 * MAX_BODY_BYTES}\r\n\r\n"
        ).encode()
        # Only the head is sent: the answer comes before (and without) the body.
        answer = await call(served.port, head)
        assert answer.status == 413 and answer.code == "payload_too_large"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (request_bytes("POST", "/api/publish", b"{nope"), 400, "bad_json"),
        (request_bytes("POST", "/api/publish", b"[1]"), 400, "bad_json"),
        (request_bytes("POST", "/api/publish", {"channel": "a"}), 400, "bad_command"),
        (request_bytes("POST", "/api/publish", {"channel": "a", "text": "b", "x": 1}), 400,
         "bad_command"),
        (request_bytes("POST", "/api/publish", {"channel": "a:b", "text": "b"}), 400,
         "bad_channel"),
        (request_bytes("POST", "/api/publish", {"channel": "a", "text": "\x1b[2J"}), 400,
         "bad_text"),
        (request_bytes("POST", "/api/publish", {"channel": "a", "text": "x" * 5000}), 400,
         "text_too_long"),
        (request_bytes("POST", "/api/publish", {"channel": "a", "text": "b", "sender": "a:b"}),
         400, "bad_name"),
        (request_bytes("POST", "/api/publish", {"channel": "a", "text": "b",
                                                "idempotency_key": "no spaces"}), 400,
         "bad_command"),
        (request_bytes("POST", "/api/broadcast", {"channels": [], "text": "b"}), 400,
         "bad_channel"),
        (request_bytes("GET", "/api/history?channel=a&limit=0"), 400, "bad_command"),
        (request_bytes("GET", "/api/history?channel=a&limit=" + "9" * 5000), 400, "bad_command"),
        (request_bytes("GET", "/api/history?channel=a&since=x"), 400, "bad_command"),
        (request_bytes("GET", "/api/history?channel=a&channel=b"), 400, "bad_command"),
        (request_bytes("GET", "/api/presence"), 400, "bad_command"),
        (request_bytes("GET", "/api/publish"), 405, "method_not_allowed"),
        (request_bytes("GET", "/api/nothing"), 404, "not_found"),
        (b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
         + b"\r\nContent-Type: application/json\r\n\r\n", 411, "length_required"),
        (b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
         + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"2\r\n{}\r\n0\r\n\r\n", 411, "length_required"),
        (request_bytes("POST", "/api/publish", {"channel": "a", "text": "b"},
                       headers={"Content-Type": "text/plain"}).replace(
             b"Content-Type: application/json\r\n", b""), 415, "unsupported_media_type"),
    ],
)  # fmt: skip
async def test_refusals_have_one_shape_and_stable_codes(
    data: bytes, status: int, code: str
) -> None:
    async with serve_api() as served:
        answer = await call(served.port, data)
        assert (answer.status, answer.code) == (status, code), answer.body
        assert set(answer.json()) == {"error"} and answer.json()["error"]["message"]
        if status == 405:
            assert answer.headers[b"allow"] == b"POST"


async def test_metrics_count_requests_by_route_and_status() -> None:
    async with serve_api() as served:
        await api(served.port, "GET", "/api/info")
        await api(served.port, "GET", "/api/info", key=None)
        await api(served.port, "GET", "/api/whatever")
        registry = CollectorRegistry()
        registry.register(ApiCollector(served.api))
        text = generate_latest(registry).decode()
    assert 'broadcast_api_requests_total{route="/api/info",status="200"} 1.0' in text
    assert 'broadcast_api_requests_total{route="/api/info",status="401"} 1.0' in text
    assert 'broadcast_api_requests_total{route="other",status="404"} 1.0' in text


async def test_openapi_is_served_and_kept_in_docs() -> None:
    document = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert document == openapi_document(), (
        "run: python -m broadcast.api.openapi > docs/openapi.json"
    )
    async with serve_api() as served:
        answer = await api(served.port, "GET", "/api/openapi.json", key=None)
        assert answer.status == 200 and answer.json() == document


async def test_control_channel_cannot_be_joined_by_clients() -> None:
    from broadcast.protocol.errors import ProtocolError
    from broadcast.protocol.validate import check_channel

    with pytest.raises(ProtocolError):
        check_channel(CONTROL_CHANNEL)


async def test_memory_idempotency_expires_and_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryIdempotency(window=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert await store.claim("k") is None
        await store.complete("k", "1-0")
        assert await store.claim("k") == "1-0"
        await trio.sleep(61)
        assert await store.claim("k") is None  # expired: a new publish
        await store.release("k")
        assert await store.claim("k") is None  # released: a new publish
        with pytest.raises(IdempotencyPending):
            await store.claim("k")  # the owner never finished within the wait
        nursery.cancel_scope.cancel()


async def test_memory_idempotency_keeps_a_bounded_number_of_keys() -> None:
    store = MemoryIdempotency(max_keys=3)
    for key in "abcd":
        assert await store.claim(key) is None
        await store.complete(key, f"{key}-id")
    assert [await store.claim(key) for key in "bcd"] == ["b-id", "c-id", "d-id"]
    assert await store.claim("a") is None  # the oldest was forgotten: a new publish


def test_keys_load_from_flags_files_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# ops\nfile-key-0123456789abc\n\n")
    keys = ApiKeys.load(
        ["flag-key-0123456789abc"], [path], environ={"BROADCAST_API_KEY": "env-key-0123456789abc"}
    )
    assert sorted(keys.secrets()) == [
        "env-key-0123456789abc", "file-key-0123456789abc", "flag-key-0123456789abc"
    ]  # fmt: skip
    assert "key-0123" not in repr(keys)
    with pytest.raises(ValueError, match="at least 16"):
        ApiKeys(["short"])
    assert not ApiKeys.load(environ={}).enabled
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError):
        parse_listen("9000")


async def test_a_body_cut_short_is_refused() -> None:
    async with serve_api() as served:
        with trio.fail_after(WAIT_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", served.port)
            async with stream:
                head = request_bytes("POST", "/api/publish", {"channel": "a", "text": "b"})
                await stream.send_all(head[:-5])  # the head and most of the body
                await stream.send_eof()
                received = await stream.receive_some(65536)
        assert b"400 Bad Request" in received and b"bad_json" in received


async def test_with_api_listen_the_clients_port_answers_404() -> None:
    async with serve_api() as served:
        served.api.public = False  # as ApiOptions(listen=...).build does
        stream_a, _ = trio.testing.memory_stream_pair()
        head = RequestHeadParser().feed(request_bytes("GET", "/api/info"))
        assert head is not None
        public = parse_answer(await served.api.respond(head, stream_a))
        assert (public.status, public.code) == (404, "not_found")
        assert (await api(served.port, "GET", "/api/info")).status == 200  # the listener


async def test_expect_100_continue_gets_its_interim_answer() -> None:
    """curl sends ``Expect: 100-continue`` before bodies over 1 KiB and waits for it."""
    async with serve_api() as served:
        body = json.dumps({"channel": "news", "text": "x" * 2000}).encode()
        data = request_bytes("POST", "/api/publish", body, headers={"Expect": "100-continue"})
        head, _, payload = data.partition(b"\r\n\r\n")
        with trio.fail_after(WAIT_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", served.port)
            async with stream:
                await stream.send_all(head + b"\r\n\r\n")
                assert await stream.receive_some(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
                await stream.send_all(payload)
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
        assert parse_answer(received).status == 200


OTHER_KEY = "other-key-0123456789abcdef"


async def respond_from(served: Served, address: str, key: str | None = KEY) -> Answer:
    """One request answered as if it came from ``address``."""
    head = RequestHeadParser().feed(request_bytes("GET", "/api/info", key=key))
    assert head is not None
    stream, _ = trio.testing.memory_stream_pair()
    return parse_answer(await served.api.respond(head, stream, address=address))


async def test_a_key_over_its_rate_gets_429_with_retry_after(
    mock_clock: trio.testing.MockClock,
) -> None:
    rates = ApiRates(per_key_per_second=2, per_key_burst=3)
    async with serve_api(keys=(KEY, OTHER_KEY), rates=rates) as served:
        for _ in range(3):
            assert (await api(served.port, "GET", "/api/info")).status == 200
        limited = await api(served.port, "GET", "/api/info")
        assert (limited.status, limited.code) == (429, "rate_limited")
        assert limited.headers[b"retry-after"] == b"1"  # 0.5 s, rounded up to whole seconds
        assert limited.json()["error"]["retry_after"] == 0.5
        # Each key has its own bucket.
        assert (await api(served.port, "GET", "/api/info", key=OTHER_KEY)).status == 200
        mock_clock.jump(0.5)
        assert (await api(served.port, "GET", "/api/info")).status == 200
        assert (await api(served.port, "GET", "/api/info")).status == 429
        assert served.api.requests["/api/info", 429] == 2


async def test_wrong_keys_lock_an_address_out_before_its_key_is_checked(
    mock_clock: trio.testing.MockClock,
) -> None:
    rates = ApiRates(failed_per_second=1, failed_burst=2)
    async with serve_api(rates=rates) as served:
        wrong = "wrong-key-0123456789"
        for key in (wrong, None):  # a wrong key and no key count alike
            answer = await api(served.port, "POST", "/api/publish", {"channel": "a", "text": "b"},
                               key=key)  # fmt: skip
            assert answer.status == 401
        for key in (wrong, KEY):  # now even the right key is not looked at
            answer = await api(served.port, "GET", "/api/info", key=key)
            assert (answer.status, answer.code) == (429, "rate_limited")
            assert answer.headers[b"retry-after"] == b"1"
            assert answer.json()["error"]["retry_after"] == 1.0
        # Other addresses are not affected; an IPv6 /64 counts as one address.
        assert (await respond_from(served, "192.0.2.7")).status == 200
        for address in ("2001:db8::1", "2001:db8::2"):
            assert (await respond_from(served, address, key=None)).status == 401
        assert (await respond_from(served, "2001:db8::3")).status == 429
        assert (await respond_from(served, "2001:db8:0:1::3")).status == 200
        # The contract stays readable without a key.
        assert (await api(served.port, "GET", "/api/openapi.json", key=None)).status == 200
        mock_clock.jump(1)
        assert (await api(served.port, "GET", "/api/info")).status == 200
        assert (await api(served.port, "GET", "/api/info", key=wrong)).status == 401
        assert (await api(served.port, "GET", "/api/info", key=wrong)).status == 429


async def test_rate_limits_can_be_off(mock_clock: trio.testing.MockClock) -> None:
    rates = ApiRates(per_key_per_second=0, failed_per_second=0)
    async with serve_api(rates=rates) as served:
        for _ in range(30):
            assert (await respond_from(served, "192.0.2.1", key=None)).status == 401
            assert (await respond_from(served, "192.0.2.1")).status == 200
        assert served.api.limits.tracked_addresses() == 0


def test_tracked_addresses_are_bounded() -> None:
    limits = ApiLimits(ApiRates(), clock=lambda: 0.0)
    for n in range(MAX_TRACKED_ADDRESSES + 10):
        limits.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert limits.tracked_addresses() == MAX_TRACKED_ADDRESSES
    # The oldest was forgotten: its allowance is full again.
    assert limits.failed_wait("10.0.0.0") == 0


async def test_peer_address_looks_through_tls_wrappers() -> None:
    async with serve_api() as served:
        with trio.fail_after(WAIT_SECONDS):
            client = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with client:
            assert peer_address(client) == "127.0.0.1"
            assert peer_address(PrefixedStream(b"", client)) == "127.0.0.1"
    stream, _ = trio.testing.memory_stream_pair()
    assert peer_address(stream) == "unknown"
