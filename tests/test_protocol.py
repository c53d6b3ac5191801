"""The sans-IO protocol layer: plain bytes and text in, events and bytes out; no sockets."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import event, given, settings
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
from broadcast.protocol.ids import format_id, parse_message_id
from broadcast.protocol.limits import MAX_LINE_BYTES, MAX_TEXT_BYTES
from broadcast.protocol.lines import (
    CONTINUATION,
    LineSplitter,
    Quit,
    SayText,
    SetName,
    parse_line,
    render_error,
    render_event,
    render_notice,
)
from broadcast.protocol.sniff import Kind, classify
from broadcast.protocol.validate import check_channel, check_message_id, check_name, check_text
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


@pytest.mark.parametrize(
    "text",
    [
        "two\nlines",
        "tab\there",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",
        "zoë",
        "{x}",
        "* x",
        "an emoji newer than the server's Unicode: \U0001fae8",
    ],
)
def test_good_text(text: str) -> None:
    assert check_text(text) == text


@pytest.mark.parametrize(
    "text",
    ["cr\r", "ls\u2028", "ps\u2029", "nel\x85", "zwsp\u200b", "bom\ufeff", "pua\ue000",
     "tag\U000e0067", "unassigned\u0378", "half\ud800", "shy\u00ad", "lri\u2066"],
)  # fmt: skip
def test_invisible_and_line_breaking_text_is_refused_without_echo(text: str) -> None:
    with pytest.raises(ProtocolError) as error:
        check_text(text)
    assert error.value.code is ErrorCode.BAD_TEXT
    bad = text[-1]
    assert f"U+{ord(bad):04X}" in error.value.message and bad not in error.value.message


@pytest.mark.parametrize(
    "name",
    ["", " alice", "alice ", "a  b", "x" * 33, "é" * 17, "a\nb", "a\x00", "a\tb", "*root", "!x",
     "#c", "/x", "[x]", "-x", ".x", "@x", "'x", "\u01c3 token_expired", "a:b", "a\uff1ab",
     "a\u2236b", "evil: * root joined", "a\u00a0b", "a\u3000b", "a\u2028b", "a\u202eb", "a\u200bb",
     "a\u200db", "a\ue000", "a\ud800", "a\u0378", "\u0301a", "\U0001f600", "a\U0001fae8"],
)  # fmt: skip
def test_bad_names(name: str) -> None:
    with pytest.raises(ProtocolError) as error:
        check_name(name)
    assert error.value.code is ErrorCode.BAD_NAME
    assert "\u202e" not in error.value.message and "\x00" not in error.value.message


@pytest.mark.parametrize(
    "name",
    ["alice", "zoë", "Zoë Smith", "_bot", "guest-3", "9lives", "山田太郎", "a*b", "bob[away]",
     "é" * 16, "x" * 32, "o'brien", "al 🎉"],
)  # fmt: skip
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("0-0", "0-0"), ("1732435200123-0", "1732435200123-0"), ("007-01", "7-1"),
     (f"{2**64 - 1}-{2**64 - 1}", f"{2**64 - 1}-{2**64 - 1}")],
)  # fmt: skip
def test_message_ids(given: str, canonical: str) -> None:
    assert check_message_id(given) == canonical


@pytest.mark.parametrize(
    "given",
    [f"{2**64}-0", f"0-{2**64}", "99999999999999999999-0", "1-0\n", "1", "-1-0", "1-0-0",
     "\uff11-0", "\u0661-0", "1 -0", "1-\ud800", "", 17, ["1-0"]],
)  # fmt: skip
def test_out_of_range_or_malformed_ids_are_bad_command(given: object) -> None:
    with pytest.raises(ProtocolError) as error:
        check_message_id(given)
    assert error.value.code is ErrorCode.BAD_COMMAND
    with pytest.raises(ProtocolError):
        commands.parse_frame(json.dumps({"type": "hello", "since": given}))


@given(st.text(max_size=50))
def test_any_message_id_is_canonical_and_in_range_or_refused(given: str) -> None:
    try:
        checked = check_message_id(given)
    except ProtocolError as error:
        assert error.code is ErrorCode.BAD_COMMAND
        return
    assert parse_message_id(checked) == parse_id(checked)  # the bus takes what we let through
    assert format_id(parse_message_id(checked)) == checked


@given(st.integers(0, 2**65), st.integers(0, 2**65))
def test_id_parts_must_be_below_two_to_the_64(ms: int, seq: int) -> None:
    given = f"{ms}-{seq}"
    if ms < 2**64 and seq < 2**64:
        assert check_message_id(given) == given
    else:
        with pytest.raises(ProtocolError):
            check_message_id(given)


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
        ('{"type": "publish", "text": 3}', ErrorCode.BAD_COMMAND),
        ('{"type": "publish"}', ErrorCode.BAD_TEXT),  # no text is empty text
        ('{"type": 7}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "name": 3}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "channel": ["general"]}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "since": 17}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "history": "20"}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "history": 1.5}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "since": "1-0", "epoch": 5}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "since": "1-0", "epoch": "a\\"b"}', ErrorCode.BAD_COMMAND),
        ('{"type": "publish", "text": "x", "ref": "\\ud800"}', ErrorCode.BAD_COMMAND),
        ('{"type": "publish", "text": "x", "ref": "' + "é" * 33 + '"}', ErrorCode.BAD_COMMAND),
        ('{"type": "publish", "text": "x", "ref": 3}', ErrorCode.BAD_COMMAND),
        ('{"type": "hello", "echo": "yes"}', ErrorCode.BAD_COMMAND),
    ],
)
def test_bad_commands(frame: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as error:
        commands.parse_frame(frame)
    assert error.value.code is code
    assert error.value.message


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 100_000,
        "{" + '"a":{' * 50_000,
        '{"type":"ping","x":' + "[" * 33 + "]" * 33 + "}",  # valid JSON, one level too deep
        "{" + '"a":[{"b":' * 20_000,
    ],
)
def test_deep_nesting_is_bad_json_not_a_recursion_error(frame: str) -> None:
    with pytest.raises(ProtocolError) as error:
        commands.parse_frame("{" + frame if not frame.startswith("{") else frame)
    assert error.value.code is ErrorCode.BAD_JSON
    assert "nested deeper than 32" in error.value.message


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine() -> None:
    # The object itself is one level; 31 more make 32.
    assert commands.parse_frame('{"type":"ping","x":' + "[" * 31 + "]" * 31 + "}") == (
        commands.Ping()
    )
    text = '[{\\"' + "[" * 500 + "{" * 500
    frame = json.dumps({"type": "publish", "text": text})
    assert commands.parse_frame(frame) == commands.Publish(text, None)


def test_depth_scan_of_an_unterminated_string_is_linear() -> None:
    """Many escaped quotes and no closing one: a naive string regex would be quadratic."""
    frame = "{" + "[" * 40 + '"' + '\\"' * 30_000
    with pytest.raises(ProtocolError) as error:
        commands.parse_frame(frame)  # quick: the test's time is the check
    assert error.value.code is ErrorCode.BAD_JSON
    assert not commands.nested_deeper_than("[" * 40 + '"' + "\\" * 2 + '"' + "]" * 40, 40)


@pytest.mark.parametrize(
    ("frame", "command"),
    [
        ("hello\n", commands.Publish("hello", None)),  # websocat: the newline is framing
        ("hello\r\n", commands.Publish("hello", None)),
        ("hello\n\n", commands.Publish("hello\n", None)),  # exactly one is stripped
        ("first\nsecond", commands.Publish("first\nsecond", None)),
        ('{"type":"ping"}\n', commands.Ping()),
        ('{"type":"publish","text":"a\\nb"}\r\n', commands.Publish("a\nb", None)),
    ],
)
def test_one_trailing_line_end_is_framing(frame: str, command: commands.Command) -> None:
    assert commands.parse_frame(frame) == command


@pytest.mark.parametrize("frame", ["\n", "\r\n", "a\rb", "a\r\n\r\n", "a\u2028b"])
def test_other_line_ends_are_refused(frame: str) -> None:
    with pytest.raises(ProtocolError) as error:
        commands.parse_frame(frame)
    assert error.value.code is ErrorCode.BAD_TEXT


@pytest.mark.parametrize("kind", ["\x1b]0;pwned\x07", "x" * 5000, "Publish!", "\u202eevil"])
def test_unknown_type_is_not_echoed(kind: str) -> None:
    with pytest.raises(ProtocolError) as error:
        commands.parse_frame(json.dumps({"type": kind}))
    assert error.value.code is ErrorCode.BAD_COMMAND
    assert kind not in error.value.message and len(error.value.message) < 100


def test_hello_carries_since_epoch_and_history() -> None:
    frame = '{"type":"hello","since":"0017-03","epoch":"a1b2","history":5}'
    hello = commands.parse_frame(frame)
    assert isinstance(hello, commands.Hello)
    assert hello.recovery == commands.Recovery("17-3", 5, "a1b2")  # the id, canonical
    # An empty epoch (``epoch=`` in a query) is no epoch; without since an epoch means nothing.
    assert commands.parse_recovery("1-0", "0", "") == commands.Recovery("1-0", 0, None)
    assert commands.parse_recovery(None, "5", "a1b2") == commands.Recovery(None, 5, None)


@pytest.mark.parametrize(
    ("history", "expected"),
    [("20", 20), ("0", None), ("\u00b2", ErrorCode.BAD_COMMAND),
     ("9" * 5000, ErrorCode.BAD_COMMAND), ("-1", ErrorCode.BAD_COMMAND),
     ("1001", ErrorCode.BAD_COMMAND), (" 3", ErrorCode.BAD_COMMAND)],
)  # fmt: skip
def test_history_from_the_query_is_plain_digits(history: str, expected: object) -> None:
    """``"\u00b2".isdigit()`` is true and ``int("9" * 5000)`` raises: neither may get through."""
    if isinstance(expected, ErrorCode):
        with pytest.raises(ProtocolError) as error:
            commands.parse_recovery(None, history)
        assert error.value.code is expected
    else:
        recovery = commands.parse_recovery(None, history)
        assert (recovery and recovery.last) == expected


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_COMMAND_OBJECTS = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "publish", "ping", "who"]) | st.text(max_size=8)},
    optional={key: _JSON for key in ("text", "name", "channel", "echo", "since", "history",
                                     "epoch", "ref")},
)  # fmt: skip


def _parses_or_refuses(frame: str) -> None:
    try:
        command = commands.parse_frame(frame)
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode) and error.message
    else:
        if isinstance(command, commands.Publish):
            assert check_text(command.text) == command.text


@given(st.text())
def test_any_frame_parses_or_is_refused_with_a_code(frame: str) -> None:
    _parses_or_refuses(frame)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@given(_JSON | st.text(alphabet='[]{}"\\', max_size=20), st.integers(0, 6), st.booleans())
def test_depth_scan_agrees_with_the_json_it_measures(
    value: object, limit: int, ascii: bool
) -> None:
    """For valid JSON, brackets in strings (escaped quotes and all) never count."""
    text = json.dumps(value, ensure_ascii=ascii)
    assert commands.nested_deeper_than(text, limit) == (_depth(value) > limit)


@given(st.text(alphabet='[]{}"\\:,1 ae\n', max_size=200))
def test_any_bracket_soup_parses_or_is_refused(frame: str) -> None:
    _parses_or_refuses("{" + frame)


@given(_COMMAND_OBJECTS | _JSON, st.sampled_from(["", "\n", "\r\n"]))
def test_any_json_value_parses_or_is_refused(value: object, end: str) -> None:
    _parses_or_refuses(json.dumps(value) + end)


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


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=20), st.integers(4, 64))
def test_splitter_gives_the_same_whatever_the_chunking(
    data: bytes, cuts: list[int], limit: int
) -> None:
    def items(chunks: list[bytes]) -> list[object]:
        splitter = LineSplitter(max_line_bytes=limit)
        out = [item for chunk in chunks for item in splitter.feed(chunk)]
        return [item.code if isinstance(item, ProtocolError) else item for item in out]

    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert items(chunks) == items([data])


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
    assert render_event({"type": "leave", "name": "al", "channel": "c"}) == b"* al left #c\n"
    assert render_event({"type": "gap", "channel": "c"}) == (
        b"* some messages in #c may have been lost\n"
    )
    assert render_event({"type": "ack"}) is None


def test_multi_line_message_continues_under_its_sender() -> None:
    event = {"type": "message", "sender": "alice", "text": "first\n* root joined #c\n\nbob: hi"}
    assert render_event(event) == (b"alice: first\n  | * root joined #c\n  | \n  | bob: hi\n")


@pytest.mark.parametrize(
    "event",
    [
        {"type": "message", "sender": "* root", "text": "x\ry\x1b[2J\u2028z"},
        {"type": "message"},
        {"type": "message", "sender": 5, "text": ["x"]},
        {"type": "join", "name": "evil\n* root", "channel": "a\nb"},
        {"type": "leave"},
        {"type": "gap", "channel": None},
    ],
)
def test_unchecked_events_render_scrubbed(event: dict[str, object]) -> None:
    """Events from another gateway's version may not pass today's checks: still no raw control
    bytes and no line that reads as a different sender or a notice."""
    rendered = render_event(event)
    assert rendered is not None
    lines = rendered.decode().split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        assert not any(ch < " " and ch != "\t" for ch in line)
        assert "\u2028" not in line
    if event["type"] == "message":
        assert lines[0].startswith("(invalid name): ") or lines[0].startswith("al")
    else:
        assert lines[0].startswith("* ") and len(lines) == 2


def test_server_lines_stay_one_line() -> None:
    assert (
        render_notice("you are\nnow \x1b]0;x\x07")
        == "* you are\ufffdnow \ufffd]0;x\ufffd\n".encode()
    )
    error = ProtocolError(ErrorCode.RATE_LIMITED, "slow down\r\n! fake", retry_after=0.04)
    assert (
        render_error(error)
        == "! rate_limited: slow down\ufffd\ufffd! fake (retry in 0.1 s)\n".encode()
    )
    assert render_error(ProtocolError(ErrorCode.RATE_LIMITED, "x", retry_after=0.41)) == (
        b"! rate_limited: x (retry in 0.5 s)\n"
    )


@pytest.mark.parametrize(
    "line", ["/\x1b]0;pwned\x07", "/" + "x" * 5000, "/na\u202eme bob", "/\x00"]
)
def test_unknown_line_command_is_not_echoed(line: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_line(line)
    message = error.value.message
    assert error.value.code is ErrorCode.BAD_COMMAND
    assert message.startswith("unknown command;") and len(message) < 120
    assert not any(ch in message for ch in "\x1b\x07\x00\u202e")


def test_plain_unknown_line_command_is_named() -> None:
    with pytest.raises(ProtocolError) as error:
        parse_line("/nick bob")
    assert "unknown command /nick;" in error.value.message


_ANY_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from("\n\r\t\u2028\u202e:*! "))


_NAME_LIKE = st.from_regex(r"[A-Za-zé_0-9][A-Za-z0-9 :*!|é-]{0,12}", fullmatch=True)


@settings(max_examples=300)  # a sixth of the examples get as far as rendering
@given(name=_ANY_TEXT | _NAME_LIKE, text=_ANY_TEXT)
def test_accepted_name_and_text_render_as_one_block_from_the_sender(name: str, text: str) -> None:
    """Whatever a client sends: refused, or shown as one block that starts with its name and
    holds no control character but the newlines the server writes."""
    try:
        name, text = check_name(name), check_text(text)
    except ProtocolError as error:
        assert error.code in (ErrorCode.BAD_NAME, ErrorCode.BAD_TEXT, ErrorCode.TEXT_TOO_LONG)
        event(f"refused: {error.code}")
        return
    event("accepted")
    rendered = render_event({"type": "message", "sender": name, "text": text}).decode()
    first, *more, last = rendered.split("\n")
    assert last == ""
    assert first.startswith(f"{name}: ") and first.index(":") == len(name)
    assert not first.startswith(("* ", "! ", " "))
    assert all(line.startswith(CONTINUATION) for line in more)
    assert (
        first.removeprefix(f"{name}: ")
        + "".join("\n" + line.removeprefix(CONTINUATION) for line in more)
        == text
    )
    assert not any(ch < " " and ch not in "\t\n" for ch in rendered)
    assert not any(ch in rendered for ch in "\x7f\x85\u2028\u2029\u202e\u200b")


# -- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (b"GET / HTTP/1.1\r\n", Kind.HTTP),
        (b"GET /healthz HTTP/1.1\r\n", Kind.HTTP),
        (b"POST /api/x HTTP/1.0\n", Kind.HTTP),
        (b"GET /healthz", Kind.UNDECIDED),  # a request line until its newline says otherwise
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


_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _reference_is_request_line(line: bytes) -> bool:
    """The rule written another way: three parts split on single spaces, a token, a visible
    target, ``HTTP/d.d`` and an optional CR."""
    line = line.removesuffix(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3:
        return False
    method, target, version = parts
    return (
        bool(method)
        and all(byte in _TCHARS for byte in method)
        and bool(target)
        and all(0x21 <= byte <= 0x7E or byte >= 0x80 for byte in target)
        and len(version) == 8
        and version[:5] == b"HTTP/"
        and version[5:6].isdigit()
        and version[6:7] == b"."
        and version[7:8].isdigit()
    )


_request_lines = st.builds(
    lambda method, target, major, minor, cr: (
        method + b" " + target + b" HTTP/%d.%d" % (major, minor) + cr
    ),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(_TCHARS[x % len(_TCHARS)] for x in b)),
    st.binary(min_size=1, max_size=40).map(lambda b: bytes(0x21 + x % 94 for x in b)),
    st.integers(0, 9),
    st.integers(0, 9),
    st.sampled_from([b"", b"\r"]),
)


@given(_request_lines, st.binary(max_size=40))
def test_every_request_line_is_http_at_every_prefix(line: bytes, rest: bytes) -> None:
    """Whatever the method and target, a request line is never taken for a line client, however
    few of its bytes have arrived."""
    for cut in range(len(line) + 1):
        assert classify(line[:cut]) is Kind.UNDECIDED
    assert classify(line + b"\n" + rest) is Kind.HTTP


@given(st.binary(max_size=60), st.binary(max_size=20))
def test_classify_agrees_with_the_rule_for_any_first_line(first: bytes, rest: bytes) -> None:
    """For any bytes with a newline, HTTP exactly when the first line is a request line."""
    line = first.split(b"\n", 1)[0]
    kind = classify(line + b"\n" + rest)
    assert (kind is Kind.HTTP) == _reference_is_request_line(line)


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
