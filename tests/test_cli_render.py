"""The CLI's pure parts: sanitizing, rendering, recovery bookkeeping, backoff, the handshake
URL, the command line. No I/O."""

from __future__ import annotations

import json
import random
import time
import unicodedata
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcast.client.backoff import SOON_SECONDS, Backoff
from broadcast.client.command import UsageError, build_parser, compose_url, main
from broadcast.client.connection import Frame, Target, describe_close, handshake_url, parse_frame
from broadcast.client.recovery import Replay, SeenMessages, message_id
from broadcast.client.render import (
    HISTORY_RESTARTED_LINE,
    LOST_WHILE_AWAY_LINE,
    disconnected_line,
    error_line,
    json_line,
    message_line,
    outage_line,
    recovered_line,
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
    for kind in ("welcome", "ack", "pong", "recovered", "surprise"):
        assert render_event({"type": kind}) is None


def test_a_gap_is_told_as_a_possible_loss() -> None:
    line = render_event({"type": "gap", "channel": "general"})
    assert line == "! some messages may have been lost (server link interrupted)"


@pytest.mark.parametrize(
    ("complete", "resumed", "shown", "line"),
    [
        (True, True, 3, "* recovered 3 missed messages"),
        (True, True, 1, "* recovered 1 missed message"),
        (True, True, 0, None),  # nothing missed: nothing to say
        (False, True, 2, "! some messages were lost while disconnected"),
        (False, True, 0, "! some messages were lost while disconnected"),
        (True, False, 5, "* 5 earlier messages from the history above"),
        (True, False, 0, None),
        (False, False, 0, "! some earlier messages could not be fetched"),
    ],
)
def test_recovered_lines(complete: bool, resumed: bool, shown: int, line: str | None) -> None:
    event = {"type": "recovered", "channel": "general", "count": shown + 2, "complete": complete}
    replay = Replay("1-0", shown=shown) if resumed else Replay(None, history=9, shown=shown)
    assert recovered_line(event, replay) == line
    assert recovered_line(event, None) is None  # a replay we never asked for


def test_a_restarted_history_is_a_calm_notice_unless_messages_may_be_lost() -> None:
    resumed = Replay("1-0")
    restarted = {"type": "recovered", "count": 0, "complete": True, "reset": True}
    assert recovered_line(restarted, resumed) == HISTORY_RESTARTED_LINE
    assert HISTORY_RESTARTED_LINE.startswith("* ") and "lost" not in HISTORY_RESTARTED_LINE
    two = Replay("1-0", shown=2)
    assert recovered_line(restarted, two) == f"{HISTORY_RESTARTED_LINE}; recovered 2 messages"
    lossy = {**restarted, "complete": False}
    assert recovered_line(lossy, resumed) == LOST_WHILE_AWAY_LINE


def test_a_replay_counts_the_new_messages_before_recovered() -> None:
    replay = Replay("1-0")
    for event in ({"type": "message", "id": "2-0"}, {"type": "join"}, {"type": "recovered"}):
        replay.note(Frame(json.dumps(event), event))
    replay.note(_message("3-0"))  # live, after the replay
    assert (replay.shown, replay.over, replay.resumed) == (1, True, True)


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
    assert line is not None
    _first, *more = line.split("\n")
    assert _unsafe_chars(line.replace("\n", "")) == []
    # Only a message's own line breaks make lines, each indented under the first: none of
    # them can pass for a message of its own, which starts at the left edge with its time.
    assert len(more) == (text.count("\n") if kind == "message" else 0)
    assert all(line.startswith(" ") for line in more)


def test_a_multi_line_message_keeps_its_lines_indented_under_the_first() -> None:
    line = message_line("alice", "Traceback:\n  File x\n\x1b[2Jend", TS, time.gmtime)
    assert line.split("\n") == [
        "[08:00] alice: Traceback:",
        "                 File x",
        "               \\x1b[2Jend",
    ]
    long_name = message_line("a" * 32, "one\ntwo", TS, time.gmtime).split("\n")
    assert long_name[1] == " " * 24 + "two"  # a long name does not push the block away


def test_error_line_keeps_the_code() -> None:
    event = {"type": "error", "code": "text_too_long", "message": "text is 5000 bytes", "ref": "1"}
    assert error_line(event) == "! text_too_long: text is 5000 bytes"


def test_status_lines() -> None:
    lost = disconnected_line("ws://h:1/", "the connection dropped", 1.42, was_connected=True)
    assert lost == "* connection lost: the connection dropped; reconnecting in 1.4 s"
    never = disconnected_line("ws://h:1/", "connection refused", 0.5, was_connected=False)
    assert never == "* cannot reach ws://h:1/: connection refused; retrying in 0.5 s"
    drain = "the server shut down (1012: draining)"
    soon = disconnected_line("ws://h:1/", drain, 0.04, was_connected=True, shut_down=True)
    assert soon == "* the server shut down; reconnecting"
    later = disconnected_line("ws://h:1/", drain, 1.5, was_connected=True, shut_down=True)
    assert later == "* the server shut down; reconnecting in 1.5 s"
    assert outage_line("ws://h:1/", "connection refused", 4.2, 3) == (
        "* reconnecting to ws://h:1/ in 4 s (attempt 3): connection refused"
    )


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
    assert describe_close(CloseReason(1001, "bye")) == "the server shut down (1001: bye)"
    assert describe_close(CloseReason(4008, None)) == "this client read too slowly (4008)"
    assert describe_close(CloseReason(4010, "idle: no reply to ping")) == (
        "the server heard nothing from this client for too long (4010: idle: no reply to ping)"
    )
    assert describe_close(CloseReason(1012, "draining")) == (
        "the server shut down (1012: draining)"
    )


# --- recovery: ids seen, where to resume ---------------------------------------------------


def _message(message_id: object) -> Frame:
    event = {"type": "message", "id": message_id, "sender": "a", "text": "t"}
    return Frame(json.dumps(event), event)


def test_a_message_id_is_an_integer_pair_or_nothing() -> None:
    assert message_id("1732435200123-7") == (1732435200123, 7)
    for bad in ("", "12", "1-", "-1", "a-1", "1-2-3", " 1-2", "1_0-2", "١-٢", None, 12):
        assert message_id(bad) is None


def test_a_message_seen_before_is_dropped_and_others_pass() -> None:
    seen = SeenMessages()
    assert seen.admit(_message("5-0"))
    assert not seen.admit(_message("5-0"))
    assert seen.admit(_message("5-1"))
    for other in ({"type": "join", "name": "bob"}, {"type": "recovered", "count": 0}):
        assert seen.admit(Frame(json.dumps(other), other))
        assert seen.admit(Frame(json.dumps(other), other))  # not messages: never dropped


def test_resuming_starts_after_the_newest_id_compared_as_numbers() -> None:
    seen = SeenMessages()
    assert seen.newest_text is None
    for raw in ("9-5", "10-0", "9-7"):  # as strings "9-7" > "10-0"; as ids it is older
        seen.admit(_message(raw))
    assert seen.newest_text == "10-0"


def test_our_own_acked_message_counts_as_seen() -> None:
    seen = SeenMessages()
    ack = {"type": "ack", "ref": "c-1", "id": "20-0"}
    assert seen.admit(Frame(json.dumps(ack), ack))  # the ack itself reaches the chat
    assert seen.newest_text == "20-0"
    assert not seen.admit(_message("20-0"))  # our line, replayed to us: already on screen


def test_a_message_without_a_usable_id_is_shown_but_not_remembered() -> None:
    seen = SeenMessages()
    assert seen.admit(_message("garbage")) and seen.admit(_message("garbage"))
    assert seen.admit(_message(None))
    assert seen.newest_text is None and len(seen) == 0


def test_seen_ids_are_bounded_forgetting_the_oldest() -> None:
    seen = SeenMessages(capacity=3)
    for n in range(10):
        seen.admit(_message(f"{n}-0"))
    assert len(seen) == 3
    assert not seen.admit(_message("9-0")) and not seen.admit(_message("7-0"))
    assert seen.admit(_message("0-0"))  # long forgotten; a replay never reaches back that far
    assert seen.newest_text == "9-0"


# --- the handshake URL ---------------------------------------------------------------------


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_the_handshake_query_names_the_client_and_its_channel() -> None:
    target = Target("ws://h:1/", "alice", "general")
    assert handshake_url(target) == "ws://h:1/?channel=general&name=alice"
    assert _query(handshake_url(Target("ws://h:1/", None, "x"))) == {"channel": ["x"]}


def test_the_handshake_query_is_urlencoded() -> None:
    target = Target("ws://h:1/", "Zoë & co=1?", "a.b_c-d")
    url = handshake_url(target)
    assert " " not in url and "ë" not in url
    assert _query(url) == {"channel": ["a.b_c-d"], "name": ["Zoë & co=1?"]}


def test_the_handshake_query_asks_for_a_replay_and_no_notices() -> None:
    quiet = Target("ws://h:1/", None, "general", announce=False, history=5)
    assert _query(handshake_url(quiet, history=5)) == {
        "channel": ["general"],
        "announce": ["0"],
        "history": ["5"],
    }
    resumed = _query(handshake_url(quiet, since="17-3", history=5))
    assert resumed["since"] == ["17-3"] and "history" not in resumed  # since wins


def test_the_handshake_query_keeps_parameters_of_the_url() -> None:
    target = Target("wss://h/chat?token=abc&name=old", "alice", "general")
    url = handshake_url(target, since="1-0")
    assert url.startswith("wss://h/chat?")
    assert _query(url) == {
        "token": ["abc"],
        "name": ["alice"],
        "channel": ["general"],
        "since": ["1-0"],
    }


# --- backoff -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap_with_equal_jitter() -> None:
    backoff = Backoff(base=1.0, cap=10.0, rng=random.Random(7))
    ceilings = []
    for _ in range(40):
        ceilings.append(backoff.ceiling())
        assert ceilings[-1] / 2 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings[:6] == [1, 2, 4, 8, 10, 10]
    assert ceilings[-1] == 10
    backoff.reset()
    assert backoff.ceiling() == 1


def test_after_a_drain_the_retry_comes_at_once_and_the_next_backs_off() -> None:
    backoff = Backoff(rng=random.Random(3))
    assert 0 <= backoff.soon() <= SOON_SECONDS
    assert backoff.failures == 1 and backoff.ceiling() == 2


def test_backoff_delays_are_spread_not_synchronised() -> None:
    delays = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(delays) < 0.6 and max(delays) > 0.9  # anywhere in [base / 2, base]


def test_a_retry_after_is_honoured_with_a_little_jitter_on_top() -> None:
    delays = [Backoff(rng=random.Random(seed)).at_least(4.0) for seed in range(200)]
    assert all(4.0 <= delay <= 5.0 for delay in delays)
    assert max(delays) - min(delays) > 0.5


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
    assert main(["listen", "--history", "1001"]) == 2
    assert main(["connect", "--history", "-1"]) == 2
    assert main(["connect", "--history", "ten"]) == 2
    assert main(["send", "hi", "--history", "3"]) == 2  # send replays nothing
    assert build_parser().parse_args(["listen", "--history", "1000"]).history == 1000
    assert build_parser().parse_args(["connect"]).history == 0
    assert main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_presence_diff_says_who_came_and_went() -> None:
    event = {
        "type": "presence_diff",
        "channel": "general",
        "joined": ["bob", "carol"],
        "left": ["\x1b[2Jdave"],
        "more_joined": 3,
        "more_left": 0,
        "ts": TS,
    }
    assert render_event(event, time.gmtime) == (
        "[08:00] * bob, carol, 3 more joined #general\n[08:00] * \\x1b[2Jdave left #general"
    )
    assert render_event({**event, "joined": [], "left": [], "more_joined": 0}) is None
