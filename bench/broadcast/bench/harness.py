"""The one way to start a private Redis, gateways and a cluster, and to read /proc about them.

Used by the benchmark (``broadcast-bench``) and by the tests (``tests/support`` wraps it), so both
start processes the same way: as an operator would (``python -m broadcast.gateway start --port
0``), each owned by a handle that stops exactly it, never anything found by name: other people's
gateways and redis-servers run on the same machine.

The /proc readings (CPU seconds, resident memory) cover processes we did not start (given by pid)
and cost the measured process nothing.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
# A busy 2-core machine can take seconds to import and bind; Redis starts in milliseconds.
GATEWAY_STARTUP_SECONDS = 30.0
REDIS_STARTUP_SECONDS = 10.0
STOP_SECONDS = 10.0
# Log lines kept per gateway, for assertions and a failure report; older ones are dropped.
LOG_LINES_KEPT = 2000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- /proc ---------------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` (all its threads), in seconds; zeros once it has gone.

    The split says where a gateway's time goes without a profiler: user time is Python,
    system time is mostly the ``write``/``recv`` system calls of the fan-out.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, in seconds."""
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes; 0 once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def raise_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit.

    Every client is a file descriptor: thousands of them need more than the usual soft 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def limit_files(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` that runs the child under ``ulimit -n limit`` (soft and hard)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


# -- addresses -------------------------------------------------------------------------------


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


def stop_process(process: subprocess.Popen[bytes], seconds: float = STOP_SECONDS) -> None:
    """SIGTERM, then SIGKILL if it will not go: only this process, by its own handle."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=seconds)


# -- Redis -----------------------------------------------------------------------------------


class RedisServer:
    """One redis-server on a free port, without persistence, in a temporary directory;
    ``stop()``/``start()`` keep the same port.

    ``password`` starts it with ``--requirepass`` (``url`` and ``client()`` then carry it);
    ``extra_args`` are appended to its command line.
    """

    def __init__(self, *, password: str | None = None, extra_args: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/install-system-deps")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="broadcast-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.password = password
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5
        )

    def start(self) -> None:
        argv = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        argv += self.extra_args
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=raise_file_limit,  # a benchmark's gateways hold many connections
        )
        deadline = time.monotonic() + REDIS_STARTUP_SECONDS
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- gateways --------------------------------------------------------------------------------


class GatewayProcess:
    """``broadcast-server start`` on a free port (read from its ``listening on`` line); its log
    is kept for assertions and failure reports."""

    def __init__(
        self,
        *,
        node_id: str,
        redis_url: str | None = None,
        extra: Sequence[str] = (),
        port: int = 0,
        file_limit: int | None = None,
        python: str | None = None,
        module: str = "broadcast.gateway",
    ) -> None:
        """``port`` 0 picks a free one; a fixed port lets a replacement take over from a
        killed gateway at the same address, as clients configured with its URL expect.
        ``file_limit`` runs it under ``ulimit -n`` of that value (soft and hard); without it the
        soft limit is raised to the hard one (as many clients as the machine allows).
        ``python`` runs another installation's gateway (a before/after comparison); ``module``
        another server that takes the same flags and logs the same line (the storm's baseline)."""
        self.node_id = node_id
        argv = [python or sys.executable, "-m", module, "start", "--port", str(port)]
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
            preexec_fn=raise_file_limit if file_limit is None else limit_files(file_limit),
        )
        self.log: deque[str] = deque(maxlen=LOG_LINES_KEPT)
        self.port = self._wait_for_port()
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

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
        self.kill()
        raise RuntimeError(f"gateway {self.node_id} did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        # A full stderr pipe would block the gateway's logging, so it is read to the end.
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.decode(errors="replace"))

    def warnings(self) -> list[str]:
        return [line.rstrip() for line in self.log if " WARNING " in line or " ERROR " in line]

    def finished_log(self, timeout: float = 20) -> str:
        """Everything the gateway logged, once it has exited (stop it first) and the log was
        read to its end: for checks that something never appears in it."""
        self.process.wait(timeout=timeout)
        self._drain.join(timeout)
        return "".join(self.log)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM (a drain) and wait for it to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_SECONDS)

    def stop(self) -> None:
        """SIGTERM, SIGKILL if it will not go."""
        stop_process(self.process)


# -- a cluster -------------------------------------------------------------------------------

# The per-connection publish limit (50/s by default) protects a cluster from one client; in a
# benchmark the senders are the offered load, which it would turn into rate_limited errors.
BENCH_GATEWAY_FLAGS = ("--message-rate", "0")


class Cluster:
    """Either a private cluster we start and stop, or gateways somebody else runs."""

    def __init__(self, targets: list[Target], redis: RedisServer | None = None,
                 gateways: list[GatewayProcess] | None = None) -> None:  # fmt: skip
        self.targets = targets
        self.redis = redis
        self.gateways = gateways or []

    @classmethod
    def start(
        cls,
        gateways: int,
        use_redis: bool,
        extra: Sequence[str] = BENCH_GATEWAY_FLAGS,
        python: str | None = None,
        module: str = "broadcast.gateway",
    ) -> Cluster:
        """``gateways`` processes; with more than one, or when asked, joined by a private Redis."""
        redis: RedisServer | None = None
        started: list[GatewayProcess] = []
        try:
            if use_redis or gateways > 1:
                redis = RedisServer()
                redis.start()
            for index in range(gateways):
                started.append(
                    GatewayProcess(
                        node_id=f"gw{index}",
                        redis_url=redis.url if redis else None,
                        extra=extra,
                        python=python,
                        module=module,
                    )
                )
        except BaseException:
            for gateway in started:
                gateway.stop()
            if redis:
                redis.close()
            raise
        return cls([g.target for g in started], redis, started)

    @property
    def gateway_pids(self) -> list[int]:
        return [t.pid for t in self.targets if t.pid is not None]

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        if self.redis is not None:
            self.redis.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a load balancer -------------------------------------------------------------------------

# As deploy/haproxy/haproxy.cfg (TCP, least connections, /readyz checks, retries and redispatch),
# with the gateways listed instead of found through DNS. maxconn: each connection is two file
# descriptors, and haproxy refuses to start when maxconn needs more than its hard limit.
_HAPROXY_CONFIG = """\
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout check 3s
    retries 3
    option redispatch 1
frontend broadcast
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 2s fastinter 1s downinter 2s fall 2 rise 2
{servers}
"""


class HaproxyProcess:
    """haproxy in front of ``targets`` on a free port; None from ``start`` when not installed."""

    def __init__(self, binary: str, targets: Sequence[Target]) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="broadcast-haproxy-"))
        servers = "\n".join(
            f"    server gw{i} {t.host}:{t.port} check" for i, t in enumerate(targets)
        )
        config = self.dir / "haproxy.cfg"
        config.write_text(_HAPROXY_CONFIG.format(port=self.port, servers=servers))
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=raise_file_limit,
        )
        deadline = time.monotonic() + REDIS_STARTUP_SECONDS
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("haproxy did not start") from None
                time.sleep(0.02)

    @classmethod
    def start(cls, targets: Sequence[Target]) -> HaproxyProcess | None:
        binary = shutil.which("haproxy")
        return cls(binary, targets) if binary else None

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port, self.process.pid, "haproxy")

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)
