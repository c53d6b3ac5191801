"""The CLI's pure parts: sanitizing, rendering, backoff, the command line. No I/O."""

from __future__ import annotations

import json
import random
import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcast.client.backoff import Backoff
from broadcast.client.command import UsageError, compose_url, main
from broadcast.client.connection import describe_close, parse_frame
from broadcast.client.render import (
    disconnected_line,
    error_line,
    json_line,
    message_line,
    render_event,
)
from broadcast.client.sanitize import sanitize

UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def _unsafe_chars(text: str) -> list[str]:
    return [ch for ch in text if ch != "\t" and unicodedata.category(ch) in UNSAFE]


# --- sanitize ------------------------------------------------------------------------------


# Any code point (lone surrogates included), with the unsafe categories drawn often.
ANY_CHARACTER = st.characters(codec=None) | st.characters(categories=sorted(UNSAFE))


@given(st.text(alphabet=ANY_CHARACTER))
def test_sanitize_output_never_holds_a_control_character(text: str) -> None:
    assert _unsafe_chars(sanitize(text)) == []


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=tuple(UNSAFE))))
def test_sanitize_keeps_safe_text_unchanged(text: str) -> None:
    assert sanitize(text) == text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),  # set the window title
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear the screen
        ("a\rb\nc", "a\\rb\\nc"),  # rewrite the line, fake a new line
        ("\x7f\x9b31m", "\\x7f\\x9b31m"),  # DEL; C1 CSI, which some terminals obey
        ("abc\u202egnp.exe", "abc\\u202egnp.exe"),  # right-to-left override
        ("x\u2028y", "x\\u2028y"),  # line separator
        ("lone \ud800", "lone \N{REPLACEMENT CHARACTER}"),  # JSON can carry a lone surrogate
        ("tab\tstays", "tab\tstays"),
        ("héllo 世界 👋", "héllo 世界 👋"),
    ],
)
def test_sanitize_escapes_visibly(raw: str, shown: str) -> None:
    assert sanitize(raw) == shown


# --- render --------------------------------------------------------------------------------

TS = 1732435200.123  # 2024-11-24 08:00:00 UTC


def test_message_line_reads_time_sender_text() -> None:
    event = {"type": "message", "id": "1-0", "sender": "alice", "text": "hello", "ts": TS}
    assert render_event(event, time.gmtime) == "[08:00] alice: hello"
    assert message_line("alice", "hello", TS, time.gmtime) == "[08:00] alice: hello"


def test_join_and_leave_lines() -> None:
    join = {"type": "join", "channel": "general", "name": "bob", "ts": TS}
    assert render_event(join, time.gmtime) == "[08:00] * bob joined #general"
    assert render_event({**join, "type": "leave"}, time.gmtime) == "[08:00] * bob left #general"


def test_other_events_are_not_rendered() -> None:
    for kind in ("welcome", "ack", "pong", "surprise"):
        assert render_event({"type": kind}) is None


def test_render_sanitizes_every_field_and_survives_odd_types() -> None:
    hostile = {"type": "message", "sender": "ev\x1b[31mil", "text": "\x1b]0;x\x07", "ts": "soon"}
    line = render_event(hostile)
    assert line is not None
    assert line.endswith("ev\\x1b[31mil: \\x1b]0;x\\x07")
    assert _unsafe_chars(line) == []
    odd = render_event({"type": "join", "name": None, "channel": 7, "ts": None})
    assert odd is not None and odd.endswith("* None joined #7")


@given(
    st.sampled_from(["message", "join", "leave"]),
    st.text(alphabet=ANY_CHARACTER),
    st.text(alphabet=ANY_CHARACTER),
)
def test_rendered_events_never_hold_a_control_character(kind: str, who: str, text: str) -> None:
    event = {"type": kind, "sender": who, "name": who, "channel": text, "text": text, "ts": 0}
    line = render_event(event)
    assert line is not None and _unsafe_chars(line) == []


def test_error_line_keeps_the_code() -> None:
    event = {"type": "error", "code": "text_too_long", "message": "text is 5000 bytes", "ref": "1"}
    assert error_line(event) == "! text_too_long: text is 5000 bytes"


def test_status_lines() -> None:
    lost = disconnected_line("ws://h:1/", "the connection dropped", 1.42, was_connected=True)
    assert lost == "* connection lost: the connection dropped; reconnecting in 1.4 s"
    never = disconnected_line("ws://h:1/", "connection refused", 0.5, was_connected=False)
    assert never == "* cannot reach ws://h:1/: connection refused; retrying in 0.5 s"


def test_json_line_is_the_frame_as_received_when_safe() -> None:
    raw = '{"type":"message","id":"1-0","text":"héllo \\u001b"}'
    assert json_line(raw, json.loads(raw)) == raw


def test_json_line_re_encodes_a_frame_that_would_break_lines_or_the_terminal() -> None:
    for raw in ('{"type":"message",\n"text":"a"}', '{"type":"message","text":"a\x9b\u202e"}'):
        line = json_line(raw, json.loads(raw))
        assert "\n" not in line and _unsafe_chars(line) == []
        assert json.loads(line) == json.loads(raw)


def test_parse_frame_ignores_what_is_not_a_json_object() -> None:
    assert parse_frame(b"\x00binary") is None
    assert parse_frame("not json") is None
    assert parse_frame("[1, 2]") is None
    frame = parse_frame('{"type":"pong"}')
    assert frame is not None and frame.kind == "pong" and frame.raw == '{"type":"pong"}'


def test_close_reasons_read_plainly() -> None:
    from trio_websocket import CloseReason

    assert describe_close(None) == "the connection dropped"
    assert describe_close(CloseReason(1006, None)) == "the connection dropped"
    assert describe_close(CloseReason(1001, "bye")) == "the server is shutting down (1001: bye)"
    assert describe_close(CloseReason(4008, None)) == "this client read too slowly (4008)"


# --- backoff -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    backoff = Backoff(base=1.0, cap=10.0, rng=random.Random(7))
    ceilings = []
    for _ in range(40):
        ceilings.append(backoff.ceiling())
        assert 0 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings[:6] == [1, 2, 4, 8, 10, 10]
    assert ceilings[-1] == 10
    backoff.reset()
    assert backoff.ceiling() == 1


def test_backoff_delays_are_spread_not_synchronised() -> None:
    delays = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(delays) < 0.1 and max(delays) > 0.9  # full jitter: anywhere in [0, base]


# --- command line --------------------------------------------------------------------------


def test_url_from_host_and_port() -> None:
    assert compose_url(None, None, None) == "ws://127.0.0.1:12345/"
    assert compose_url("example.org", 8080, None) == "ws://example.org:8080/"
    assert compose_url("::1", 9, None) == "ws://[::1]:9/"
    assert compose_url(None, None, "wss://chat.example.org") == "wss://chat.example.org/"
    assert compose_url(None, None, "ws://h:1/room") == "ws://h:1/room"
    assert compose_url(None, None, "ws://h:1?x=1") == "ws://h:1/?x=1"


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("h", None, "ws://h:1/"),
        (None, None, "http://h/"),
        (None, None, "ws://h:x/"),
        (None, None, "ws:///"),
    ],
)
def test_bad_urls_are_usage_errors(host: str | None, port: int | None, url: str) -> None:
    with pytest.raises(UsageError):
        compose_url(host, port, url)


def test_main_returns_exit_codes_instead_of_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["connect", "--help"]) == 0
    assert "--channel" in capsys.readouterr().out
    assert main(["send", "hi", "--name", " bad "]) == 2
    assert main(["listen", "--channel", "no spaces"]) == 2
    assert main(["send", "hi", "--url", "http://x/"]) == 2
    assert main(["send", "hi", "--port", "0"]) == 2
    assert main([]) == 2
    assert "Traceback" not in capsys.readouterr().err
