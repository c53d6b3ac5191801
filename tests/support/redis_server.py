"""A private redis-server per test, on a free port, that tests may stop and start again; and a
Sentinel set (primary, replica, three sentinels) for failover tests, and a Redis Cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import quote

import redis

from broadcast.bench.harness import RedisServer, free_port

# One way to start a redis-server, shared with the benchmark (broadcast.bench.harness).
__all__ = ["ClusterSet", "RedisServer", "SentinelSet", "free_port"]


class SentinelSet:
    """One primary, one replica and three sentinels (quorum 2) on free loopback ports, watching
    the primary as ``mymaster``; quick to fail over (down after 1 s).

    ``password`` is given to the primary and the replica (``requirepass``, ``masterauth``, and
    ``sentinel auth-pass``); ``sentinel_password`` to the sentinels (``requirepass``)."""

    MASTER = "mymaster"
    DOWN_AFTER_MS = 1000

    def __init__(self, *, password: str | None = None, sentinel_password: str | None = None):
        auth = ["--masterauth", password] if password is not None else []
        fast_sync = ["--repl-diskless-sync-delay", "0", *auth]
        self.primary = RedisServer(password=password, extra_args=fast_sync)
        self.replica = RedisServer(password=password, extra_args=fast_sync)
        self.password = password
        self.sentinel_password = sentinel_password
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dir = Path(tempfile.mkdtemp(prefix="broadcast-sentinel-"))
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        query = ""
        if self.sentinel_password is not None:
            query = f"?sentinel_password={quote(self.sentinel_password, safe='')}"
        return f"redis+sentinel://{auth}{hosts}/{self.MASTER}{query}"

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.sentinel_ports[index],
            password=self.sentinel_password,
            socket_timeout=5,
        )

    def start(self) -> None:
        self.primary.start()
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        self.wait(lambda: self._link_up(self.replica), "the replica did not sync")
        for index, port in enumerate(self.sentinel_ports):
            config = self.dir / f"sentinel-{index}.conf"
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {self.dir}",
                f"logfile {self.dir / f'sentinel-{index}.log'}",
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2",
                f"sentinel down-after-milliseconds {self.MASTER} {self.DOWN_AFTER_MS}",
                f"sentinel failover-timeout {self.MASTER} 10000",
            ]
            if self.password is not None:
                lines.append(f"sentinel auth-pass {self.MASTER} {json.dumps(self.password)}")
            if self.sentinel_password is not None:
                lines.append(f"requirepass {json.dumps(self.sentinel_password)}")
            config.write_text("\n".join(lines) + "\n")
            argv = [self.primary.binary, str(config), "--sentinel"]
            self.sentinels.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for index in range(3):
            self.wait(partial(self._knows_both, index), f"sentinel {index} did not start")

    def master_port(self, index: int = 0) -> int | None:
        """The primary's port as sentinel ``index`` names it now; None if unreachable."""
        try:
            answer = self.sentinel_client(index).execute_command(
                "SENTINEL", "get-master-addr-by-name", self.MASTER
            )
        except redis.RedisError:
            return None
        return int(answer[1]) if answer else None

    @staticmethod
    def _link_up(server: RedisServer) -> bool:
        return server.client().info("replication").get("master_link_status") == "up"

    def _knows_both(self, index: int) -> bool:
        try:
            info = self.sentinel_client(index).info("sentinel")
        except redis.RedisError:
            return False
        master = info.get("master0", {})
        return (
            isinstance(master, dict) and master.get("slaves") == 1 and master.get("sentinels") == 3
        )

    @staticmethod
    def wait(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(what)
            time.sleep(0.05)

    def close(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        self.primary.close()
        self.replica.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ClusterSet:
    """A Redis Cluster of ``primaries`` primaries, each with ``replicas`` replicas, on free
    loopback ports; a primary found dead for 1 s is replaced by its replica."""

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"]
        # The cluster bus port defaults to port + 10000, which a high free port would overflow.
        self.servers = [
            RedisServer(extra_args=[*args, "--cluster-port", str(free_port())])
            for _ in range(primaries * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:2])

    def start(self) -> None:
        for server in self.servers:
            server.start()
        argv = ["redis-cli", "--cluster", "create"]
        argv += [f"127.0.0.1:{server.port}" for server in self.servers]
        argv += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for server in self.servers:
            SentinelSet.wait(partial(self._cluster_ok, server), "the cluster did not come up")

    @staticmethod
    def _cluster_ok(server: RedisServer) -> bool:
        client = server.client()
        return bool(
            client.info("cluster").get("cluster_enabled") == 1
            and client.execute_command("CLUSTER", "INFO").startswith(b"cluster_state:ok")
        )

    def owner(self, slot: int, ask: RedisServer | None = None) -> RedisServer:
        """The server that owns ``slot`` now, as ``ask`` (by default the first server) says."""
        ask = ask or self.servers[0]
        for start, end, primary, *_ in ask.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(s for s in self.servers if s.port == int(primary[1]))
        raise LookupError(slot)

    def close(self) -> None:
        for server in self.servers:
            server.close()
