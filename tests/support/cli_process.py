"""Running ``broadcast-cli`` as a real subprocess from trio tests, and a raw WebSocket client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

CLI = (sys.executable, "-m", "broadcast.client")


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without BROADCAST_* settings, for a terminal pyte understands;
    ``extra`` (BROADCAST_TOKEN, …) on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env.update(TERM="xterm", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.update(extra or {})
    return env


async def run_cli(
    *args: str, stdin: bytes = b"", seconds: float = 30, env: Mapping[str, str] | None = None
) -> trio.CompletedProcess[bytes]:
    """Run one ``broadcast-cli`` command to completion, capturing stdout and stderr."""
    with trio.fail_after(seconds):
        return await trio.run_process(
            [*CLI, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(env),
        )


class LineReader:
    """Lines from a subprocess pipe, waited for with a deadline; keeps what it read."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.seen: list[str] = []

    async def line(self, seconds: float = 15) -> str:
        with trio.fail_after(seconds):
            while b"\n" not in self._buffer:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"stream ended; lines so far: {self.seen}")
                self._buffer += chunk
        raw, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        self.seen.append(raw.decode())
        return self.seen[-1]

    async def line_containing(self, needle: str, seconds: float = 15) -> str:
        with trio.fail_after(seconds):
            while needle not in (line := await self.line(seconds)):
                pass
            return line


@dataclass
class Running:
    """A ``broadcast-cli`` subprocess with its output read line by line."""

    process: trio.Process
    out: LineReader
    err: LineReader

    async def exit_code(self, seconds: float = 15) -> int:
        with trio.fail_after(seconds):
            return await self.process.wait()


@asynccontextmanager
async def running(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Running]:
    """A ``broadcast-cli`` subprocess whose stdin stays open (``connect`` keeps chatting);
    killed on the way out if it is still running."""
    process = await trio.lowlevel.open_process(
        [*CLI, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(env),
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    try:
        yield Running(process, LineReader(process.stdout), LineReader(process.stderr))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            await stream.aclose()


@asynccontextmanager
async def listening(
    url: str, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[LineReader, LineReader]]:
    """A ``listen`` subprocess, welcomed; stopped with SIGTERM afterwards, which must exit 0."""
    process = await trio.lowlevel.open_process(
        [*CLI, "listen", "--url", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(env),
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


@asynccontextmanager
async def raw_client(url: str, name: str, channel: str) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client written against docs/protocol.md directly, welcomed in ``channel``."""
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "hello", "name": name, "channel": channel}))
        await next_event(ws, lambda e: e.get("type") == "welcome" and e.get("channel") == channel)
        yield ws


async def next_event(ws: WebSocketConnection, match: Any, seconds: float = 15) -> dict[str, Any]:
    """The next event for which ``match(event)`` is true; the others are skipped."""
    with trio.fail_after(seconds):
        while True:
            event = json.loads(await ws.get_message())
            if match(event):
                return event


def presence_changes(event: dict[str, Any]) -> list[tuple[str, str]]:
    """``(join|leave, name)`` told by an event: a ``join``/``leave`` (older gateways) or a
    ``presence_diff``, which gathers several (and none for whoever came and went at once)."""
    kind = event.get("type")
    if kind in ("join", "leave"):
        return [(kind, str(event.get("name")))]
    if kind == "presence_diff":
        joined = [("join", str(name)) for name in event.get("joined", [])]
        return joined + [("leave", str(name)) for name in event.get("left", [])]
    return []


async def next_change(ws: WebSocketConnection, kind: str, name: str) -> None:
    """Until an event tells that ``name`` joined (``kind`` "join") or left ("leave")."""
    await next_event(ws, lambda e: (kind, name) in presence_changes(e))
