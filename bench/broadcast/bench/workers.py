"""The parent's side of the receiver workers: spawn them, send commands, gather replies.

Spawned (not forked) so each worker starts a clean interpreter with its own trio loop and no
copy of the parent's sockets or threads. Commands go to every worker at once and the replies are
gathered afterwards, so the workers do their part in parallel.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import trio

from broadcast.bench.receivers import WorkerSpec, worker_main

STOP_SECONDS = 10.0


class WorkerPool:
    """Worker processes, one per spec, each running ``target(spec, pipe)``."""

    def __init__(self, specs: Sequence[Any], target: Callable[[Any, Connection], None]) -> None:
        context = multiprocessing.get_context("spawn")
        self._lock = trio.Lock()  # one request/reply exchange on the pipes at a time
        self._connections: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for index, spec in enumerate(specs):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=target, args=(spec, child_end), name=f"bench-worker-{index}"
            )
            process.daemon = True  # never outlives the benchmark, even when it crashes
            process.start()
            child_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)

    @classmethod
    def receivers(
        cls, count: int, kind: str, channel: str, sender_prefix: bytes, announce: bool = True
    ) -> WorkerPool:
        """``count`` receiver workers (receivers.py) for one benchmark session."""
        specs = [
            WorkerSpec(index, kind, channel, sender_prefix, announce) for index in range(count)
        ]
        return cls(specs, worker_main)

    @property
    def size(self) -> int:
        return len(self._processes)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    async def call_each(self, commands: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Send ``commands[i]`` to worker i, then collect every reply.

        Shielded: a reply left unread by a cancelled caller would answer the next command.
        """
        async with self._lock:
            with trio.CancelScope(shield=True):
                for connection, command in zip(self._connections, commands, strict=True):
                    connection.send(command)
                replies = []
                for connection, process in zip(self._connections, self._processes, strict=True):
                    await trio.lowlevel.wait_readable(connection.fileno())
                    try:
                        replies.append(connection.recv())
                    except EOFError:
                        message = f"{process.name} died (exit code {process.exitcode})"
                        raise RuntimeError(message) from None
        return replies

    async def call_all(self, *command: Any) -> list[dict[str, Any]]:
        return await self.call_each([command] * self.size)

    def stop(self) -> None:
        """Ask every worker to close its clients and exit; then join them (see ``close``)."""
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(("stop",))
        for connection in self._connections:
            try:
                if connection.poll(STOP_SECONDS):
                    connection.recv()
            except (EOFError, OSError):
                pass
        self.close()

    def close(self) -> None:
        """Join each worker; terminate (by its own handle) one that will not go."""
        for process in self._processes:
            process.join(timeout=STOP_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join(timeout=STOP_SECONDS)
        for connection in self._connections:
            connection.close()
