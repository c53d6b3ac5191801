"""``broadcast-cli connect`` on a real pseudo-terminal, checked through a terminal emulator.

The chat runs as a subprocess on a 24x100 pty; a pyte screen shows what a person would see.
The other side is a real gateway subprocess, or a fake trio-websocket server in this process
where a test needs what a gateway never does (hostile text, dying and coming back on the same
port). Every wait is on the screen or on the server's state, under a deadline.
"""

from __future__ import annotations

import json
import signal
import socket
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
        await terminal.wait_for_text("* the server shut down; reconnecting")
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


# --- pasting, commands, outages, a wrong address (issue 12) -----------------------------------

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # what a terminal sends around a paste


async def test_a_pasted_block_of_lines_is_one_message_shown_indented(
    gateway_process: GatewayProcess,
) -> None:
    channel = "pty-paste"
    async with (
        raw_client(gateway_process.url, "bob", channel) as bob,
        chat(gateway_process.url, "--name", "alice", "--channel", channel) as terminal,
    ):
        # Terminals paste line breaks as CR; a paste is marked, so none of them is Enter.
        terminal.type(f"{PASTE_START}Traceback:\r  File x.py\r    boom(){PASTE_END}")
        await terminal.wait_for_text("  File x.py")  # in the prompt, not sent yet
        terminal.type("\r")
        event = await next_event(bob, lambda e: e.get("type") == "message")
        assert event["text"] == "Traceback:\n  File x.py\n    boom()"
        await terminal.wait_for_text("] alice: Traceback:")
        first = terminal.row_of("] alice: Traceback:")
        lines = terminal.lines()
        indent = " " * len(lines[first].split("] alice: ")[0] + "] alice: ")
        assert lines[first + 1 : first + 3] == [f"{indent}  File x.py", f"{indent}    boom()"]

        # Someone else's multi-line message is shown the same way.
        await bob.send_message(json.dumps({"type": "publish", "text": "one\ntwo"}))
        await terminal.wait_for_text("] bob: one")
        row = terminal.row_of("] bob: one")
        assert terminal.lines()[row + 1] == " " * len(terminal.lines()[row].split("one")[0]) + "two"
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_name_renames_and_help_lists_the_commands(gateway_process: GatewayProcess) -> None:
    channel = "pty-rename"
    async with (
        raw_client(gateway_process.url, "bob", channel) as bob,
        chat(gateway_process.url, "--name", "alice", "--channel", channel) as terminal,
    ):
        terminal.type("/name carol\r")
        await terminal.wait_for_text("* you are now carol")

        terminal.type("as carol\r")
        event = await next_event(bob, lambda e: e.get("type") == "message")
        assert (event["sender"], event["text"]) == ("carol", "as carol")
        await terminal.wait_for_text("] carol: as carol")

        terminal.type("/name  \r")
        await terminal.wait_for_text("! usage: /name NAME")
        terminal.type("/help\r")
        await terminal.wait_for_text("* commands: /who")
        assert "/name NAME (change your name)" in terminal.text().replace("\n", "")
        terminal.type("/frobnicate\r")
        await terminal.wait_for_text("! unknown command /frobnicate;")
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_a_long_outage_is_one_status_line_that_updates_in_place() -> None:
    async with fake_gateway() as (fake, nursery), chat(fake.url, "--name", "alice") as terminal:
        await fake.wait_joined()
        fake.stop()
        await terminal.wait_for_text("* connection lost: ")
        # The second failed attempt updates the status line instead of adding a line.
        await terminal.wait_for_text("(attempt 2): connection refused", seconds=20)
        text = terminal.text()
        assert text.count("reconnecting to ") == 1, terminal.dump()
        assert "cannot reach" not in text and text.count("connection lost") == 1
        # The status line is the last line, below the prompt.
        assert "(attempt 2)" in terminal.last_line()

        await fake.start(nursery)
        await terminal.wait_for(
            lambda: terminal.text().count("* connected to ") == 2, "a second connection", 30
        )
        await terminal.wait_for(
            lambda: "reconnecting to" not in terminal.text(), "the status line to go"
        )
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0


async def test_connect_to_a_port_where_nothing_listens_gives_up_at_once() -> None:
    with socket.socket() as holder:  # bound, not listening: connecting is refused
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        terminal = PtyTerminal(
            [*CLI, "connect", "--port", str(port)], env=cli_env(), rows=ROWS, columns=COLUMNS
        )
        try:
            status = await terminal.wait_exit(seconds=10)
        finally:
            terminal.close()
    assert status == 2
    assert f"broadcast-cli: cannot reach ws://127.0.0.1:{port}/: connection refused" in (
        terminal.text()
    )
    assert "retrying" not in terminal.text() and b"Traceback" not in terminal.output


async def test_version() -> None:
    result = await run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("broadcast-cli ")
    assert result.stdout.decode().split()[1][0].isdigit()


async def test_a_busy_server_is_waited_for_as_its_retry_after_says() -> None:
    """The first connection meets ``503`` with ``Retry-After: 1`` (a full gateway): the chat
    waits that long (and a little more), then connects, instead of giving up."""
    refused_at: list[float] = []

    async def busy(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        refused_at.append(trio.current_time())
        await stream.send_all(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
            b"Content-Length: 11\r\nConnection: close\r\n\r\nserver_full"
        )
        await stream.aclose()

    busy_scope, busy_gone = trio.CancelScope(), trio.Event()

    async def serve_busy(*, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        try:
            with busy_scope:
                await trio.serve_tcp(busy, 0, host="127.0.0.1", task_status=task_status)
        finally:
            busy_gone.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_busy)
        port = listeners[0].socket.getsockname()[1]
        fake = FakeGateway()
        terminal = PtyTerminal(
            [*CLI, "connect", "--port", str(port)], env=cli_env(), rows=ROWS, columns=COLUMNS
        )
        try:
            await terminal.wait_for_text("* cannot reach ")
            assert "HTTP 503" in terminal.text() and len(refused_at) == 1
            busy_scope.cancel()  # the port is free again, for the gateway
            await busy_gone.wait()
            await fake.start(nursery, port)
            await terminal.wait_for_text("* connected to ")
            assert trio.current_time() - refused_at[0] >= 1.0  # Retry-After was honoured
            terminal.type("\x04")
            assert await terminal.wait_exit() == 0
        finally:
            terminal.close()
        nursery.cancel_scope.cancel()


async def test_a_restarted_history_is_a_calm_notice_not_a_loss() -> None:
    """The gateway came back with a new, empty history (another epoch): the chat resumes with
    the epoch it knew, hears ``reset`` with ``complete``, and says so calmly."""
    async with fake_gateway() as (fake, nursery), chat(fake.url, "--name", "alice") as terminal:
        fake.epoch = "epoch-1"
        await fake.wait_joined()
        await fake.publish("bob", "before the restart")
        await terminal.wait_for_text("] bob: before the restart")

        fake.stop()
        await terminal.wait_for_text("* connection lost: ")
        fake.history.clear()
        fake.epoch = "epoch-2"
        await fake.start(nursery)
        await terminal.wait_for_text("* the server's history of this channel restarted")
        assert fake.clients[-1].query["epoch"] == "epoch-1"
        assert "lost" not in terminal.text().replace("connection lost", "")

        # The new history's ids start afresh: they are not mistaken for ones already seen.
        await fake.publish("bob", "after the restart")
        await terminal.wait_for_text("] bob: after the restart")
        terminal.type("\x04")
        assert await terminal.wait_exit() == 0
