"""Presence and channels in the CLI: ``broadcast-cli who``, and ``/who`` and ``/join`` in
``connect``.

Against a real gateway subprocess (in-process bus) wherever a gateway can show it: the others
are raw WebSocket clients named in the handshake query, written against docs/protocol.md. The
fake gateway serves where a test must see the handshake query itself (``since`` after /join).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from broadcast.client.render import presence_line
from broadcast.security import mint_token
from tests.support.cli_process import CLI, cli_env, next_change, next_event, run_cli
from tests.support.fake_gateway import FakeGateway
from tests.support.gateway_process import GatewayProcess
from tests.support.pty_terminal import PtyTerminal

QUIET_SECONDS = 0.5  # how long "nothing arrives" is watched for


@asynccontextmanager
async def member(url: str, name: str, channel: str) -> AsyncIterator[WebSocketConnection]:
    """A client named in the handshake query, once its presence snapshot arrived (joined)."""
    async with open_websocket_url(f"{url}?{urlencode({'name': name, 'channel': channel})}") as ws:
        await next_event(ws, lambda e: e.get("type") == "presence")
        yield ws


async def nothing_but_presence(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """Every event that arrives within QUIET_SECONDS, other than presence answers."""
    events = []
    with trio.move_on_after(QUIET_SECONDS):
        while True:
            event = json.loads(await ws.get_message())
            if event.get("type") != "presence":
                events.append(event)
    return events


# --- broadcast-cli who ------------------------------------------------------------------


async def test_who_lists_the_members_and_not_itself_nor_disturbs_them(
    gateway_process: GatewayProcess,
) -> None:
    channel = "who-lists"
    async with (
        member(gateway_process.url, "bob", channel) as bob,
        member(gateway_process.url, "alice", channel),
    ):
        await next_change(bob, "join", "alice")
        result = await run_cli("who", "--url", gateway_process.url, "--channel", channel)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines() == ["alice", "bob"]
        assert result.stderr == b""
        assert await nothing_but_presence(bob) == []  # no join, no leave: it was invisible


async def test_who_json_prints_the_presence_event(gateway_process: GatewayProcess) -> None:
    channel = "who-json"
    async with member(gateway_process.url, "carol", channel):
        result = await run_cli("who", "--url", gateway_process.url, "--channel", channel, "--json")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().splitlines()
        assert [json.loads(line) for line in lines] == [
            {"type": "presence", "channel": channel, "members": ["carol"], "count": 1}
        ]


async def test_who_in_an_empty_channel_prints_nothing(gateway_process: GatewayProcess) -> None:
    result = await run_cli("who", "--url", gateway_process.url, "--channel", "who-nobody")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


async def test_who_exit_codes_are_those_of_send() -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await run_cli("who", "--url", f"ws://127.0.0.1:{port}/", "--timeout", "5")
    assert result.returncode == 2
    assert b"cannot reach" in result.stderr and b"connection refused" in result.stderr

    async with trio.open_nursery() as nursery:
        fake = FakeGateway()
        await fake.start(nursery)
        fake.refuse_name = "bad_name"
        result = await run_cli("who", "--url", fake.url, "--name", "alice")
        assert result.returncode == 1
        assert b"refused our name or channel: bad_name" in result.stderr
        assert fake.clients[0].query["announce"] == "0"
        nursery.cancel_scope.cancel()


def test_presence_line_escapes_what_the_network_sent() -> None:
    event = {"type": "presence", "channel": "gen\x1b[2J", "members": ["ev\x1b]0;x\x07il", 7]}
    assert presence_line(event) == "* here in #gen\\x1b[2J: ev\\x1b]0;x\\x07il, 7"
    assert presence_line({"channel": "c", "members": []}) == "* here in #c: nobody"
    assert presence_line({"channel": "c", "members": "alice"}) == "* here in #c: nobody"


# --- /who and /join in connect ------------------------------------------------------------


async def test_who_and_join_at_the_prompt(gateway_process: GatewayProcess) -> None:
    home, other = "pty-who-home", "pty-who-other"
    terminal = PtyTerminal(
        [*CLI, "connect", "--url", gateway_process.url, "--name", "alice", "--channel", home],
        env=cli_env(),
        rows=24,
        columns=100,
    )
    try:
        async with (
            member(gateway_process.url, "bob", home) as bob,
            member(gateway_process.url, "dan", other) as dan,
        ):
            await terminal.wait_for_text("* connected to ")
            await next_change(bob, "join", "alice")
            terminal.type("/who\r")
            await terminal.wait_for_text(f"* here in #{home}: alice, bob")
            # The snapshot after the welcome is not shown: one /who, one line.
            assert terminal.text().count("* here in") == 1, terminal.dump()

            terminal.type("/join no/such\r")
            await terminal.wait_for_text("! bad_channel: ")
            terminal.type("/nope\r")
            await terminal.wait_for_text("! unknown command /nope; /who, /join CHANNEL, /name")

            terminal.type(f"/join {other}\r")
            await terminal.wait_for_text(f"* you are now in #{other}")
            await terminal.wait_for(
                lambda: terminal.last_line() == f"#{other}>", "the prompt naming the new channel"
            )
            await next_change(bob, "leave", "alice")

            terminal.type("over here\r")
            said = await next_event(dan, lambda e: e.get("type") == "message")
            assert (said["sender"], said["text"], said["channel"]) == ("alice", "over here", other)
            await terminal.wait_for_text("] alice: over here")
            assert await nothing_but_presence(bob) == []  # #home heard nothing of it

            terminal.type("/who\r")
            await terminal.wait_for_text(f"* here in #{other}: alice, dan")
            assert terminal.text().count("* here in") == 2, terminal.dump()
            terminal.type("\x04")
            assert await terminal.wait_exit() == 0
            assert b"Traceback" not in terminal.output
    finally:
        terminal.close()


async def test_join_from_a_pipe_starts_the_new_channel_afresh() -> None:
    """Lines after /join go to the new channel, and its connection starts there from nothing
    (its history, no ``since``): ids are per channel, so the old one's newest means nothing."""
    async with trio.open_nursery() as nursery:
        fake = FakeGateway()
        await fake.start(nursery)
        await fake.publish("bob", "before", "general")
        script = b"/who\n/join elsewhere\nhello there\n/join elsewhere\n/who\n"
        result = await run_cli("connect", "--url", fake.url, "--history", "5", stdin=script)
        assert result.returncode == 0, result.stderr
        first, second = fake.clients
        assert (first.channel, first.published) == ("general", [])
        assert (second.channel, second.published) == ("elsewhere", ["hello there"])
        assert "since" not in second.query and second.query["history"] == "5"
        out = result.stdout.decode()
        assert "] bob: before" in out and "* you are now in #elsewhere" in out
        assert "* you are already in #elsewhere" in out
        # Each /who is answered before the chat moves on (or leaves): none is lost.
        assert "* here in #general: guest-1\n" in out and "* here in #elsewhere: guest-2\n" in out
        nursery.cancel_scope.cancel()


async def test_a_channel_the_token_forbids_is_refused_and_the_chat_stays_put() -> None:
    secret = "a-who-test-secret-that-is-long-enough-for-hs256"
    token = mint_token(secret, "alice", 300, ["general"])
    gateway = GatewayProcess(node_id="who-auth", extra=("--auth-secret", secret))
    try:
        result = await run_cli(
            "connect",
            "--url",
            gateway.url,
            stdin=b"/join secret\nstill here\n",
            env={"BROADCAST_TOKEN": token},
        )
    finally:
        gateway.terminate()
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "! channel_forbidden: " in out, out
    assert out.count("as alice in #general") == 2, out  # back where it was, at once
    assert "] alice: still here" in out and "now in #secret" not in out
