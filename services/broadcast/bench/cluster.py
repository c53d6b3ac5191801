"""A private cluster for one benchmark: a redis-server on a free port and N gateway processes.

Started as an operator would start them (``python -m broadcast.gateway start --port 0``), each
process owned by a handle that stops exactly it, never anything found by name: other people's
gateways and redis-servers run on the same machine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from broadcast.bench.procfs import raise_file_limit

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
# A busy 2-core machine can take seconds to import and bind; Redis starts in milliseconds.
GATEWAY_STARTUP_SECONDS = 30.0
REDIS_STARTUP_SECONDS = 10.0
STOP_SECONDS = 10.0
# Log lines kept per gateway, for a failure report; older ones are dropped (bounded memory).
LOG_LINES_KEPT = 500


@dataclass(frozen=True)
class Target:
    """One gateway the clients connect to; ``pid`` is known only when we can measure it."""

    host: str
    port: int
    pid: int | None = None
    node: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_url(url: str) -> Target:
    """``ws://host:port/`` (or ``host:port``) as a target; the path is ignored."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a ws://host:port/ URL: {url!r}")
    return Target(host.strip("[]"), int(port))


class RedisProcess:
    """redis-server on a free port, without persistence, in a temporary directory."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="broadcast-bench-redis-"))
        argv = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_file_limit
        )
        self._wait_until_ready()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + REDIS_STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class GatewayProcess:
    """``broadcast-server start --port 0``; the port is read from its ``listening on`` line."""

    def __init__(self, node_id: str, redis_url: str | None) -> None:
        self.node_id = node_id
        argv = [sys.executable, "-m", "broadcast.gateway", "start", "--port", "0"]
        argv += ["--node-id", node_id, "--log-level", "info"]
        # The per-connection publish limit (50/s by default) protects a cluster from one client;
        # here the senders are the offered load, which it would turn into rate_limited errors.
        argv += ["--message-rate", "0"]
        if redis_url:
            argv += ["--redis-url", redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=raise_file_limit,  # as many clients as the hard limit allows
        )
        self.log: deque[str] = deque(maxlen=LOG_LINES_KEPT)
        self.port = self._wait_for_port()
        threading.Thread(target=self._drain_log, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port, self.pid, self.node_id)

    def _wait_for_port(self) -> int:
        assert self.process.stderr is not None
        deadline = time.monotonic() + GATEWAY_STARTUP_SECONDS
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line.decode(errors="replace"))
            if match := _LISTENING.search(line):
                return int(match.group(1))
        _stop(self.process)
        raise RuntimeError(f"gateway {self.node_id} did not start:\n" + "".join(self.log))

    def _drain_log(self) -> None:
        # A full stderr pipe would block the gateway's logging, so it is read to the end.
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.decode(errors="replace"))

    def warnings(self) -> list[str]:
        return [line.rstrip() for line in self.log if " WARNING " in line or " ERROR " in line]

    def stop(self) -> None:
        _stop(self.process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it will not go: only this process, by its own handle."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)


class Cluster:
    """Either a private cluster we start and stop, or gateways somebody else runs."""

    def __init__(self, targets: list[Target], redis: RedisProcess | None = None,
                 gateways: list[GatewayProcess] | None = None) -> None:  # fmt: skip
        self.targets = targets
        self.redis = redis
        self.gateways = gateways or []

    @classmethod
    def start(cls, gateways: int, use_redis: bool) -> Cluster:
        """``gateways`` processes; with more than one, or when asked, joined by a private Redis."""
        redis = RedisProcess() if use_redis or gateways > 1 else None
        started: list[GatewayProcess] = []
        try:
            for index in range(gateways):
                started.append(GatewayProcess(f"gw{index}", redis.url if redis else None))
        except BaseException:
            for gateway in started:
                gateway.stop()
            if redis:
                redis.stop()
            raise
        return cls([g.target for g in started], redis, started)

    @property
    def gateway_pids(self) -> list[int]:
        return [t.pid for t in self.targets if t.pid is not None]

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
