"""The sans-IO protocol layer: plain bytes and text in, events and bytes out; no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from broadcast.protocol import commands
from broadcast.protocol.envelope import (
    decode,
    event_payload,
    message_body,
    message_payload,
    parse_id,
)
from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.http_request import BadRequest, RequestHeadParser
from broadcast.protocol.limits import MAX_LINE_BYTES, MAX_TEXT_BYTES
from broadcast.protocol.lines import LineSplitter, Quit, SayText, SetName, parse_line, render_event
from broadcast.protocol.sniff import Kind, classify
from broadcast.protocol.validate import check_channel, check_name, check_text
from broadcast.protocol.websocket_frames import encode_close_frame, encode_text_frame

# -- envelope -------------------------------------------------------------------------------


@given(text=st.text(min_size=1), sender=st.text(min_size=1, max_size=32))
def test_message_payload_is_the_json_clients_read(text: str, sender: str) -> None:
    payload = message_payload("17-3", message_body("general", sender, text, 1.5, "gw/1"))
    assert decode(payload) == {
        "type": "message", "id": "17-3", "channel": "general", "sender": sender,
        "text": text, "ts": 1.5, "origin": "gw/1",
    }  # fmt: skip


def test_payload_is_readable_in_redis_monitor() -> None:
    payload = message_payload("1-0", message_body("general", "zoë", "héllo", 1.0, "gw/1"))
    assert "héllo".encode() in payload  # UTF-8, not \\u escapes or binary
    assert event_payload("join", "general", "zoë", 2.0, "gw/1").startswith(b'{"type":"join"')


@pytest.mark.parametrize(("a", "b"), [("9-0", "10-0"), ("10-9", "10-10"), ("1-5", "2-0")])
def test_ids_compare_as_numbers_not_strings(a: str, b: str) -> None:
    assert parse_id(a) < parse_id(b)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "bell\x07", "esc\x1b[31m", "c1\x85", "bidi\u202e", 5])
def test_bad_text_is_refused(text: object) -> None:
    with pytest.raises(ProtocolError) as error:
        check_text(text)
    assert error.value.code is ErrorCode.BAD_TEXT


def test_text_limit_is_in_utf8_bytes() -> None:
    assert check_text("é" * (MAX_TEXT_BYTES // 2))
    with pytest.raises(ProtocolError) as error:
        check_text("é" * (MAX_TEXT_BYTES // 2 + 1))
    assert error.value.code is ErrorCode.TEXT_TOO_LONG


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(ProtocolError):
        check_text("half \ud800 a pair")


@pytest.mark.parametrize("name", ["", " alice", "x" * 33, "a\nb", "a\x00"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ProtocolError):
        check_name(name)


@pytest.mark.parametrize("channel", ["", "has space", "x" * 65, "é", "a/b"])
def test_bad_channels(channel: str) -> None:
    with pytest.raises(ProtocolError):
        check_channel(channel)


# -- WebSocket commands ---------------------------------------------------------------------


def test_plain_text_is_a_publish() -> None:
    assert commands.parse_frame("hi there") == commands.Publish("hi there", None)


def test_commands_parse() -> None:
    assert commands.parse_frame('{"type":"publish","text":"x","ref":"r"}') == commands.Publish(
        "x", "r"
    )
    assert commands.parse_frame('{"type":"hello","name":"al","channel":"c","echo":true}') == (
        commands.Hello("al", "c", True)
    )
    assert commands.parse_frame(' {"type":"ping"}') == commands.Ping()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", ErrorCode.BAD_JSON),
        ('{"type": "nope"}', ErrorCode.BAD_COMMAND),
        ('{"type": "publish", "text": 3}', ErrorCode.BAD_TEXT),
        ('{"type": "publish", "text": "x", "ref": 3}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "echo": "yes"}', ErrorCode.BAD_COMMAND),
    ],
)
def test_bad_commands(frame: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as error:
        commands.parse_frame(frame)
    assert error.value.code is code


@given(st.text())
def test_any_frame_parses_or_is_refused_with_a_code(frame: str) -> None:
    try:
        commands.parse_frame(frame)
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)


# -- lines ----------------------------------------------------------------------------------


def test_lines_split_across_reads() -> None:
    splitter = LineSplitter()
    assert list(splitter.feed(b"hel")) == []
    assert list(splitter.feed(b"lo\r\nwor")) == ["hello"]
    assert list(splitter.feed(b"ld\n")) == ["world"]


def test_over_long_line_is_reported_once_and_skipped() -> None:
    splitter = LineSplitter(max_line_bytes=8)
    out = list(splitter.feed(b"x" * 20))
    out += list(splitter.feed(b"y" * 20))
    out += list(splitter.feed(b"z\nnext\n"))
    assert [getattr(o, "code", o) for o in out] == [ErrorCode.LINE_TOO_LONG, "next"]


def test_invalid_utf8_line_is_reported() -> None:
    (error, ok) = LineSplitter().feed(b"\xff\xfe\nok\n")
    assert isinstance(error, ProtocolError) and error.code is ErrorCode.INVALID_UTF8
    assert ok == "ok"


@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(4, 64))
def test_splitter_never_yields_a_line_over_the_limit(chunks: list[bytes], limit: int) -> None:
    splitter = LineSplitter(max_line_bytes=limit)
    for chunk in chunks:
        for item in splitter.feed(chunk):
            if isinstance(item, str):
                assert len(item.encode()) <= limit
                assert "\n" not in item
        assert len(splitter._buffer) <= limit + 1


@given(
    st.lists(
        st.text(
            alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"),
            max_size=50,
        )
    )
)
def test_splitter_gives_back_what_was_sent(lines: list[str]) -> None:
    data = b"".join(line.encode() + b"\n" for line in lines)
    splitter = LineSplitter(max_line_bytes=MAX_LINE_BYTES)
    got = [item for i in range(0, len(data), 7) for item in splitter.feed(data[i : i + 7])]
    assert got == lines


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello", SayText("hello")),
        ("//slash", SayText("/slash")),
        ("/name bob", SetName("bob")),
        ("/quit", Quit()),
        ("   ", None),
    ],
)
def test_line_commands(line: str, command: object) -> None:
    assert parse_line(line) == command


def test_render_event_lines() -> None:
    assert render_event({"type": "message", "sender": "al", "text": "hi"}) == b"al: hi\n"
    assert render_event({"type": "join", "name": "al", "channel": "c"}) == b"* al joined #c\n"
    assert render_event({"type": "ack"}) is None


# -- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (b"GET / HTTP/1.1\r\n", Kind.HTTP),
        (b"GET /healthz", Kind.HTTP),
        (b"HEAD /readyz", Kind.HTTP),
        (b"GE", Kind.UNDECIDED),
        (b"GET ", Kind.UNDECIDED),
        (b"", Kind.UNDECIDED),
        (b"GET lost in the woods\n", Kind.LINES),
        (b"hello\n", Kind.LINES),
        (b"\n", Kind.LINES),
    ],
)
def test_classify(first: bytes, kind: Kind) -> None:
    assert classify(first) is kind


@given(st.binary(max_size=40))
def test_classify_is_stable_once_decided(data: bytes) -> None:
    """More bytes never change a decision already made."""
    decided = [classify(data[:i]) for i in range(len(data) + 1)]
    firsts = [k for k in decided if k is not Kind.UNDECIDED]
    assert all(k is firsts[0] for k in firsts)


# -- WebSocket frames -----------------------------------------------------------------------


@given(st.binary(max_size=70000))
def test_encoded_frames_parse_in_wsproto(payload: bytes) -> None:
    text = payload.decode("latin-1")  # any text; wsproto checks UTF-8
    data = text.encode()
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(encode_text_frame(data))
    received = "".join(frame.payload for frame in parser.received_frames())
    assert received == text


def test_close_frame_parses_in_wsproto() -> None:
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(encode_close_frame(4008, "slow" * 100))
    (frame,) = list(parser.received_frames())
    assert frame.opcode is Opcode.CLOSE
    assert frame.payload[0] == 4008
    assert json.dumps(frame.payload[1])  # a string, cut to fit


# -- HTTP request heads ---------------------------------------------------------------------


def test_request_head_across_reads() -> None:
    parser = RequestHeadParser()
    assert parser.feed(b"GET /readyz HT") is None
    request = parser.feed(b"TP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\r\nextra")
    assert request is not None
    assert (request.method, request.target, request.trailing) == (b"GET", b"/readyz", b"extra")
    assert request.wants_websocket


def test_oversized_request_head_is_refused() -> None:
    parser = RequestHeadParser()
    with pytest.raises(BadRequest):
        parser.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n")
        parser.feed(b"\r\n")


def test_request_cut_short_is_refused() -> None:
    parser = RequestHeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(BadRequest):
        parser.feed(b"")


@given(st.binary(max_size=300), st.integers(1, 50))
def test_any_bytes_give_a_request_need_more_or_bad_request(data: bytes, step: int) -> None:
    parser = RequestHeadParser()
    try:
        for i in range(0, len(data), step):
            if parser.feed(data[i : i + step]) is not None:
                return
    except BadRequest:
        return
