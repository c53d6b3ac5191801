"""``broadcast-cli connect`` on a real pseudo-terminal, checked through a terminal emulator.

The chat runs as a subprocess on a 24x100 pty; a pyte screen shows what a person would see.
The other side is a real gateway subprocess, or a fake trio-websocket server in this process
where a test needs what a gateway never does (hostile text, dying and coming back on the same
port). Every wait is on the screen or on the server's state, under a deadline.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tests.support.cli_process import CLI, cli_env, next_event, raw_client, run_cli
from tests.support.fake_gateway import FakeGateway
from tests.support.gateway_process import GatewayProcess
from tests.support.pty_terminal import PtyTerminal

ROWS, COLUMNS = 24, 100


@asynccontextmanager
async def chat(url: str, *args: str) -> AsyncIterator[PtyTerminal]:
    """``connect`` on a pty, once its status line says it is connected."""
    terminal = PtyTerminal(
        [*CLI, "connect", "--url", url, *args], env=cli_env(), rows=ROWS, columns=COLUMNS
    )
    try:
        await terminal.wait_for_text("* connected to ")
        yield terminal
    finally:
        terminal.close()


@asynccontextmanager
async def fake_gateway() -> AsyncIterator[tuple[FakeGateway, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        fake = FakeGateway()
        await fake.start(nursery)
        yield fake, nursery
        nursery.cancel_scope.cancel()


def prompt_holds(terminal: PtyTerminal, prompt: str, text: str) -> bool:
    """The prompt with ``text`` typed is the last line, with the cursor right after the text."""
    row = len(terminal.lines()) - 1 - terminal.lines()[::-1].index(terminal.last_line())
    return terminal.last_line() == f"{prompt}{text}".rstrip() and (
        terminal.screen.cursor.y,
        terminal.screen.cursor.x,
    ) == (row, len(prompt + text))


async def test_typed_lines_are_sent_and_a_half_typed_line_survives_incoming_messages(
    gateway_process: GatewayProcess,
) -> None:
    channel = "pty-typing"
    async with (
        raw_client(gateway_process.url, "bob", channel) as bob,
        chat(gateway_process.url, "--name", "alice", "--channel", channel) as terminal,
    ):
        assert f"* connected to {gateway_process.url} as alice in #{channel}" in terminal.text()
        prompt = f"#{channel}> "
        terminal.type("hel")
        await terminal.wait_for(lambda: prompt_holds(terminal, prompt, "hel"), "hel at the prompt")

        await bob.send_message(json.dumps({"type": "publish", "text": "hi alice"}))
        await terminal.wait_for(
            lambda: terminal.row_of("bob: hi alice") >= 0 and prompt_holds(terminal, prompt, "hel"),
            "bob's message above the prompt, which still holds 'hel'",
        )
        assert terminal.row_of("bob: hi alice") < terminal.row_of(prompt)

        terminal.type("lo\r")
        event = await next_event(bob, lambda e: e.get("type") == "message")
        assert (event["sender"], event["text"]) == ("alice", "hello")
        # Our own line, shown once the server acked it (it is not echoed to us).
        await terminal.wait_for_text("] alice: hello")
        await terminal.wait_for(lambda: prompt_holds(terminal, prompt, ""), "an empty prompt")

        terminal.type("exit\r")
        assert await terminal.wait_exit() == 0
        assert b"Traceback" not in terminal.output


async def test_a_refused_line_is_explained(gateway_process: GatewayProcess) -> None:
    async with chat(gateway_process.url, "--channel", "pty-refused") as terminal:
        terminal.type("x" * 4100 + "\r")
        await terminal.wait_for_text("! text_too_long: ")
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_text_from_the_network_is_shown_escaped_never_raw() -> None:
    async with fake_gateway() as (fake, _), chat(fake.url, "--name", "alice") as terminal:
        await fake.wait_joined()
        await fake.broadcast(
            {
                "type": "message",
                "id": "1-0",
                "channel": "general",
                "sender": "ev\x1b[2Jil",
                "text": "\x1b]0;pwned\x07 look \u202eright\x9b",
                "ts": 1732435200.0,
                "origin": "fake/0",
            }
        )
        await terminal.wait_for_text("look")
        line = terminal.lines()[terminal.row_of("look")]
        assert line.endswith("] ev\\x1b[2Jil: \\x1b]0;pwned\\x07 look \\u202eright\\x9b")
        assert b"\x1b]0;pwned" not in terminal.output
        assert b"\x07" not in terminal.output
        assert b"\x1b[2J" not in terminal.output
        assert "\u202e".encode() not in terminal.output
        assert terminal.screen.title == ""


@pytest.mark.parametrize(
    "keys",
    ["exit\r", "/quit\r", "\x04", "\x03", signal.SIGTERM, signal.SIGHUP],
    ids=["exit", "quit", "ctrl-d", "ctrl-c", "sigterm", "sighup"],
)
async def test_leaving_exits_0_and_closes_the_websocket_with_1000(keys: str | int) -> None:
    async with fake_gateway() as (fake, _), chat(fake.url) as terminal:
        if keys in ("\x03", signal.SIGTERM, signal.SIGHUP):  # these leave even mid-line
            terminal.type("half typed")
            await terminal.wait_for_text("half typed")
        if isinstance(keys, str):
            terminal.type(keys)
        else:
            terminal.child.kill(keys)
        assert await terminal.wait_exit() == 0
        assert b"Traceback" not in terminal.output
        await fake.wait_until(lambda: fake.clients[-1].close_code is not None)
        assert fake.clients[-1].close_code == 1000


async def test_a_dropped_connection_is_reported_and_comes_back() -> None:
    async with fake_gateway() as (fake, nursery), chat(fake.url, "--name", "alice") as terminal:
        fake.stop()
        await terminal.wait_for_text("* connection lost: ")
        assert "reconnecting in " in terminal.text()

        terminal.type("into the void\r")
        await terminal.wait_for_text("! not connected, not sent: into the void")

        await fake.start(nursery)  # the same port again
        await terminal.wait_for(
            lambda: terminal.text().count("* connected to ") == 2, "a second connection"
        )
        terminal.type("back again\r")
        await fake.wait_until(lambda: "back again" in fake.clients[-1].published)
        await terminal.wait_for_text("] alice: back again")
        assert [c.published for c in fake.clients] == [[], ["back again"]]

        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_without_a_terminal_stdin_lines_are_sent() -> None:
    async with fake_gateway() as (fake, _):
        result = await run_cli("connect", "--url", fake.url, stdin=b"one\n\ntwo\nexit\nignored\n")
        assert result.returncode == 0, result.stderr
        assert fake.clients[0].published == ["one", "two"]
        out = result.stdout.decode()
        assert "] guest-1: one" in out and "] guest-1: two" in out
        await fake.wait_until(lambda: fake.clients[0].close_code is not None)
        assert fake.clients[0].close_code == 1000


async def test_after_a_reconnect_what_was_missed_is_recovered_and_nothing_shown_twice() -> None:
    async with fake_gateway() as (fake, nursery), chat(fake.url, "--name", "alice") as terminal:
        await fake.wait_joined()
        await fake.publish("bob", "seen before")
        await terminal.wait_for_text("] bob: seen before")
        terminal.type("mine\r")
        await terminal.wait_for_text("] alice: mine")  # acked: its id is now known
        own_id = fake.history["general"][-1]["id"]

        fake.stop()
        await terminal.wait_for_text("* connection lost: ")
        await fake.publish("bob", "missed one")
        await fake.publish("bob", "missed two")
        fake.replay_overlap = 2  # replays "seen before" and our own "mine" as well
        await fake.start(nursery)
        await fake.wait_joined()

        await terminal.wait_for_text("* recovered 2 missed messages")
        assert fake.clients[-1].query["since"] == own_id
        text = terminal.text()
        for line in ("bob: seen before", "alice: mine", "bob: missed one", "bob: missed two"):
            assert text.count(line) == 1, terminal.dump()
        assert (
            terminal.row_of("missed one")
            < terminal.row_of("missed two")
            < terminal.row_of("* recovered 2")
        )
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_a_draining_server_is_left_for_another_at_once() -> None:
    async with fake_gateway() as (fake, _), chat(fake.url, "--name", "alice") as terminal:
        await fake.wait_joined()
        await fake.close_all(1012, "draining")
        await terminal.wait_for_text("* server is restarting; reconnecting")
        await terminal.wait_for(
            lambda: terminal.text().count("* connected to ") == 2, "a second connection"
        )
        assert "recovered" not in terminal.text()  # nothing was missed: nothing to say
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_history_shows_the_last_messages_on_joining() -> None:
    async with fake_gateway() as (fake, _):
        for text in ("first", "second", "third"):
            await fake.publish("bob", text)
        async with chat(fake.url, "--history", "2") as terminal:
            await terminal.wait_for_text("* 2 earlier messages from the history above")
            assert "first" not in terminal.text()
            assert terminal.row_of("bob: second") < terminal.row_of("bob: third")
            assert fake.clients[0].query["history"] == "2"
            terminal.type("\x04")
            assert await terminal.wait_exit() == 0
