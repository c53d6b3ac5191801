"""Fuzzing a live gateway: no input ends it, or anyone else's connection, unexplained.

One real gateway subprocess (in-process bus) serves the whole module on 127.0.0.1, as an
operator runs it, with its log captured. Hypothesis drives it with:

- arbitrary bytes over raw TCP, cut into arbitrary chunks with pauses: line-protocol input,
  HTTP requests, WebSocket handshakes with fuzzed queries, then hand-made frames; and a few
  inputs sent only after a silent client was greeted as a line client;
- arbitrary JSON values, command-shaped objects and text over a real WebSocket client, checking
  that everything the gateway answers is a documented event or close code.

After every example the gateway must still answer ``/healthz`` and its log must hold no
traceback and no ERROR line; after each test a fresh WebSocket client must still connect,
publish and receive. A failure names the input that broke the gateway (``note``; the raw TCP
test shrinks it first). Every socket wait is bounded; examples are few (the box is shared), so
the whole module stays well under 40 s.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import trio
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.lines import CONTINUATION
from broadcast.protocol.validate import check_name, check_text, refused_character
from broadcast.security.tokens import AuthCode
from tests.support.gateway_process import GatewayProcess

WAIT_SECONDS = 5  # a correct gateway answers in milliseconds; this only bounds a broken one


def _doc_section(title: str) -> str:
    """A section of docs/protocol.md, up to the next section of the same level or above."""
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    start = doc.index(f"\n{title}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end >= 0 else len(doc)]


# What docs/protocol.md says a client may receive, read from it: every event type shown in
# "WebSocket: server to client" and every close code in its table. Nothing else may come out.
EVENT_TYPES = frozenset(
    re.findall(r'\{"type":\s*"(\w+)"', _doc_section("## WebSocket: server to client"))
)
CLOSE_CODES = frozenset(
    int(code)
    for code in re.findall(r"^\| (\d{4}) \|", _doc_section("### WebSocket close codes"), re.M)
)
ERROR_CODES = frozenset(ErrorCode) | frozenset(AuthCode)

# Examples per test: enough to reach the odd paths, few enough for a shared 2-core machine.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A session that hangs costs a whole wait per try, and shrinking tries hundreds: the WebSocket
# tests report the input they found as it is (``note``), unshrunk; their inputs are small.
FUZZ_UNSHRUNK = settings(FUZZ, phases=(Phase.explicit, Phase.reuse, Phase.generate))


class FuzzedGateway(GatewayProcess):
    """A gateway whose every log line is kept, so each example checks the lines it caused."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # before the log thread starts, in super().__init__
        super().__init__(node_id="fuzz")

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.log.append(line)
            self.lines.append(line)


@pytest.fixture(scope="module")
def gateway() -> Iterator[FuzzedGateway]:
    process = FuzzedGateway()
    try:
        yield process
    finally:
        process.terminate()


def assert_log_clean(lines: list[str]) -> None:
    bad = [line for line in lines if "Traceback" in line or " ERROR " in line]
    assert not bad, "the gateway logged an error:\n" + "".join(lines)[-6000:]


def assert_still_serving(gateway: FuzzedGateway, since_line: int = 0) -> None:
    """``/healthz`` answers 200 and nothing went wrong in the log from ``since_line`` on."""
    url = f"http://127.0.0.1:{gateway.port}/healthz"
    with urllib.request.urlopen(url, timeout=WAIT_SECONDS) as response:
        assert response.status == 200
    assert gateway.process.poll() is None, "the gateway exited"
    assert_log_clean(gateway.lines[since_line:])


async def _round_trip(port: int) -> None:
    url = f"ws://127.0.0.1:{port}/?name=probe&channel=fuzz-probe&echo=1"
    with trio.fail_after(WAIT_SECONDS):
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"type": "publish", "text": "still here"}))
            while True:
                event = json.loads(await ws.get_message())
                if event["type"] == "message":
                    assert event["text"] == "still here" and event["sender"] == "probe"
                    return


def assert_fresh_client_works(gateway: FuzzedGateway) -> None:
    mark = len(gateway.lines)
    trio.run(_round_trip, gateway.port)
    assert_still_serving(gateway, mark)


# -- raw TCP ----------------------------------------------------------------------------------

_KEY = base64.b64encode(b"fuzz-fuzz-fuzz!!").decode()
_QUERY_KEYS = ["name", "channel", "echo", "announce", "since", "history", "epoch", "token"]
_QUERY_VALUES = st.sampled_from(
    ["alice", "*root", "a:b", "general", "1-0", f"{2**64}-0", "99999999999999999999-0",
     "%C2%B2", "9" * 5000, "-1", "1000", "", "%ff", "%00", "%0a", "%E2%80%A8", "a%3Ab"]
) | st.text(max_size=12).map(lambda text: quote(text, safe=""))  # fmt: skip


@st.composite
def _handshake(draw: st.DrawFn) -> bytes:
    """A WebSocket upgrade request whose query is fuzzed, sometimes with broken headers."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(_QUERY_KEYS), _QUERY_VALUES), max_size=4))
    query = "&".join(f"{key}={value}" for key, value in pairs)
    headers = [
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    if draw(st.booleans()):
        headers = draw(st.permutations(headers))[: draw(st.integers(0, len(headers)))]
        headers += draw(st.lists(st.sampled_from(
            ["Origin: http://evil.example", "Authorization: Bearer x.y.z", "Content-Length: 5",
             "Transfer-Encoding: chunked", "Sec-WebSocket-Version: 8", "Upgrade: h2c"]
        ), max_size=2))  # fmt: skip
    head = "".join(f"{header}\r\n" for header in headers)
    return f"GET /?{query} HTTP/1.1\r\n{head}\r\n".encode()


def _frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One client-to-server WebSocket frame, well formed or not as asked."""
    head = bytes([(0x80 if fin else 0) | (opcode & 0x0F)])
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


_PAYLOADS = (
    st.binary(max_size=200)
    | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.sampled_from([b'{"type":"ping"}', b'{"type":"who"}', b"[" * 5000, b"hi\n", b"\x1b[2J"])
)
_FRAMES = st.builds(
    _frame,
    st.sampled_from([0x0, 0x1, 0x1, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]),
    _PAYLOADS,
    fin=st.booleans() | st.just(True),
    masked=st.just(True) | st.booleans(),
) | st.binary(max_size=30)

_LINE_PIECES = st.sampled_from(
    [b"/name ", b"/join ", b"/who", b"/quit", b"/auth ", b"//", b"/nick", b"\n", b"\r\n", b"\r",
     b"hello", b"*root", b" ", b":", b"\x1b]0;x\x07", b"\xff", b"\xe2\x80\xa8", b"x" * 5000]
) | st.binary(max_size=20)  # fmt: skip

_TCP_INPUT = st.one_of(
    st.binary(max_size=400),
    st.lists(_LINE_PIECES, max_size=12).map(b"".join),
    st.tuples(
        st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"BREW", b"G\x00T"]),
        st.sampled_from([b"/", b"/healthz", b"/readyz", b"/metrics", b"/api/x", b"/../etc", b"*"]),
        st.sampled_from([b" HTTP/1.1\r\n", b" HTTP/1.0\n", b" HTTP/9.9\r\n", b"\r\n"]),
        st.binary(max_size=200),
    ).map(b"".join),
    st.tuples(_handshake(), st.lists(_FRAMES, max_size=6).map(b"".join)).map(b"".join),
)
# Mostly back to back, now and then a pause that lets the gateway act on a partial input.
# Pauses go after the first chunks only, so an example pauses about 30 ms on average.
_PAUSES = st.sampled_from([0.0] * 9 + [0.002, 0.02, 0.25])


def _drive_raw(port: int, data: bytes, cuts: list[int], pauses: list[float], reset: bool) -> None:
    """Send ``data`` in the chunks ``cuts`` make, then close: abruptly (RST) if ``reset``, else
    half-close and read until the gateway closes too, so the next example starts after this
    connection is handled."""
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as sock:
        steps = itertools.zip_longest(itertools.pairwise(bounds), pauses[: len(bounds) - 1])
        for (start, end), pause in steps:
            try:
                sock.sendall(data[start:end])
            except OSError:  # the gateway may refuse and close first: that is an answer
                break
            if pause:
                time.sleep(pause)  # the pause is the input here: what a slow client does
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except TimeoutError:
            raise AssertionError(
                f"the gateway kept the connection {WAIT_SECONDS} s after EOF"
            ) from None
        except OSError:
            pass  # reset by the gateway: also a way to end


@FUZZ
@given(
    data=_TCP_INPUT,
    cuts=st.lists(st.integers(0, 500), max_size=5),
    pauses=st.lists(_PAUSES, max_size=3),
    reset=st.booleans(),
)
def test_arbitrary_bytes_at_arbitrary_times(
    gateway: FuzzedGateway, data: bytes, cuts: list[int], pauses: list[float], reset: bool
) -> None:
    note(f"data={data!r:.3000} cuts={cuts} pauses={pauses} reset={reset}")
    mark = len(gateway.lines)
    _drive_raw(gateway.port, data, cuts, pauses, reset)
    assert_still_serving(gateway, mark)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)),  # a TLS hello
        b"/auth x.y.z\n/name *root\nhi\r\n\x1b]0;x\x07\n",
    ],
)
def test_bytes_after_a_silent_client_is_greeted(gateway: FuzzedGateway, data: bytes) -> None:
    """A client that says nothing is greeted as a line client; what it sends then is lines."""
    mark = len(gateway.lines)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT_SECONDS) as sock:
        greeting = b""
        while b"\n" not in greeting:  # the greeting is the event; no guessing its delay
            chunk = sock.recv(4096)
            assert chunk, "closed before the greeting"
            greeting += chunk
        assert greeting.startswith(b"* ")
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    for line in (greeting + answer).decode().splitlines():
        assert line.startswith(("* ", "! ")), f"not a server line: {line!r}"
    assert_still_serving(gateway, mark)


@pytest.mark.parametrize(
    "query", ["history=%C2%B2", "history=" + "9" * 5000, f"since={2**64}-0", "since=%00"]
)
def test_handshake_queries_found_by_fuzzing(gateway: FuzzedGateway, query: str) -> None:
    """Inputs the fuzzer found (or that it should never miss), kept as plain examples."""
    mark = len(gateway.lines)
    handshake = (
        f"GET /?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    _drive_raw(gateway.port, handshake.encode(), [], [], reset=False)
    assert_still_serving(gateway, mark)


def test_gateway_serves_after_the_bytes(gateway: FuzzedGateway) -> None:
    assert_fresh_client_works(gateway)


# -- WebSocket --------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=16,
)
_FIELD_VALUES = _JSON | st.sampled_from(
    ["alice", "*root", "a:b", "general", "ops", "1-0", f"{2**64}-0", "x" * 5000, "\ud800", 10**30,
     -1, 1000, 1001, "a\nb", "\u2028", "\x1b[2J"]
)  # fmt: skip
_COMMANDS = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "publish", "ping", "who"]) | _JSON},
    optional={
        key: _FIELD_VALUES
        for key in ("text", "name", "channel", "echo", "since", "history", "epoch", "ref")
    },
)
_WS_MESSAGES = st.one_of(
    _COMMANDS.map(json.dumps),
    _JSON.map(json.dumps),
    st.text(st.characters(codec="utf-8"), max_size=200),
    st.sampled_from(["[" * 66_000, "{" * 50_000, "hello\n", "a\r\nb\r\n", "{" + "[" * 40]),
)


async def _drive_ws(port: int, messages: list[str], query: str) -> list[Any]:
    """Send ``messages`` on one connection, then a WebSocket ping as a barrier; returns what
    came back (events, and the close code if the gateway closed)."""
    received: list[Any] = []
    with trio.move_on_after(WAIT_SECONDS) as waited:
        async with (
            open_websocket_url(f"ws://127.0.0.1:{port}/?{query}") as ws,
            trio.open_nursery() as nursery,
        ):

            async def read() -> None:
                try:
                    while True:
                        received.append(json.loads(await ws.get_message()))
                except ConnectionClosed as closed:
                    received.append(closed.reason.code)
                    nursery.cancel_scope.cancel()  # a ping sent just before is not answered

            nursery.start_soon(read)
            try:
                for message in messages:
                    await ws.send_message(message)
                await ws.ping()  # answered once every frame before it was handled
            except ConnectionClosed:
                pass
            else:
                await ws.aclose()
    assert not waited.cancelled_caught, (
        f"no answer in {WAIT_SECONDS} s (query {query!r:.200}) to {messages!r:.2000}; "
        f"got {received!r:.2000}"
    )
    return received


def _assert_documented(received: list[Any]) -> None:
    for item in received:
        if isinstance(item, int):
            assert item in CLOSE_CODES, f"undocumented close code {item}"
            continue
        assert isinstance(item, dict) and item.get("type") in EVENT_TYPES, item
        if item["type"] == "error":
            assert item.get("code") in ERROR_CODES and item.get("message"), item


def test_what_is_documented_was_read_from_the_docs() -> None:
    assert {"welcome", "message", "ack", "error", "pong"} <= EVENT_TYPES
    assert {1000, 1009, 4008} <= CLOSE_CODES


@FUZZ_UNSHRUNK
@example(messages=['{"type":"publish","text":"x","ref":"\\ud800"}'], query="")
@example(messages=["[" * 66_000, '{"type":"hello","since":"18446744073709551616-0"}'], query="")
@given(
    messages=st.lists(_WS_MESSAGES, min_size=1, max_size=5),
    query=st.lists(st.tuples(st.sampled_from(_QUERY_KEYS), _QUERY_VALUES), max_size=3).map(
        lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)
    ),
)
def test_arbitrary_json_and_text_frames(
    gateway: FuzzedGateway, messages: list[str], query: str
) -> None:
    note(f"query={query!r:.300} messages={messages!r:.3000}")
    mark = len(gateway.lines)
    received = trio.run(_drive_ws, gateway.port, messages, query)
    _assert_documented(received)
    assert_still_serving(gateway, mark)


# -- what line clients read --------------------------------------------------------------------

_channels = itertools.count(1)
_CHAT_TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from("\n\n\r\t:*!| \u2028\u202e\u200d\x1b"),
    min_size=1,
    max_size=60,
)
_CHAT_NAMES = st.sampled_from(["alice", "Zoë S", "*root", "! x", "a: b", "  | x"]) | st.text(
    max_size=12
)


class LineReader:
    """A line client (``nc``) on a raw stream: whole lines, every wait bounded."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            assert data, "the gateway closed the line client"
            self.buffer += data
        raw, _, self.buffer = self.buffer.partition(b"\n")
        return raw.decode()

    async def until(self, wanted: str) -> list[str]:
        lines = []
        while (line := await self.line()) != wanted:
            lines.append(line)
        return lines


def _parse_line_output(lines: list[str]) -> list[tuple[str, str]]:
    """The messages in what a line client read, as (sender, text); fails on any line that is
    not a server notice or error, a message, or a continuation of the message above it."""
    messages: list[tuple[str, str]] = []
    for line in lines:
        allowed = frozenset("\t\u200c\u200d")
        assert refused_character(line, allowed, future_emoji=True) is None, repr(line)
        if line.startswith(("* ", "! ")):
            continue
        if line.startswith(CONTINUATION):
            assert messages, f"a continuation line with no message above it: {line!r}"
            sender, text = messages[-1]
            messages[-1] = (sender, text + "\n" + line.removeprefix(CONTINUATION))
            continue
        sender, colon, text = line.partition(": ")
        assert colon and check_name(sender) == sender, f"not a message line: {line!r}"
        messages.append((sender, text))
    return messages


async def _chat_seen_by_a_line_client(port: int, name: str, texts: list[str]) -> None:
    channel = f"fuzz-{next(_channels)}"
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            reader = LineReader(stream)
            await stream.send_all(f"/join {channel}\n".encode())
            await reader.until(f"* you are now in #{channel}")
            query = urlencode({"name": name, "channel": channel})
            async with open_websocket_url(f"ws://127.0.0.1:{port}/?{query}") as ws:
                welcome = json.loads(await ws.get_message())
                sender = welcome["name"]  # the fuzzed name, or guest-N if it was refused
                last = f"that was all for #{channel}"  # no fuzzed text is this
                for text in [*texts, last]:
                    await ws.send_message(json.dumps({"type": "publish", "text": text}))
                seen = await reader.until(f"{sender}: {last}")
    accepted = [text for text in texts if _accepted(text)]
    assert _parse_line_output(seen) == [(sender, text) for text in accepted]


def _accepted(text: str) -> bool:
    try:
        check_text(text)
    except ProtocolError:
        return False
    return True


@FUZZ_UNSHRUNK
@given(name=_CHAT_NAMES, texts=st.lists(_CHAT_TEXT, max_size=4))
def test_line_clients_read_every_message_as_its_senders(
    gateway: FuzzedGateway, name: str, texts: list[str]
) -> None:
    """Whatever name and text a WebSocket client sends, a line client reads each accepted
    message as one block from that sender, and no line that could pass for anything else."""
    note(f"name={name!r} texts={texts!r}")
    mark = len(gateway.lines)
    trio.run(_chat_seen_by_a_line_client, gateway.port, name, texts)
    assert_still_serving(gateway, mark)


def _signed_token(secret: str, claims: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_tokens_with_claims_of_the_wrong_kind_are_refused_before_the_101() -> None:
    """``channels: []`` and its kin: HTTP 401 with the code, never an upgrade that then fails."""
    secret = "fuzz-secret-that-is-long-enough-0123456789"
    exp = int(time.time()) + 600
    process = GatewayProcess(node_id="fuzz-auth", extra=("--auth-secret", secret))
    try:
        for claims in [
            {"sub": "alice", "exp": exp, "channels": []},
            {"sub": "alice", "exp": exp, "channels": ["no spaces"]},
            {"sub": "*root", "exp": exp},
            {"sub": "alice", "exp": 10**400},
        ]:
            token = _signed_token(secret, claims)
            request = (
                f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            )
            with socket.create_connection(
                ("127.0.0.1", process.port), timeout=WAIT_SECONDS
            ) as sock:
                sock.sendall(request.encode())
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 401 "), (claims, answer[:200])
            assert b"token_invalid" in answer
    finally:
        process.terminate()
    assert_log_clean(process.finished_log().splitlines())


def test_gateway_serves_after_the_frames(gateway: FuzzedGateway) -> None:
    assert_fresh_client_works(gateway)


def test_the_whole_log_is_clean(gateway: FuzzedGateway) -> None:
    """Last: stop the gateway and read its log to the end, so a late line is not missed."""
    gateway.terminate()
    gateway.finished_log()
    assert_log_clean(gateway.lines)
