"""The outbox, the hub and the admission step on their own: socket pairs and trio's memory
streams, with trio's MockClock where time matters (no real sleeps)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from broadcast.bus.base import Delivery
from broadcast.bus.memory import MemoryBus
from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.admission import SILENT_CLIENT_SECONDS, Admission, Admitted
from broadcast.gateway.http import HttpRequest, response
from broadcast.gateway.hub import ChannelHub
from broadcast.gateway.outbox import Outbox
from broadcast.gateway.stats import GatewayStats

SLOW = b"SLOW\n"


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


class Done:
    def __init__(self) -> None:
        self.event = trio.Event()

    def __call__(self) -> None:
        self.event.set()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_a_slow_reader_gets_whole_pieces_then_the_final_words() -> None:
    """Over the limit mid-write: the piece on the wire is finished, nothing is cut, and the
    slow notice follows."""
    ours, theirs = socket_pair()
    done = Done()
    outbox = Outbox(200_000, ours, on_slow=lambda: SLOW, on_done=done)
    async with trio.open_nursery() as nursery:
        outbox.attach(nursery)
        pieces = [b"%06d:" % i + b"x" * 993 + b"\n" for i in range(400)]  # 1,000 bytes each
        for piece in pieces:
            outbox.push(piece)
            outbox.flush()
        assert outbox.overflowed
        with trio.fail_after(10):
            received = await read_all_until(theirs, done)
        outbox.attach(None)
    lines = received.split(b"\n")
    assert received.endswith(b"\n" + SLOW)
    body = lines[:-2]
    assert body == [piece[:-1] for piece in pieces[: len(body)]], "whole pieces, in order"


async def read_all_until(stream: trio.SocketStream, done: Done) -> bytes:
    data = b""
    while not data.endswith(SLOW):
        data += await stream.receive_some(65536)
    await done.event.wait()
    return data


async def test_back_pressure_waits_until_the_reader_took_everything() -> None:
    ours, theirs = socket_pair()
    outbox = Outbox(10_000_000, ours, on_slow=lambda: SLOW, on_done=Done())
    async with trio.open_nursery() as nursery:
        outbox.attach(nursery)
        for _ in range(100):
            outbox.push(b"y" * 10_000)
        outbox.flush()
        assert outbox.backlog  # a megabyte does not fit a socket buffer
        received = 0

        async def reader() -> None:
            nonlocal received
            while received < 1_000_000:
                received += len(await theirs.receive_some(65536))

        nursery.start_soon(reader)
        with trio.fail_after(10):
            await outbox.wait_for_room()
        assert not outbox.backlog
        outbox.attach(None)


async def test_close_writes_the_final_bytes_and_reports_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    done = Done()
    outbox = Outbox(1000, ours, on_slow=lambda: SLOW, on_done=done)
    async with trio.open_nursery() as nursery:
        outbox.attach(nursery)
        outbox.push(b"hello\n")
        outbox.close(b"bye\n")
        outbox.push(b"ignored once closing\n")
        await done.event.wait()
        assert await theirs.receive_some(100) == b"hello\nbye\n"


class Member:
    def __init__(self, origin: str, websocket: bool, stream: trio.abc.Stream) -> None:
        self.origin = origin
        self.channel = "general"
        self.echo = False
        self.speaks_websocket = websocket
        self.held: list[tuple[str | None, bytes]] | None = None
        self.outbox = Outbox(1 << 20, stream, on_slow=lambda: b"", on_done=lambda: None)

    def hold(self, message_id: str | None, data: bytes) -> None:
        assert self.held is not None
        self.held.append((message_id, data))


async def test_the_hub_encodes_once_per_kind_and_skips_the_sender() -> None:
    hub = ChannelHub(MemoryBus())
    streams = [trio.testing.memory_stream_pair() for _ in range(3)]
    sender = Member("gw/1", True, streams[0][0])
    web = Member("gw/2", True, streams[1][0])
    line = Member("gw/3", False, streams[2][0])
    for member in (sender, web, line):
        await hub.add(member)
    payload = json.dumps(
        {"type": "message", "id": "1-0", "channel": "general", "sender": "a", "text": "hi",
         "ts": 1.0, "origin": "gw/1"}
    ).encode()  # fmt: skip
    async with trio.open_nursery() as nursery:
        for member in (sender, web, line):
            member.outbox.attach(nursery)
        hub.deliver([Delivery("general", payload)])
        assert await streams[1][1].receive_some(1000) == b"\x81" + bytes([len(payload)]) + payload
        assert await streams[2][1].receive_some(1000) == b"a: hi\n"
        assert hub.deliveries == 2, "the sender does not get its own message"
        nursery.cancel_scope.cancel()


async def answer(request: HttpRequest, stream: trio.abc.Stream) -> bytes:
    return response(200, request.method + b" " + request.target)


def admission() -> Admission:
    return Admission(AccessPolicy(), GatewayStats(), answer)


async def test_a_silent_client_is_a_line_client_after_the_silence_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = trio.testing.memory_stream_pair()
    start = trio.current_time()
    admitted = await admission().admit(ours, None)
    assert isinstance(admitted, Admitted) and admitted.websocket is None
    assert admitted.initial == b""
    assert trio.current_time() - start == pytest.approx(SILENT_CLIENT_SECONDS)


@pytest.mark.parametrize("method", [b"GET", b"POST", b"OPTIONS", b"BREW"])
async def test_a_request_in_pieces_at_any_pace_is_http(
    method: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    request = method + b" /x HTTP/1.1\r\nHost: h\r\n\r\n"

    async def dribble() -> None:
        for i in range(len(request)):
            await theirs.send_all(request[i : i + 1])
            await trio.sleep(SILENT_CLIENT_SECONDS * 3)  # far slower than the silence limit

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        assert await admission().admit(ours, None) is None
    assert (await theirs.receive_some(1000)).endswith(method + b" /x")
