"""One benchmark session: open the clients, connect the senders, run measured steps.

The cluster and the worker pool are made by the caller (``command``) and outlive a session's
steps, so a rate search reuses the same connections from one step to the next.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

from broadcast.bench.harness import Cluster, cpu_seconds, cpu_times, rss_bytes
from broadcast.bench.senders import Sender, SendResult
from broadcast.bench.stats import MIB, step_result
from broadcast.bench.workers import WorkerPool

# After the clients are open, the gateways finish joining them to the channel (a SUBSCRIBE
# round trip for the first one on each gateway; for line clients, which cannot opt out of join
# notices, a storm of C²/2 notices): RSS is read once the gateways have gone quiet, i.e. used
# under QUIET_CPU_SHARE of a core over a QUIET_WINDOW_SECONDS window, or after SETTLE_MAX_SECONDS.
SETTLE_SECONDS = 1.0
QUIET_WINDOW_SECONDS = 0.5
QUIET_CPU_SHARE = 0.05
SETTLE_MAX_SECONDS = 120.0
# Every client must have the warm-up message before measuring: it proves they are all members.
BARRIER_SECONDS = 30.0
# After the last send: wait for the missing deliveries, but stop once nothing arrived for a while.
DRAIN_QUIET_SECONDS = 2.0
POLL_SECONDS = 0.05
PROGRESS_SECONDS = 1.0
# Gateways cost CPU even with no traffic (readiness probe, Redis pings, keepalive timers); a
# short quiet window measures that floor, so per-delivery figures at low rates can be read.
IDLE_BASELINE_SECONDS = 3.0


def channel_for(kind: str, token: str) -> str:
    """A private channel keeps other traffic out; line clients cannot choose one (protocol.md)."""
    return f"bench-{token}" if kind == "ws" else "general"


def sender_name_prefix(token: str) -> str:
    """Senders are ``<prefix><index>``: line receivers count only lines from these names."""
    return f"b{token}s"


@dataclass
class Options:
    """What to offer: the shape of the load, the same for every step of a session."""

    kind: str = "ws"
    announce: bool = True  # receivers join as a user does; False: announce=0 (a variant)
    clients: int = 1500
    senders: int = 3
    rate: float = 45_000.0  # deliveries/s offered: messages/s times receivers
    duration: float = 20.0
    drain: float = 10.0
    progress: bool = True
    results_to_stderr: bool = False  # with --json, stdout is for the machine-readable result


class Session:
    """The clients and senders of one benchmark, and the steps measured with them."""

    def __init__(self, options: Options, cluster: Cluster, pool: WorkerPool, token: str) -> None:
        self.options = options
        self.cluster = cluster
        self.pool = pool
        self.channel = channel_for(options.kind, token)
        self.sender_name = sender_name_prefix(token)
        self.senders: list[Sender] = []
        self.receivers = 0
        self._step = 0  # wire step numbers, warm-ups included: stragglers never mix
        self.measured = 0  # measured steps, as reported
        self._tty = sys.stderr.isatty()

    # -- set-up ----------------------------------------------------------------------------

    async def open_clients(self) -> dict[str, Any]:
        """Open the receivers (client i on gateway i mod N, worker i mod W); measure their RSS."""
        targets = self.cluster.targets
        shares: list[list[tuple[int, int, str, int]]] = [[] for _ in range(self.pool.size)]
        for client in range(self.options.clients):
            gateway = client % len(targets)
            target = targets[gateway]
            shares[client % self.pool.size].append((client, gateway, target.host, target.port))
        pids = self.cluster.gateway_pids
        before = {pid: rss_bytes(pid) for pid in pids}
        started = time.perf_counter()
        self.say(f"opening {self.options.clients:,} {self.options.kind} clients ...")
        replies = await self.pool.call_each([("open", share) for share in shares])
        opened = sum(r["opened"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        errors = [e for r in replies for e in r["errors"]][:5]
        open_seconds = time.perf_counter() - started
        if not opened:
            raise RuntimeError(f"no client could connect: {'; '.join(errors[:2])}")
        await trio.sleep(SETTLE_SECONDS)
        await self._wait_quiet()
        after = {pid: rss_bytes(pid) for pid in pids}
        self.receivers = opened
        added = sum(after[pid] - before[pid] for pid in pids)
        measured_clients = sum(
            count
            for reply in replies
            for gateway, count in reply["opened_by_gateway"].items()
            if targets[gateway].pid is not None
        )
        memory: dict[str, Any] = {
            "kind": self.options.kind,
            "clients": opened,
            "failed": failed,
            "errors": errors,
            "open_seconds": round(open_seconds, 2),
            "gateways": len(pids),
            "rss_before_mib": [round(before[p] / MIB, 1) for p in pids],
            "rss_after_mib": [round(after[p] / MIB, 1) for p in pids],
            "rss_added_mib": round(added / MIB, 1),
            "rss_mib_per_1000_idle": (
                round(added / MIB / measured_clients * 1000, 2) if measured_clients else None
            ),
        }
        self.say(f"opened {opened:,} clients in {open_seconds:.1f} s ({failed} failed)")
        return memory

    async def connect_senders(self, nursery: trio.Nursery) -> None:
        """Sender i on gateway i mod N: with N gateways most deliveries cross nodes."""
        targets = self.cluster.targets
        for index in range(self.options.senders):
            gateway = index % len(targets)
            sender = Sender(
                index, gateway, targets[gateway], f"{self.sender_name}{index}", self.channel
            )
            await sender.connect(nursery)
            self.senders.append(sender)

    async def barrier(self) -> int:
        """One message from each sender to every client; returns how many clients have them."""
        step = self._next_step()
        count = len(self.senders)
        await self.pool.call_all("step", step, count, self._sender_gateways(), 1)
        now = trio.current_time()
        async with trio.open_nursery() as nursery:
            for sender in self.senders:
                nursery.start_soon(sender.send_step, step, 1, 1.0, now, self.options.drain)
        complete = 0
        with trio.move_on_after(BARRIER_SECONDS):
            while True:
                polls = await self.pool.call_all("poll", count)
                complete = sum(p["complete"] for p in polls)
                self.receivers = sum(p["open"] for p in polls)
                if complete >= self.receivers:
                    break
                await trio.sleep(POLL_SECONDS)
        if complete < self.receivers:
            self.say(f"warning: only {complete} of {self.receivers} clients got the warm-up")
        return complete

    async def reopen_closed(self) -> int:
        """Reconnect clients a failed step lost (slow, broken); returns how many were gone."""
        polls = await self.pool.call_all("poll", 0)
        gone = self.options.clients - sum(p["open"] for p in polls)
        if gone > 0:
            await self.pool.call_all("reopen")
            await trio.sleep(SETTLE_SECONDS)
            await self.barrier()
        return gone

    async def idle_baseline(self) -> dict[str, float]:
        """CPU per second of the gateways and Redis with every client open and no traffic."""
        before = self._cpu()
        await trio.sleep(IDLE_BASELINE_SECONDS)
        after = self._cpu()
        return {
            key: round((after[key] - before[key]) / IDLE_BASELINE_SECONDS, 4)
            for key in ("gateways", "redis")
        }

    # -- a measured step -------------------------------------------------------------------

    async def measure(self, rate: float, duration: float) -> dict[str, Any]:
        """Offer ``rate`` deliveries/s for ``duration`` s; wait for stragglers; report."""
        senders = self.senders
        polls = await self.pool.call_all("poll", 0)
        receivers = sum(p["open"] for p in polls)
        if not receivers:
            raise RuntimeError("no client is connected")
        messages_per_s = rate / receivers
        total = max(len(senders), round(messages_per_s * duration))
        counts = [total // len(senders) + (i < total % len(senders)) for i in range(len(senders))]
        step = self._next_step()
        await self.pool.call_all("step", step, len(senders), self._sender_gateways(), max(counts))
        cpu_before, wall_before = self._cpu(), time.perf_counter()
        interval = len(senders) / messages_per_s
        start = trio.current_time() + 0.05
        sends: list[SendResult] = [SendResult() for _ in senders]
        acked_before = sum(s.acked for s in senders)

        async def send(index: int) -> None:
            sends[index] = await senders[index].send_step(
                step, counts[index], interval, start + index / messages_per_s, self.options.drain
            )

        async with trio.open_nursery() as outer:
            outer.start_soon(self._watch, start, duration, receivers, acked_before)
            async with trio.open_nursery() as nursery:
                for index in range(len(senders)):
                    nursery.start_soon(send, index)
            outer.cancel_scope.cancel()
        expected = sum(s.acked for s in sends) * receivers
        await self._drain(expected)
        cpu_after, wall = self._cpu(), time.perf_counter() - wall_before
        reports = await self.pool.call_all("report")
        cpu = {key: cpu_after[key] - cpu_before[key] for key in cpu_before}
        cpu["wall"] = wall
        if self._tty and self.options.progress:
            sys.stderr.write("\n")
        self.measured += 1
        return step_result(
            step=self.measured,
            offered=rate,
            messages_per_s=messages_per_s,
            duration=duration,
            receivers=receivers,
            sends=sends,
            reports=reports,
            cpu=cpu,
        )

    async def _drain(self, expected: int) -> None:
        last, quiet_since = -1, trio.current_time()
        with trio.move_on_after(self.options.drain):
            while True:
                polls = await self.pool.call_all("poll", 0)
                delivered = sum(p["delivered"] for p in polls)
                now = trio.current_time()
                if delivered >= expected:
                    return
                if delivered != last:
                    last, quiet_since = delivered, now
                elif now - quiet_since > DRAIN_QUIET_SECONDS:
                    return
                await trio.sleep(POLL_SECONDS)

    async def _watch(
        self, start: float, duration: float, receivers: int, acked_before: int
    ) -> None:
        """Sample the receivers' unread backlog every second; show a progress line."""
        every = 1 if self._tty else 5
        for tick in itertools.count(1):
            await trio.sleep(PROGRESS_SECONDS)
            polls = await self.pool.call_all("poll", 0, True)
            if not self.options.progress or tick % every:
                continue
            delivered = sum(p["delivered"] for p in polls)
            acked = sum(s.acked for s in self.senders) - acked_before
            elapsed = trio.current_time() - start
            share = f"{delivered / (acked * receivers) * 100:.2f} %" if acked else "-"
            line = (
                f"step {self.measured + 1}: {elapsed:5.1f}/{duration:g} s  acked {acked:,} msgs  "
                f"delivered {delivered:,} ({share} of acked x clients)  "
                f"clients {sum(p['open'] for p in polls):,}/{receivers:,}"
            )
            sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
            sys.stderr.flush()

    async def _wait_quiet(self) -> None:
        pids = self.cluster.gateway_pids
        with trio.move_on_after(SETTLE_MAX_SECONDS):
            while pids:
                before = sum(cpu_seconds(pid) for pid in pids)
                await trio.sleep(QUIET_WINDOW_SECONDS)
                used = sum(cpu_seconds(pid) for pid in pids) - before
                if used < QUIET_CPU_SHARE * QUIET_WINDOW_SECONDS * len(pids):
                    return

    # -- helpers ---------------------------------------------------------------------------

    def _next_step(self) -> int:
        self._step += 1
        return self._step

    def _sender_gateways(self) -> list[int]:
        return [sender.gateway for sender in self.senders]

    def _cpu(self) -> dict[str, float]:
        redis = self.cluster.redis
        times = [cpu_times(pid) for pid in self.cluster.gateway_pids]
        per_gateway = [user + system for user, system in times]
        return {
            "gateways": sum(per_gateway),
            "gateways_user": sum(user for user, _ in times),
            "gateways_system": sum(system for _, system in times),
            **{f"gateway{index}": cpu for index, cpu in enumerate(per_gateway)},
            "redis": cpu_seconds(redis.pid) if redis else 0.0,
            "loadgen": sum(cpu_seconds(pid) for pid in [*self.pool.pids, os.getpid()]),
        }

    def show(self, text: str) -> None:
        """A result, as soon as it is known: on stdout, or on stderr when stdout is JSON."""
        if not self.options.results_to_stderr:
            print(text, flush=True)
        else:
            self.say(text)

    def say(self, text: str) -> None:
        if self.options.progress:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    async def close(self) -> None:
        for sender in self.senders:
            await sender.close()
