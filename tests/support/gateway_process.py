"""Real gateway subprocesses, as an operator would run them, for cluster and CLI tests."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
_STARTUP_TIMEOUT = 30  # a busy 2-core CI machine can take seconds to import and bind


class GatewayProcess:
    """``broadcast-server start`` on a free port; its log is kept for assertions and failures."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        node_id: str,
        extra: tuple[str, ...] = (),
        port: int = 0,
        file_limit: int | None = None,
    ):
        """``port`` 0 picks a free one; a fixed port lets a replacement take over from a
        killed gateway at the same address, as clients configured with its URL expect.
        ``file_limit`` runs it under ``ulimit -n`` of that value (soft and hard)."""
        self.node_id = node_id
        argv = [sys.executable, "-m", "broadcast.gateway", "start", "--port", str(port)]
        argv += ["--node-id", node_id, "--log-level", "info", *extra]
        if redis_url:
            argv += ["--redis-url", redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            argv,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            preexec_fn=None if file_limit is None else _limit_files(file_limit),
        )
        self.log: deque[str] = deque(maxlen=2000)
        self.port = self._wait_for_port()
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def _wait_for_port(self) -> int:
        assert self.process.stderr is not None
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line.decode(errors="replace"))
            if match := _LISTENING.search(line):
                return int(match.group(1))
        self.kill()
        raise RuntimeError("gateway did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.decode(errors="replace"))

    def finished_log(self, timeout: float = 20) -> str:
        """Everything the gateway logged, once it has exited (stop it first) and the log was
        read to its end: for checks that something never appears in it."""
        self.process.wait(timeout=timeout)
        self._drain.join(timeout)
        return "".join(self.log)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def terminate(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def _limit_files(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply
