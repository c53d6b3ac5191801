"""One door (issue 10): every byte a stranger sends is classified, bounded and answered.

Each test is a finding from an attack on a real gateway, replayed over real sockets: a ``POST``
from a web page, a late WebSocket handshake, a rebinding ``Host``, floods of commands, silent
sockets, a low file limit. "Nothing was published" is proven by a listener that gets a pong
to a ping sent afterwards (the gateway answers in order) with no message before it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from broadcast.bus import MemoryBus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.admission import Admission
from broadcast.gateway.server import Gateway
from broadcast.protocol.sniff import Kind, classify, is_request_line
from broadcast.security import AddressLimit, TokenVerifier, mint_token
from tests.support.clients import WAIT_SECONDS, LineClient, WsClient, line_client, ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.waiting import wait_until

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"
StartGateway = Callable[..., Awaitable[Gateway]]
HANDSHAKE = (
    b"GET /?name=late HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
async def start_gateway(nursery: trio.Nursery) -> AsyncIterator[StartGateway]:
    async def start(
        *, silent_after: float | None = None, gateway_options: dict[str, Any] | None = None,
        **access: Any,
    ) -> Gateway:  # fmt: skip
        def tune(admission: Admission) -> None:
            if silent_after is not None:
                admission.silent_after = silent_after

        gateway = Gateway(
            MemoryBus(),
            node_id="gw-door",
            access=AccessPolicy(**access),
            admission=tune,
            **(gateway_options or {}),
        )
        await nursery.start(gateway.run)
        await wait_until(lambda: gateway.ready)
        return gateway

    yield start
    nursery.cancel_scope.cancel()


def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/"


async def raw_exchange(port: int, data: bytes, *, delay: float = 0.0) -> bytes:
    """Connect, wait ``delay``, send ``data``, and read until the gateway closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if delay:
            await trio.sleep(delay)
        await stream.send_all(data)
        received = b""
        with trio.fail_after(WAIT_SECONDS):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


async def assert_nothing_published(listener: WsClient) -> None:
    """The listener's next event after a ping is the pong: nothing reached the channel."""
    await listener.send_json({"type": "ping"})
    event = await listener.expect("pong")
    assert event == {"type": "pong"}


# -- protocol detection: the whole input space ------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"OPTIONS * HTTP/1.1", b"BREW /pot HTTP/1.1",
     b"PUT /a?b=c HTTP/2.0\r", b"M-SEARCH * HTTP/1.1"],
)  # fmt: skip
def test_every_request_line_is_http_whatever_the_method(line: bytes) -> None:
    assert is_request_line(line)
    assert classify(line + b"\n") is Kind.HTTP
    for cut in range(1, len(line)):  # every prefix waits for more
        assert classify(line[:cut]) is Kind.UNDECIDED, line[:cut]


@pytest.mark.parametrize(
    "first",
    [b"hello\n", b"hello world\n", b"GET lost\n", b"get / http/1.1\n", b"GET / HTTP/1.1 x\n",
     b"/name admin\n", b"\n", b"GET  / HTTP/1.1\n", b"\x16\x03\x01", b"hi there!\n", b"{\n"],
)  # fmt: skip
def test_anything_else_is_a_line(first: bytes) -> None:
    assert classify(first) is Kind.LINES


async def test_a_post_from_a_web_page_is_answered_405_and_never_published(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway()
    request = (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
        b"Cookie: session=secret\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n\r\n"
        b"/name admin\n/join ops\nhi"
    )
    async with ws_client(url(gateway), name="listener") as listener:
        for method in (b"POST", b"PUT", b"OPTIONS", b"DELETE", b"BREW"):
            answer = await raw_exchange(gateway.port, request.replace(b"POST", method, 1))
            assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), answer[:80]
            assert b"\r\nAllow: GET, HEAD\r\n" in answer
        await assert_nothing_published(listener)


async def test_reason_phrases_are_the_standard_ones(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    evil = HANDSHAKE.replace(
        b"Host: 127.0.0.1", b"Host: evil.example\r\nOrigin: http://evil.example"
    )
    assert (await raw_exchange(gateway.port, evil)).startswith(b"HTTP/1.1 403 Forbidden\r\n")
    missing = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    assert (await raw_exchange(gateway.port, missing)).startswith(b"HTTP/1.1 404 Not Found\r\n")
    head = await raw_exchange(gateway.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")


async def test_a_late_websocket_handshake_still_works(start_gateway: StartGateway) -> None:
    """A handshake a second after connecting (a slow link, a loaded client) is not a line."""
    gateway = await start_gateway()
    async with ws_client(url(gateway), name="listener") as listener:
        stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        async with stream:
            await trio.sleep(1.0)
            await stream.send_all(HANDSHAKE)
            with trio.fail_after(WAIT_SECONDS):
                answer = await stream.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 101 "), answer[:80]
        await assert_nothing_published(listener)


async def test_a_request_line_in_pieces_is_read_to_its_end(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(silent_after=0.2)
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        await stream.send_all(b"GET /hea")
        await trio.sleep(0.5)  # past the silence limit: the bytes so far could be HTTP
        await stream.send_all(b"lthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(WAIT_SECONDS):
            answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_greeted_client_that_then_speaks_http_is_refused_not_published(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(silent_after=0.1)
    async with ws_client(url(gateway), name="listener") as listener:
        stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        async with stream:
            client = LineClient(stream)
            assert (await client.line()).startswith("* welcome")
            await stream.send_all(HANDSHAKE)
            rest = (await client.closed()).decode()
            assert "! bad_command" in rest
            assert "Upgrade" not in rest
        await assert_nothing_published(listener)


async def test_a_burst_of_connects_never_misreads_a_handshake(
    start_gateway: StartGateway,
) -> None:
    """Hundreds of handshakes at once, with join notices on: every one is a WebSocket, and
    no header line reaches the channel."""
    gateway = await start_gateway()
    failures: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            async with open_websocket_url(f"{url(gateway)}?name=c{i}") as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
        except Exception as exc:  # counted and reported below
            failures.append(exc)

    async with ws_client(url(gateway), name="listener") as listener:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(one, i)
        assert failures == []
        await assert_nothing_published(listener)


# -- origins ---------------------------------------------------------------------------------


async def test_a_rebinding_host_is_refused_and_the_operator_told(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway()
    rebound = HANDSHAKE.replace(
        b"Host: 127.0.0.1", b"Host: rebind.evil.example:%d\r\nOrigin: http://rebind.evil.example:%d"
        % (gateway.port, gateway.port),
    )  # fmt: skip
    for _ in range(3):
        answer = await raw_exchange(gateway.port, rebound)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    hints = [r for r in caplog.records if "--public-host" in r.getMessage()]
    assert len(hints) == 1, "one line for the operator, not one per request"


async def test_a_named_public_host_is_served(start_gateway: StartGateway) -> None:
    from broadcast.security import OriginPolicy

    gateway = await start_gateway(origins=OriginPolicy(public_hosts=["chat.example.com"]))
    request = HANDSHAKE.replace(
        b"Host: 127.0.0.1", b"Host: chat.example.com\r\nOrigin: http://chat.example.com"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(WAIT_SECONDS):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")


# -- budgets: every command costs --------------------------------------------------------


async def test_a_flood_of_joins_is_limited_then_cut(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    subscribes = 0
    subscribe = gateway.bus.subscribe

    async def counting_subscribe(channel: str) -> None:
        nonlocal subscribes
        subscribes += 1
        await subscribe(channel)

    gateway.bus.subscribe = counting_subscribe  # type: ignore[method-assign]
    async with line_client(gateway.port) as client:
        await client.stream.send_all(b"".join(b"/join c%d\n" % i for i in range(2000)))
        output = (await client.closed()).decode()
    assert "! rate_limited" in output
    assert "too_many_errors" in output
    assert subscribes <= 30, "the command budget bounds what one client makes the bus do"


async def test_renames_hello_who_and_replays_all_cost(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    async with ws_client(url(gateway), name="a") as client:
        kinds = [
            {"type": "hello", "name": "b"},
            {"type": "who"},
            {"type": "hello", "history": 1000},
            {"type": "ping"},
        ]
        limited: dict[str, Any] | None = None
        for i in range(16):  # 4 rounds cost 4 x 14 against a burst of 20: some are refused
            await client.send_json(kinds[i % len(kinds)])
        for _ in range(200):
            event = await client.event()
            if event["type"] == "error" and event["code"] == "rate_limited":
                limited = event
                break
        assert limited is not None
        assert limited["retry_after"] > 0


async def test_a_client_that_keeps_going_after_rate_limited_is_cut(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(message_rate=1.0, message_burst=1)
    async with open_websocket_url(url(gateway) + "?announce=0") as ws:
        for i in range(200):
            try:
                await ws.send_message(f"spam {i}")
            except ConnectionClosed:
                break
        with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
            while True:
                event = json.loads(await ws.get_message())
                if event["type"] == "error":
                    assert event["code"] == "rate_limited"
                    assert 0 < event["retry_after"] <= 1.0
    assert closed.value.reason.code == 4029


async def test_addresses_share_an_allowance_when_counted(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(addresses=AddressLimit(1000), command_rate=1.0, command_burst=2)
    answers: list[str] = []

    async def client(i: int) -> None:
        async with ws_client(url(gateway), name=f"n{i}", announce="0") as c:
            for _ in range(2):
                await c.send_json({"type": "who"})
            for _ in range(2):
                answers.append((await c.event())["type"])

    async with trio.open_nursery() as nursery:
        for i in range(15):  # 15 clients x 2 commands, each within its own burst of 2
            nursery.start_soon(client, i)
    assert "error" in answers, "the address's 10 x 2 commands ran out before the 30 asked"
    assert "presence" in answers


# -- connections -------------------------------------------------------------------------


async def test_a_silent_line_client_is_asked_then_closed(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(gateway_options={"line_idle_timeout": 0.6})
    async with line_client(gateway.port) as client:
        nudge = await client.line_not_starting("* welcome", "* guest")
        assert nudge.startswith("* still there?")
        assert "idle" in (await client.closed()).decode()


async def test_unauthenticated_sockets_cannot_lock_out_token_holders(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(
        verifier=TokenVerifier(secret=SECRET),
        silent_after=0.05,
        gateway_options={"max_pending": 8, "max_connections": 20},
    )
    squatters = [await trio.open_tcp_stream("127.0.0.1", gateway.port) for _ in range(30)]
    try:
        token = mint_token(SECRET, "alice", 60)
        async with ws_client(url(gateway), token=token) as alice:
            assert alice.welcome["name"] == "alice"
        # A silent line client with auth on is told and closed within the auth timeout.
        with trio.fail_after(WAIT_SECONDS):
            closed = await squatters[-1].receive_some(4096)
        assert closed == b"" or b"auth_timeout" in closed
    finally:
        for stream in squatters:
            await stream.aclose()


async def test_deep_json_and_huge_ids_get_their_error_codes(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    async with ws_client(url(gateway), name="fuzzed") as client:
        await client.ws.send_message('{"type": ' + "[" * 60_000)
        assert (await client.expect("error"))["code"] == "bad_json"
        await client.send_json({"type": "hello", "since": f"{2**64}-{2**70}"})
        assert (await client.expect("error"))["code"] == "bad_command"
        await client.send_json({"type": "ping"})
        assert (await client.expect("pong"))["type"] == "pong"


async def test_the_frame_limit_counts_bytes(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    async with ws_client(url(gateway), name="emoji") as client:
        await client.ws.send_message("😀" * 20_000)  # 20,000 characters, 80,000 bytes
        with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
            while True:
                await client.ws.get_message()
    assert closed.value.reason.code == 1009


def test_max_connections_fits_the_file_limit() -> None:
    """``ulimit -n 256`` and 300 connections: the maximum is lowered (one line says so), the
    gateway refuses the excess as full, /healthz still answers, and no traceback is logged."""
    gateway = GatewayProcess(node_id="fd-limited", file_limit=256)
    streams: list[Any] = []
    try:
        for _ in range(300):
            try:
                streams.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
                streams[-1].sendall(b"\n")
            except OSError:
                break
        probe = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        for stream in streams:
            stream.close()
        probe.settimeout(WAIT_SECONDS)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.recv(4096).startswith(b"HTTP/1.1 200 OK")
        probe.close()
    finally:
        gateway.terminate()
    log = gateway.finished_log()
    assert "Traceback" not in log
    assert sum("does not fit the file limit" in line for line in log.splitlines()) == 1


async def test_a_storm_of_connects_is_paced_with_retry_after(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(gateway_options={"session_rate": 0.5, "session_burst": 2})
    async with ws_client(url(gateway), name="one"), ws_client(url(gateway), name="two"):
        answer = await raw_exchange(gateway.port, HANDSHAKE)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nRetry-After: " in answer and b"server_busy" in answer
        line = await raw_exchange(gateway.port, b"hello\n")
        assert line.startswith(b"! server_busy: ")
        health = await raw_exchange(gateway.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200 OK"), "health checks are never paced"


async def test_a_drain_closes_clients_in_batches_with_spread_reconnect_hints(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(gateway_options={"drain_timeout": 4.0})
    hints: list[float] = []

    async def client(i: int, task_status: trio.TaskStatus[None]) -> None:
        async with open_websocket_url(f"{url(gateway)}?announce=0") as ws:
            await ws.get_message()
            task_status.started()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 1012
        hints.append(float(closed.value.reason.reason.rsplit(" ", 2)[-2]))

    async with trio.open_nursery() as nursery:
        for i in range(300):
            await nursery.start(client, i)
        gateway.stop("restarting")
    assert len(hints) == 300
    assert max(hints) > 0.02 and len(set(hints)) > 5, "each client waits its own time"


async def test_a_draining_gateway_refuses_new_connections_at_once(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(gateway_options={"drain_timeout": 5.0})
    async with open_websocket_url(url(gateway) + "?announce=0") as ws:
        await ws.get_message()
        gateway.stop("restarting")
        with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed):
            while True:
                await ws.get_message()
        with trio.fail_after(2), pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", gateway.port)
