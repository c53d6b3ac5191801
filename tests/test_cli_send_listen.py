"""``broadcast-cli send`` and ``listen`` as real subprocesses against a real gateway subprocess.

Each test uses its own channel on one gateway for the module. Where a test needs what a gateway
does not do on demand (die and come back with its history, replay sloppily, report a loss, close
with 1012, 4008 or 4010), the other side is the fake gateway of tests/support instead. Waits are
on output (a listener says ``connected`` on stderr once welcomed) or on the server's state, under
deadlines, never on sleeps.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from trio_websocket import WebSocketConnection

from broadcast.client.render import HISTORY_RESTARTED_LINE
from broadcast.protocol.envelope import parse_id
from tests.support.cli_process import (
    CLI,
    LineReader,
    cli_env,
    listening,
    next_event,
    presence_changes,
    raw_client,
    run_cli,
)
from tests.support.fake_gateway import FakeGateway
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import free_port


async def test_listen_json_prints_what_send_sent_exactly_as_received(
    gateway_process: GatewayProcess,
) -> None:
    channel = "cli-json"
    async with (
        listening(gateway_process.url, "--json", "--channel", channel) as (out, _),
        raw_client(gateway_process.url, "watcher", channel) as watcher,
    ):
        sent = await run_cli(
            "send", "--url", gateway_process.url, "--channel", channel, "--name", "bob", "hi"
        )
        assert sent.returncode == 0, sent.stderr
        message_id = sent.stdout.decode().strip()
        parse_id(message_id)  # ``<ms>-<seq>``: what the ack carried

        line = await out.line_containing('"type":"message"')
        event = json.loads(line)
        assert event["id"] == message_id
        assert (event["channel"], event["sender"], event["text"]) == (channel, "bob", "hi")
        # Byte for byte the frame every client gets.
        raw = await watcher.get_message()
        while '"type":"message"' not in raw:
            raw = await watcher.get_message()
        assert line == raw
        shown = ("message", "join", "leave", "presence_diff")
        assert all(json.loads(seen)["type"] in shown for seen in out.seen)


async def test_listen_prints_people_readable_lines(gateway_process: GatewayProcess) -> None:
    channel = "cli-human"
    async with listening(gateway_process.url, "--channel", channel) as (out, err):
        assert (
            err.seen[-1]
            == f"* connected to {gateway_process.url} as {err.seen[-1].split()[-3]} in #{channel}"
        )
        async with raw_client(gateway_process.url, "carol", channel) as carol:
            await carol.send_message(json.dumps({"type": "publish", "text": "hello humans"}))
            await next_event(carol, lambda e: e.get("type") == "ack")
            line = await out.line_containing("hello humans")
            assert line.endswith("] carol: hello humans") and line.startswith("[")
            # Told when it happened (older gateways), or gathered with others a moment later.
            if not any(seen.endswith(f"* carol joined #{channel}") for seen in out.seen):
                await out.line_containing(f"* carol joined #{channel}")


async def test_send_over_the_limit_exits_1_with_the_error_code(
    gateway_process: GatewayProcess,
) -> None:
    result = await run_cli("send", "--url", gateway_process.url, "x" * 5000)
    assert result.returncode == 1
    assert b"text_too_long" in result.stderr
    assert b"Traceback" not in result.stderr
    assert result.stdout == b""


async def test_send_to_a_port_where_nothing_listens_exits_2_with_a_clear_message() -> None:
    with socket.socket() as holder:  # bound, not listening: connecting is refused
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = await run_cli("send", "--port", str(port), "hello?")
    assert result.returncode == 2
    assert result.stderr.decode() == (
        f"broadcast-cli: cannot reach ws://127.0.0.1:{port}/: connection refused\n"
    )


async def test_send_gives_up_after_its_timeout_when_the_server_stays_silent() -> None:
    async def say_nothing(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, say_nothing, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        result = await run_cli("send", "--port", str(port), "--timeout", "1", "anyone?")
        nursery.cancel_scope.cancel()
    assert result.returncode == 2
    assert result.stderr.decode().startswith("broadcast-cli: ")
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_listen_leaves_on_a_signal_with_a_normal_close(signum: int) -> None:
    fake = FakeGateway()
    async with trio.open_nursery() as nursery:
        await fake.start(nursery)
        process = await trio.lowlevel.open_process(
            [*CLI, "listen", "--url", fake.url], stderr=subprocess.PIPE, env=cli_env()
        )
        assert process.stderr is not None
        err = LineReader(process.stderr)
        try:
            await err.line_containing("connected to")
            process.send_signal(signum)
            with trio.fail_after(15):
                assert await process.wait() == 0
            await fake.wait_until(lambda: fake.clients[0].close_code is not None)
            assert fake.clients[0].close_code == 1000
        finally:
            if process.returncode is None:
                process.kill()
            await process.stderr.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("command", [["send", "hi"], ["listen"], ["connect"]])
async def test_a_refused_name_exits_1_with_the_error_code(command: list[str]) -> None:
    fake = FakeGateway()
    fake.refuse_name = "bad_name"
    async with trio.open_nursery() as nursery:
        await fake.start(nursery)
        result = await run_cli(*command, "--url", fake.url, "--name", "alice")
        nursery.cancel_scope.cancel()
    assert result.returncode == 1
    output = (result.stdout + result.stderr).decode()
    assert "bad_name: refused, as asked" in output
    assert "Traceback" not in output


# --- naming in the handshake; scripts come and go without notices ---------------------------


@asynccontextmanager
async def serving_fake() -> AsyncIterator[tuple[FakeGateway, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        fake = FakeGateway()
        await fake.start(nursery)
        yield fake, nursery
        nursery.cancel_scope.cancel()


async def test_the_handshake_query_names_the_client_and_scripts_ask_for_no_notices() -> None:
    async with serving_fake() as (fake, _):
        sent = await run_cli("send", "--url", fake.url, "--name", "bob", "--channel", "c", "hi")
        assert sent.returncode == 0, sent.stderr
        async with listening(fake.url, "--channel", "c"):
            pass
        chatted = await run_cli("connect", "--url", fake.url, "--name", "carol", stdin=b"")
        assert chatted.returncode == 0, chatted.stderr
    assert [c.query for c in fake.clients] == [
        {"name": "bob", "channel": "c", "announce": "0"},
        {"channel": "c", "announce": "0"},
        {"name": "carol", "channel": "general"},
    ]
    assert not any(command["type"] == "hello" for c in fake.clients for command in c.received)


async def _notices_and_messages(ws: WebSocketConnection, until: str) -> list[tuple[str, str]]:
    """(type, who) of each join, leave and message, until a message from ``until``. Newer
    gateways gather joins and leaves (``presence_diff``): one who came and went within the
    interval is not told at all, so leaves are not waited for."""
    seen: list[tuple[str, str]] = []
    while ("message", until) not in seen:
        event = await next_event(
            ws, lambda e: e.get("type") == "message" or bool(presence_changes(e))
        )
        if event["type"] == "message":
            seen.append(("message", event["sender"]))
        else:  # the watcher's own arrival is not of interest
            seen.extend(c for c in presence_changes(event) if c[1] != "watcher")
    return seen


async def test_connect_joins_once_under_its_own_name(gateway_process: GatewayProcess) -> None:
    channel = "cli-named"
    async with raw_client(gateway_process.url, "watcher", channel) as watcher:
        result = await run_cli(
            "connect",
            "--url",
            gateway_process.url,
            "--name",
            "alice",
            "--channel",
            channel,
            stdin=b"hi\n",
        )
        assert result.returncode == 0, result.stderr
        # Not "guest-N joined, guest-N left, alice joined": the query named us from the start.
        seen = await _notices_and_messages(watcher, "alice")
        assert seen[-1] == ("message", "alice")
        assert {who for _, who in seen} == {"alice"}, seen


async def test_send_and_listen_come_and_go_without_notices(gateway_process: GatewayProcess) -> None:
    channel = "cli-quiet"
    async with raw_client(gateway_process.url, "watcher", channel) as watcher:
        async with listening(gateway_process.url, "--channel", channel, "--name", "ears") as (
            out,
            _,
        ):
            sent = await run_cli(
                "send", "--url", gateway_process.url, "--channel", channel, "--name", "bob", "x"
            )
            assert sent.returncode == 0, sent.stderr
            await out.line_containing("bob: x")
        # A chat after them, as a marker: everything the watcher got before it is theirs.
        marker = await run_cli(
            "connect",
            "--url",
            gateway_process.url,
            "--name",
            "carol",
            "--channel",
            channel,
            stdin=b"m\n",
        )
        assert marker.returncode == 0, marker.stderr
        seen = await _notices_and_messages(watcher, "carol")
        assert seen[0] == ("message", "bob") and seen[-1] == ("message", "carol"), seen
        assert {who for _, who in seen} == {"bob", "carol"}, seen  # nothing of ears


# --- recovery after a reconnect, deduplicated; replays, gaps and close codes ----------------


async def test_listen_json_recovers_what_it_missed_each_message_once() -> None:
    async with serving_fake() as (fake, nursery):
        async with listening(fake.url, "--json") as (out, err):
            await fake.wait_joined()
            before = [await fake.publish("bob", f"before {n}") for n in range(2)]
            assert [json.loads(await out.line())["id"] for _ in before] == [m["id"] for m in before]
            fake.stop()
            await err.line_containing("connection lost")
            missed = [await fake.publish("bob", f"missed {n}") for n in range(3)]
            fake.replay_overlap = 2  # a sloppy server: the two it already has come again
            await fake.start(nursery)
            lines = [json.loads(await out.line()) for _ in range(4)]
            await fake.wait_joined()
            after = await fake.publish("bob", "after")
            lines.append(json.loads(await out.line()))
        assert fake.clients[-1].query["since"] == before[-1]["id"]
        assert lines == [
            *missed,
            {"type": "recovered", "channel": "general", "count": 5, "complete": True},
            after,
        ]


async def test_listen_tells_people_what_was_recovered_or_lost() -> None:
    async with serving_fake() as (fake, nursery):
        async with listening(fake.url) as (out, err):
            await fake.wait_joined()
            await fake.publish("bob", "one")
            await out.line_containing("bob: one")
            fake.stop()
            await err.line_containing("connection lost")
            await fake.publish("bob", "two")
            await fake.start(nursery)
            await out.line_containing("bob: two")
            assert await out.line() == "* recovered 1 missed message"

            fake.stop()
            await err.line_containing("connection lost")
            fake.history_lost = True
            await fake.start(nursery)
            assert await out.line() == "! some messages were lost while disconnected"
            await fake.wait_joined()

            await fake.broadcast({"type": "gap", "channel": "general"})
            assert (
                await out.line() == "! some messages may have been lost (server link interrupted)"
            )
        assert sum("bob: one" in line for line in out.seen) == 1


async def test_listen_json_passes_a_gap_through() -> None:
    async with serving_fake() as (fake, _), listening(fake.url, "--json") as (out, _):
        await fake.wait_joined()
        await fake.broadcast({"type": "gap", "channel": "general"})
        assert json.loads(await out.line()) == {"type": "gap", "channel": "general"}


async def test_listen_history_shows_the_last_messages_first() -> None:
    async with serving_fake() as (fake, _):
        for n in range(3):
            await fake.publish("bob", f"old {n}")
        async with listening(fake.url, "--history", "2") as (out, _):
            assert [(await out.line()).split("] ", 1)[1] for _ in range(2)] == [
                "bob: old 1",
                "bob: old 2",
            ]
            assert await out.line() == "* 2 earlier messages from the history above"
        assert fake.clients[0].query["history"] == "2"


async def test_a_draining_server_is_left_for_another_at_once() -> None:
    async with serving_fake() as (fake, _), listening(fake.url) as (out, err):
        await fake.wait_joined()
        seen = await fake.publish("bob", "before the restart")
        await out.line_containing("before the restart")
        await fake.close_all(1012, "draining")
        assert await err.line() == "* the server shut down; reconnecting"
        await err.line_containing("* connected to ")
        assert fake.clients[-1].query["since"] == seen["id"]
        await fake.wait_joined()
        await fake.publish("bob", "after the restart")
        # Nothing missed: no "recovered 0" line, the next line is the next message.
        assert (await out.line()).endswith("bob: after the restart")


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (4008, "this client read too slowly (4008: slow)"),
        (4010, "the server heard nothing from this client for too long (4010: idle)"),
    ],
)
async def test_slow_and_idle_closes_are_reported_plainly(code: int, reason: str) -> None:
    async with serving_fake() as (fake, _), listening(fake.url) as (_, err):
        await fake.wait_joined()
        await fake.close_all(code, reason.rsplit(": ", 1)[1].rstrip(")"))
        line = await err.line()
        assert line.startswith(f"* connection lost: {reason}; reconnecting in "), line
        await err.line_containing("* connected to ")


async def test_listen_reports_an_error_from_the_server_on_stderr() -> None:
    async with serving_fake() as (fake, _), listening(fake.url, "--json") as (out, err):
        await fake.wait_joined()
        refusal = {"type": "error", "code": "bad_command", "message": "not a message id"}
        await fake.broadcast(refusal)
        assert await err.line() == "! bad_command: not a message id"
        assert out.seen == []


# --- piping many lines: every one delivered, in order (issue 12) ---------------------------

FLOOD = 300  # past the gateway's burst of 100: only pacing to 50/s gets them all through


async def _texts(ws: WebSocketConnection, count: int, seconds: float) -> list[str]:
    """The texts of the next ``count`` chat messages a raw client receives, in order."""
    texts: list[str] = []
    with trio.fail_after(seconds):
        while len(texts) < count:
            event = await next_event(ws, lambda e: e.get("type") == "message", seconds)
            texts.append(event["text"])
    return texts


@pytest.mark.parametrize("command", ["connect", "send"])
async def test_piped_lines_all_arrive_in_order_at_the_servers_rate(
    gateway_process: GatewayProcess, command: str
) -> None:
    channel = f"cli-flood-{command}"
    lines = [f"flood {n}" for n in range(1, FLOOD + 1)]
    stdin = "".join(f"{line}\n" for line in lines).encode()
    got: list[str] = []

    async def count(counter: WebSocketConnection) -> None:
        got.extend(await _texts(counter, FLOOD, 30))

    async with (
        raw_client(gateway_process.url, "counter", channel) as counter,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(count, counter)
        start = trio.current_time()
        result = await run_cli(
            command, "--url", gateway_process.url, "--channel", channel, stdin=stdin
        )
        elapsed = trio.current_time() - start
    assert result.returncode == 0, result.stderr.decode()
    assert got == lines
    assert b"rate_limited" not in result.stdout + result.stderr
    # 50/s after a burst of 100 makes 4 s at the least; pacing must not make it much slower.
    assert elapsed < 12, elapsed
    out = result.stdout.decode().splitlines()
    if command == "send":
        assert len(out) == FLOOD and all(parse_id(line) for line in out)  # one id per ack
    else:
        assert sum(line.endswith("] guest-1: flood 1") or ": flood " in line for line in out) == (
            FLOOD
        )


async def test_piped_lines_the_server_refuses_are_named_and_the_exit_status_says_so(
    gateway_process: GatewayProcess,
) -> None:
    channel = "cli-refused-lines"
    stdin = b"first\nbad \x01 text\nlast\n"
    for command in ("send", "connect"):
        result = await run_cli(
            command, "--url", gateway_process.url, "--channel", channel, stdin=stdin
        )
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert "1 of 3 messages not delivered: line 2 (bad_text: " in err, err
        assert err.rstrip().endswith("): bad \\x01 text"), err
        assert "Traceback" not in err


async def test_a_rate_limited_message_is_sent_again_after_the_hint() -> None:
    """A server that refuses every other message (``rate_limited``, with only words for a
    hint, as older gateways say it): each is sent again, in order, and all are delivered."""
    async with trio.open_nursery() as nursery:
        fake = FakeGateway()
        fake.refuse_every = 2
        await fake.start(nursery)
        result = await run_cli("send", "--url", fake.url, stdin=b"a\nb\nc\nd\n")
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.decode().splitlines()) == 4
    published = fake.clients[0].published
    assert published == ["a", "b", "b", "c", "c", "d", "d"]  # every 2nd publish: refused
    assert [m["text"] for m in fake.history["general"]] == ["a", "b", "c", "d"]


async def test_a_restarted_gateway_is_a_calm_notice_not_a_false_alarm() -> None:
    """A single gateway (its history in memory) dies and comes back empty on the same port:
    nobody spoke meanwhile, so the listener says the history restarted, not that messages
    were lost (issue 12, item 6)."""
    port = free_port()
    first = await trio.to_thread.run_sync(partial(GatewayProcess, node_id="once", port=port))
    try:
        async with listening(first.url, "--channel", "cli-restart") as (out, err):
            sent = await run_cli("send", "--url", first.url, "--channel", "cli-restart", "before")
            assert sent.returncode == 0, sent.stderr
            await out.line_containing("before")
            first.kill()
            await err.line_containing("* connection lost: ")
            again = await trio.to_thread.run_sync(
                partial(GatewayProcess, node_id="again", port=port)
            )
            try:
                line = await out.line_containing("history", seconds=20)
                assert line == HISTORY_RESTARTED_LINE
                await err.line_containing("* connected to ")
                assert not any("lost" in seen for seen in out.seen)
            finally:
                again.terminate()
    finally:
        first.kill()
