"""``broadcast-cli send`` and ``listen`` as real subprocesses against a real gateway subprocess.

Each test uses its own channel on one gateway for the module. Waits are on output (a listener
says ``connected`` on stderr once welcomed) under deadlines, never on sleeps.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from broadcast.protocol.envelope import parse_id
from tests.support.cli_process import CLI, LineReader, cli_env, next_event, raw_client, run_cli
from tests.support.fake_gateway import FakeGateway
from tests.support.gateway_process import GatewayProcess


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    process = GatewayProcess(node_id="t1")
    try:
        yield process
    finally:
        process.terminate()


@asynccontextmanager
async def listening(url: str, *args: str) -> AsyncIterator[tuple[LineReader, LineReader]]:
    """A ``listen`` subprocess, welcomed; stopped with SIGTERM afterwards, which must exit 0."""
    process = await trio.lowlevel.open_process(
        [*CLI, "listen", "--url", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    try:
        await err.line_containing("connected to")
        yield out, err
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0, err.seen
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()


async def test_listen_json_prints_what_send_sent_exactly_as_received(
    gateway: GatewayProcess,
) -> None:
    channel = "cli-json"
    async with (
        listening(gateway.url, "--json", "--channel", channel) as (out, _),
        raw_client(gateway.url, "watcher", channel) as watcher,
    ):
        sent = await run_cli(
            "send", "--url", gateway.url, "--channel", channel, "--name", "bob", "hi"
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
        assert all(json.loads(seen)["type"] in ("message", "join", "leave") for seen in out.seen)


async def test_listen_prints_people_readable_lines(gateway: GatewayProcess) -> None:
    channel = "cli-human"
    async with listening(gateway.url, "--channel", channel) as (out, err):
        assert (
            err.seen[-1]
            == f"* connected to {gateway.url} as {err.seen[-1].split()[-3]} in #{channel}"
        )
        async with raw_client(gateway.url, "carol", channel) as carol:
            await carol.send_message(json.dumps({"type": "publish", "text": "hello humans"}))
            await next_event(carol, lambda e: e.get("type") == "ack")
        line = await out.line_containing("hello humans")
        assert line.endswith("] carol: hello humans") and line.startswith("[")
        assert any(seen.endswith(f"* carol joined #{channel}") for seen in out.seen)


async def test_send_over_the_limit_exits_1_with_the_error_code(gateway: GatewayProcess) -> None:
    result = await run_cli("send", "--url", gateway.url, "x" * 5000)
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
async def test_a_refused_hello_exits_1_with_the_error_code(command: list[str]) -> None:
    fake = FakeGateway()
    fake.refuse_hello = "bad_name"
    async with trio.open_nursery() as nursery:
        await fake.start(nursery)
        result = await run_cli(*command, "--url", fake.url, "--name", "alice")
        nursery.cancel_scope.cancel()
    assert result.returncode == 1
    output = (result.stdout + result.stderr).decode()
    assert "bad_name: refused, as asked" in output
    assert "Traceback" not in output
