"""The shipped HAProxy config in front of three real gateways and one private redis-server.

The real haproxy binary runs deploy/haproxy/haproxy.cfg as shipped, except for what only a
container network has: the ``server-template`` that finds the replicas by DNS becomes three
``server`` lines pointing at local gateway processes, and the ``bind`` lines listen on free ports
on 127.0.0.1. Everything else (mode tcp, leastconn, timeouts, the /readyz health check) is the
shipped text. Servers go UP through HAProxy's own health checks, observed on its stats page.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.cluster

HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
WAIT_SECONDS = 20  # generous for a busy CI machine; health checks run every 2 s, rise 2
_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
_SERVER_TEMPLATE = re.compile(r"^(\s*)server-template\s.*$", re.MULTILINE)
_BIND = re.compile(r"^(\s*)bind\s+:(\d+)\s*$", re.MULTILINE)


def local_config(shipped: str, servers: dict[str, int], binds: dict[int, int]) -> str:
    """The shipped config with local servers and 127.0.0.1 binds; nothing else changes.

    ``servers`` maps a server name to its port on 127.0.0.1; ``binds`` maps each shipped
    ``bind :PORT`` to the local port to use instead.
    """
    templates = _SERVER_TEMPLATE.findall(shipped)
    assert len(templates) == 1, "the shipped config should have exactly one server-template"

    def server_lines(match: re.Match[str]) -> str:
        indent = match.group(1)
        return "\n".join(
            f"{indent}server {name} 127.0.0.1:{port} check" for name, port in servers.items()
        )

    config = _SERVER_TEMPLATE.sub(server_lines, shipped)
    shipped_binds = {int(port) for _, port in _BIND.findall(config)}
    assert shipped_binds == set(binds), f"the shipped config binds {shipped_binds}"
    return _BIND.sub(lambda m: f"{m.group(1)}bind 127.0.0.1:{binds[int(m.group(2))]}", config)


@dataclass
class Process:
    """A subprocess and the lines it has written, kept for failure messages."""

    name: str
    process: trio.Process
    log: list[str] = field(default_factory=list)
    port: int | None = None
    """For a gateway: the port from its ``listening on 127.0.0.1:<port>`` line."""

    def output(self) -> str:
        return f"--- {self.name} (exit {self.process.returncode}) ---\n" + "".join(self.log[-80:])


async def _collect(proc: Process, stream: trio.abc.ReceiveStream, settled: trio.Event) -> None:
    """Read a process's output to its end. ``settled`` is set once the gateway's listening line
    has been seen (``proc.port``), or when the output ends without it."""
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            proc.log.append(line.decode(errors="replace") + "\n")
            if proc.port is None and (match := _LISTENING.search(line)):
                proc.port = int(match.group(1))
                settled.set()
    settled.set()


async def _start(
    nursery: trio.Nursery, name: str, argv: list[str], *, wait_listening: bool
) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    # run_process terminates the process (SIGTERM, then SIGKILL after 5 s) when the nursery is
    # cancelled at the end of the test.
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    )
    proc = Process(name, process)
    settled = trio.Event()
    assert process.stdout is not None
    nursery.start_soon(_collect, proc, process.stdout, settled)
    if wait_listening:
        with trio.move_on_after(WAIT_SECONDS):
            await settled.wait()
        if proc.port is None:
            raise AssertionError(f"{name} did not start:\n{proc.output()}")
    return proc


@dataclass
class Cluster:
    port: int
    stats_port: int
    gateways: dict[str, Process]
    haproxy: Process

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return "\n".join(p.output() for p in [self.haproxy, *self.gateways.values()])


def _blocking_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    """A plain HTTP GET (urllib: HAProxy's stats page answers chunked even to HTTP/1.0)."""
    return await trio.to_thread.run_sync(_blocking_get, port, path)


async def server_states(cluster: Cluster) -> dict[str, tuple[str, str]]:
    """``{server: (status, check_status)}`` of the gateways backend, from HAProxy's stats CSV."""
    status, body = await _http_get(cluster.stats_port, "/stats;csv")
    assert status == 200, body
    rows = list(csv.DictReader(body.decode().removeprefix("# ").splitlines()))
    return {
        row["svname"]: (row["status"], row["check_status"])
        for row in rows
        if row["pxname"] == "gateways" and row["svname"] not in ("FRONTEND", "BACKEND")
    }


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, cluster: Cluster) -> None:
    """Poll ``condition`` until it holds; fail with every process's output after WAIT_SECONDS."""
    try:
        with trio.fail_after(WAIT_SECONDS):
            # HAProxy's state lives in another process: poll it, bounded by fail_after.
            while not await condition():  # noqa: ASYNC110
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}\n{cluster.output()}") from None


@pytest.fixture
async def cluster(redis_server: RedisServer, nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed: run scripts/install-system-deps")
    gateways: dict[str, Process] = {}
    for node in ("gw-a", "gw-b", "gw-c"):
        argv = [sys.executable, "-m", "broadcast.gateway", "start", "--host", "127.0.0.1"]
        argv += ["--port", "0", "--node-id", node, "--redis-url", redis_server.url]
        gateways[node] = await _start(nursery, node, argv, wait_listening=True)
    port, stats_port = free_port(), free_port()
    config = local_config(
        HAPROXY_CFG.read_text(),
        {node: proc.port for node, proc in gateways.items() if proc.port is not None},
        {12345: port, 8404: stats_port},
    )
    path = redis_server.dir / "haproxy.cfg"
    path.write_text(config)
    check = await trio.run_process(
        [haproxy, "-c", "-f", str(path)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    lb = await _start(nursery, "haproxy", [haproxy, "-db", "-f", str(path)], wait_listening=False)
    result = Cluster(port, stats_port, gateways, lb)

    async def all_up() -> bool:
        if lb.process.poll() is not None:
            raise AssertionError(f"haproxy exited\n{result.output()}")
        try:
            states = await server_states(result)
        except (OSError, urllib.error.URLError):
            return False  # not listening yet
        return len(states) == 3 and all(s == ("UP", "L7OK") for s in states.values())

    await wait_for(all_up, "haproxy to see all three gateways UP through /readyz", result)
    yield result


async def _welcomed(stack: AsyncExitStack, url: str) -> tuple[WebSocketConnection, dict]:
    """A WebSocket client through ``url``, kept open by ``stack``, and its welcome event.

    The connection's own nursery lives in ``stack``, so no cancel scope may be opened around this
    call (it would be exited before the connection): connect and close are bounded by
    trio-websocket's timeouts, the welcome by fail_after.
    """
    ws = await stack.enter_async_context(
        open_websocket_url(url, connect_timeout=WAIT_SECONDS, disconnect_timeout=5)
    )
    with trio.fail_after(WAIT_SECONDS):
        welcome = json.loads(await ws.get_message())
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def _next_event(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next event of ``kind``, passing over others (notices, acks); an error fails."""
    with trio.fail_after(WAIT_SECONDS):
        while (event := json.loads(await ws.get_message()))["type"] != kind:
            assert event["type"] != "error", event
    return event


async def test_clients_through_haproxy_spread_over_gateways_and_see_each_other(
    cluster: Cluster,
) -> None:
    async with AsyncExitStack() as stack:
        clients: list[WebSocketConnection] = []
        nodes: list[str] = []
        for _ in range(6):
            ws, welcome = await _welcomed(stack, cluster.url)
            clients.append(ws)
            nodes.append(welcome["node"])
        assert set(nodes) <= set(cluster.gateways)
        # leastconn over long-lived connections: 6 clients on 3 gateways land 2, 2, 2.
        assert len(set(nodes)) >= 2, nodes

        # A client is subscribed before its welcome, so every publish below reaches everyone.
        texts = [f"hello from client {i} on {node}" for i, node in enumerate(nodes)]
        received: dict[int, set[str]] = {i: set() for i in range(len(clients))}

        async def read(i: int) -> None:
            expected = set(texts) - {texts[i]}
            while received[i] != expected:
                event = await _next_event(clients[i], "message")
                assert event["text"] in expected, event
                received[i].add(event["text"])

        async with trio.open_nursery() as nursery:
            for i in range(len(clients)):
                nursery.start_soon(read, i)
            for i, ws in enumerate(clients):
                await ws.send_message(json.dumps({"type": "publish", "text": texts[i]}))
        assert all(received[i] == set(texts) - {texts[i]} for i in received)


class _LineClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def line(self) -> str:
        with trio.fail_after(WAIT_SECONDS):
            while b"\n" not in self._buffer:
                chunk = await self.stream.receive_some(4096)
                assert chunk, "the gateway closed the line connection"
                self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\n")
        return text.decode()


async def test_line_clients_and_http_pass_through_the_tcp_frontend(cluster: Cluster) -> None:
    """mode tcp: a plain TCP (nc) client and an HTTP probe reach a gateway through HAProxy."""
    status, body = await _http_get(cluster.port, "/readyz")
    assert (status, body) == (200, b"ready\n")

    async with AsyncExitStack() as stack:
        with trio.fail_after(WAIT_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
        nc = _LineClient(await stack.enter_async_context(stream))
        greeting = await nc.line()  # a line client that says nothing is greeted after 300 ms
        match = re.match(r"\* welcome to broadcast on (\S+):", greeting)
        assert match and match.group(1) in cluster.gateways, greeting

        ws, _ = await _welcomed(stack, cluster.url)
        await ws.send_message(json.dumps({"type": "publish", "text": "to the nc client"}))
        while (got := await nc.line()).startswith("* "):
            pass  # join notices
        assert got.endswith(": to the nc client"), got

        await stream.send_all(b"hello from nc\n")
        assert (await _next_event(ws, "message"))["text"] == "hello from nc"


async def test_a_draining_gateway_is_taken_out_by_the_readiness_check(cluster: Cluster) -> None:
    """SIGTERM: the gateway stops accepting and reports not-ready; HAProxy marks it DOWN and
    sends new clients to the others."""
    async with AsyncExitStack() as stack:
        for _ in range(3):  # leastconn: three clients land on three gateways
            _, welcome = await _welcomed(stack, cluster.url)
            if welcome["node"] == "gw-b":
                break
        else:
            raise AssertionError("no client landed on gw-b")
        cluster.gateways["gw-b"].process.send_signal(signal.SIGTERM)

        async def gw_b_down() -> bool:
            states = await server_states(cluster)
            others = [state for name, state in states.items() if name != "gw-b"]
            return states["gw-b"][0].startswith("DOWN") and all(
                state == ("UP", "L7OK") for state in others
            )

        await wait_for(gw_b_down, "haproxy to mark the draining gw-b DOWN", cluster)
        for _ in range(4):
            _, welcome = await _welcomed(stack, cluster.url)
            assert welcome["node"] in ("gw-a", "gw-c"), welcome


async def test_drained_clients_come_back_through_the_balancer_and_keep_chatting(
    cluster: Cluster,
) -> None:
    async with AsyncExitStack() as stack:
        for _ in range(3):
            doomed, welcome = await _welcomed(stack, cluster.url)
            if welcome["node"] == "gw-b":
                break
        else:
            raise AssertionError("no client landed on gw-b")
        cluster.gateways["gw-b"].process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
            while True:
                await doomed.get_message()
        assert closed.value.reason.code == 1012  # "service restart": reconnect
        # HAProxy may still route one attempt to gw-b while it is draining (it refuses then).
        # (No cancel scope around _welcomed: see its docstring. Attempts are bounded instead.)
        for _ in range(100):
            try:
                back, welcome = await _welcomed(stack, cluster.url)
                break
            except (HandshakeError, ConnectionClosed):
                await trio.sleep(0.1)  # a retry delay, like the CLI's backoff
        else:
            raise AssertionError("could not reconnect through haproxy")
        assert welcome["node"] != "gw-b"
        other, _ = await _welcomed(stack, cluster.url)
        await back.send_message(json.dumps({"type": "publish", "text": "I am back"}))
        assert (await _next_event(other, "message"))["text"] == "I am back"


async def test_readiness_follows_redis_and_metrics_parse(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    ports = [proc.port for proc in cluster.gateways.values() if proc.port is not None]

    async def all_ready(ready: bool) -> bool:
        statuses = [(await _http_get(port, "/readyz"))[0] for port in ports]
        return all((status == 200) == ready for status in statuses)

    redis_server.stop()
    await wait_for(lambda: all_ready(False), "every /readyz to say 503 without Redis", cluster)
    redis_server.start()
    await wait_for(lambda: all_ready(True), "every /readyz to say 200 again", cluster)

    status, body = await _http_get(ports[0], "/metrics")
    assert status == 200
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"broadcast_connections", "broadcast_deliveries", "broadcast_ready"} <= names
    assert "broadcast_bus_reconnects" in names
