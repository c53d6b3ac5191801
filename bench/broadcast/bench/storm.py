"""``broadcast-bench storm``: the bursty moments (issue 11): a connect storm, a kill or drain storm.

    broadcast-bench storm connect [--clients 1500] [--concurrency 128] [--gateways 3]
                                  [--no-baseline] [--python PATH] [--json]
    broadcast-bench storm kill|drain [--clients 500] [--gateways 3] [--rate 10] [--senders 3]
                                     [--no-haproxy] [--python PATH] [--json]

``connect``: N WebSocket clients opened C at a time against G gateways (client i on gateway
i mod G, no load balancer) with the settings a user gets: join notices and presence on (no
``announce=0``). It reports the time until every client had its ``welcome`` and its first
``presence``, failures by reason, and how many HTTP header lines ever reached the channel (a
listener and every client count messages whose text looks like one: it must be 0). Then the same
storm against the plain baseline (``broadcast.bench.baseline``: ``websockets`` + redis-py, ready
at its welcome) in the same run, and the ratio ours/baseline.

``kill`` / ``drain``: N clients on one of G gateways, senders on the others publishing steadily
(``--rate`` messages/s in all; senders use ``announce=0``: they are the load, not the subject),
then that gateway gets SIGKILL (``kill``) or SIGTERM (``drain``). The clients come back through
HAProxy (deploy/haproxy/haproxy.cfg's settings; directly to the survivors when haproxy is not
installed) with ``since=<last id>`` and ``epoch``, as the CLI does. It reports p50/p99/max time
from the signal until each client had its ``recovered``, messages lost (every acknowledged message
must reach every client once), duplicates, order violations, and the CPU of Redis and the gateways
from the signal until the last client recovered.

``--python`` starts the gateways with another installation's interpreter (a before/after
comparison: the storm clients stay the same). See docs/benchmarks.md for figures.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
from typing import Any

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from broadcast.bench.harness import (
    Cluster,
    HaproxyProcess,
    cpu_seconds,
    raise_file_limit,
)
from broadcast.bench.stats import machine
from broadcast.bench.storm_clients import HEADER_LINE, StormSpec, worker_main
from broadcast.bench.workers import WorkerPool

# Two storm workers keep the clients' CPU off the gateways' cores on a small machine; each
# drains its sockets through one epoll (storm_clients.py).
DEFAULT_WORKERS = 2
# The longest a kill/drain storm is watched before it is reported unfinished (--timeout).
STORM_SECONDS = 300.0
POLL_SECONDS = 0.1
SETTLE_SECONDS = 1.0  # after the storm: late frames (a header published late) still counted
SENDER_WINDOW_SECONDS = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcast-bench storm",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1].replace("``", ""),
    )
    kinds = parser.add_subparsers(dest="storm", required=True)
    connect = kinds.add_parser("connect", help="N clients connecting C at a time")
    connect.add_argument("--clients", type=int, default=1500)
    connect.add_argument("--concurrency", type=int, default=128, help="handshakes at once")
    connect.add_argument("--no-baseline", action="store_true", help="skip the baseline server")
    for name in ("kill", "drain"):
        storm = kinds.add_parser(name, help=f"{name} the gateway that holds N clients")
        storm.add_argument("--clients", type=int, default=500)
        storm.add_argument(
            "--concurrency", type=int, default=128, help="handshakes at once, first connections"
        )
        storm.add_argument(
            "--reconnect-concurrency", type=int, default=0,
            help="reconnecting handshakes at once (default 0: each client on its own, as users)",
        )  # fmt: skip
        storm.add_argument("--rate", type=float, default=10.0, help="messages/s, all senders")
        storm.add_argument("--senders", type=int, default=3)
        storm.add_argument("--before", type=float, default=2.0, help="seconds sent before")
        storm.add_argument(
            "--after", type=float, default=1.0, help="seconds sent after all recover"
        )
        storm.add_argument("--no-haproxy", action="store_true", help="reconnect to the survivors")
        storm.add_argument(
            "--timeout", type=float, default=STORM_SECONDS, help="seconds to wait for recovery"
        )
    for sub in kinds.choices.values():
        sub.add_argument("--gateways", type=int, default=3)
        sub.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="client processes")
        sub.add_argument("--python", help="the gateways' interpreter (another checkout's venv)")
        sub.add_argument("--json", action="store_true", help="one JSON object on stdout")
        sub.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_file_limit()
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    if args.storm == "connect":
        result = connect_storm(args, say)
        ok = result["ours"]["failed"] == 0 and result["ours"]["header_lines"] == 0
    else:
        result = kill_storm(args, say)
        ok = result["lost"] == 0 and result["unrecovered"] == 0 and not result["duplicates"]
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0 if ok else 1


# -- the connect storm ---------------------------------------------------------------------


def connect_storm(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "storm": "connect",
        "machine": machine(),
        "config": {
            "clients": args.clients,
            "concurrency": args.concurrency,
            "gateways": args.gateways,
            "settings": "defaults: join notices and presence on (no announce=0)",
        },
    }
    say(f"connect storm: {args.clients} clients, {args.concurrency} at a time, "
        f"{args.gateways} gateways, default settings (notices and presence on)")  # fmt: skip
    result["ours"] = _one_connect_storm(args, "broadcast.gateway", args.python, True, say)
    if not args.no_baseline:
        result["baseline"] = _one_connect_storm(args, "broadcast.bench.baseline", None, False, say)
        ours, base = result["ours"], result["baseline"]
        result["ratio"] = round(ours["seconds"] / base["seconds"], 2) if base["seconds"] else None
        # CPU is steadier than time on a shared machine: the servers' CPU seconds for the storm.
        spent = ours["cpu_s"]["gateways"], base["cpu_s"]["gateways"]
        result["cpu_ratio"] = round(spent[0] / spent[1], 2) if spent[1] else None
    return result


def _one_connect_storm(
    args: argparse.Namespace, module: str, python: str | None, presence: bool, say: Any
) -> dict[str, Any]:
    name = "baseline" if module != "broadcast.gateway" else "ours"
    with Cluster.start(args.gateways, True, extra=(), python=python, module=module) as cluster:
        pool = WorkerPool(
            [StormSpec(i, wants_presence=presence) for i in range(args.workers)], worker_main
        )
        try:
            reply = trio.run(_connect_session, cluster, pool, args, presence)
        finally:
            pool.stop()
        reply["gateway_warnings"] = [w for g in cluster.gateways for w in g.warnings()][:5]
    say(
        f"{name}: {reply['ready']}/{args.clients} connected in {reply['seconds']:.2f} s, "
        f"{reply['failed']} failed {reply['failures'] or ''}, header lines {reply['header_lines']}"
    )
    return reply


async def _connect_session(
    cluster: Cluster, pool: WorkerPool, args: argparse.Namespace, presence: bool
) -> dict[str, Any]:
    shares: list[list[tuple[int, str, int]]] = [[] for _ in range(pool.size)]
    for client in range(args.clients):
        target = cluster.targets[client % len(cluster.targets)]
        shares[client % pool.size].append((client, target.host, target.port))
    per_worker = max(1, math.ceil(args.concurrency / pool.size))
    listener = HeaderListener()
    async with trio.open_nursery() as nursery:
        if presence:  # the baseline has no channel a header could reach but its one broadcast
            await nursery.start(listener.run, cluster.gateways[0].url + "?name=listener&announce=0")
        cpu_before = _cpu(cluster)
        started = time.monotonic()
        replies = await pool.call_each([("connect", share, per_worker) for share in shares])
        seconds = time.monotonic() - started
        cpu = _cpu(cluster)
        await trio.sleep(SETTLE_SECONDS)
        reports = await pool.call_all("report", [], 0.0)
        nursery.cancel_scope.cancel()
    failures: dict[str, int] = {}
    retries: dict[str, int] = {}
    for reply in replies:
        _add(failures, reply["failures"])
        _add(retries, reply["retries"])
    return {
        "ready": sum(r["ready"] for r in replies),
        "failed": sum(r["failed"] for r in replies),
        "seconds": round(seconds, 3),
        "failures": failures,
        "retries": retries,
        "errors": [e for r in replies for e in r["errors"]][:5],
        "header_lines": listener.header_lines + sum(r["header_lines"] for r in reports),
        "header_samples": (listener.samples + [s for r in reports for s in r["header_samples"]])[
            :5
        ],
        "listener_header_lines": listener.header_lines,
        "events": _sum_counts(r["events"] for r in reports),
        "closes": _sum_counts(r["closes"] for r in reports),
        "cpu_s": {key: round(cpu[key] - cpu_before[key], 2) for key in cpu},
    }


class HeaderListener:
    """One WebSocket client in the default channel counting messages that look like headers."""

    def __init__(self) -> None:
        self.header_lines = 0
        self.samples: list[str] = []

    async def run(self, url: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(url) as ws:
            task_status.started()
            try:
                while True:
                    event = json.loads(await ws.get_message())
                    if event.get("type") != "message":
                        continue
                    for line in str(event.get("text", "")).splitlines():
                        if HEADER_LINE.match(line):
                            self.header_lines += 1
                            if len(self.samples) < 5:
                                self.samples.append(line[:80])
            except ConnectionClosed:
                pass


# -- the kill / drain storm -----------------------------------------------------------------


def kill_storm(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    if args.gateways < 2:
        raise SystemExit("a kill storm needs at least 2 gateways")
    with Cluster.start(args.gateways, True, extra=(), python=args.python) as cluster:
        survivors = cluster.targets[1:]
        haproxy = None if args.no_haproxy else HaproxyProcess.start(cluster.targets)
        try:
            via = [haproxy.target] if haproxy else survivors
            say(
                f"{args.storm} storm: {args.clients} clients on gateway gw0 of {args.gateways}, "
                f"coming back through {'haproxy' if haproxy else 'the survivors directly'}; "
                f"{args.senders} senders on the others at {args.rate:g} msgs/s"
            )
            pool = WorkerPool(
                [
                    StormSpec(i, wants_presence=True, senders=args.senders)
                    for i in range(args.workers)
                ],
                worker_main,
            )
            try:
                result = trio.run(_kill_session, cluster, pool, args, via, say)
            finally:
                pool.stop()
            result["via"] = "haproxy" if haproxy else "survivors"
            result["gateway_warnings"] = [w for g in cluster.gateways for w in g.warnings()][:5]
        finally:
            if haproxy:
                haproxy.stop()
    result["machine"] = machine()
    return result


async def _kill_session(
    cluster: Cluster, pool: WorkerPool, args: argparse.Namespace, via: list[Any], say: Any
) -> dict[str, Any]:
    victim = cluster.gateways[0]
    shares: list[list[tuple[int, str, int]]] = [[] for _ in range(pool.size)]
    for client in range(args.clients):
        shares[client % pool.size].append((client, victim.target.host, victim.port))
    per_worker = max(1, math.ceil(args.concurrency / pool.size))
    replies = await pool.call_each([("connect", share, per_worker) for share in shares])
    ready = sum(r["ready"] for r in replies)
    say(f"{ready}/{args.clients} clients on gw0")
    if ready < args.clients:
        log = "".join(list(victim.log)[-20:])
        raise RuntimeError(
            f"only {ready} of {args.clients} clients connected: {replies[0]}\n"
            f"gateway gw0 (exit status {victim.process.poll()}) logged:\n{log}"
        )
    senders = [
        StormSender(i, cluster.targets[1 + i % (len(cluster.targets) - 1)].port)
        for i in range(args.senders)
    ]
    interval = args.senders / args.rate
    stop_sending = trio.Event()
    result: dict[str, Any] = {
        "storm": args.storm,
        "config": {
            "clients": args.clients,
            "gateways": args.gateways,
            "rate": args.rate,
            "senders": args.senders,
            "concurrency": args.concurrency,
            "reconnect_concurrency": args.reconnect_concurrency or "unlimited",
            "settings": "defaults: join notices and presence on (senders: announce=0)",
        },
    }
    async with trio.open_nursery() as nursery:
        for sender in senders:
            await nursery.start(sender.run, interval, stop_sending)
        await trio.sleep(args.before)
        limit = args.reconnect_concurrency
        per_worker_reconnects = math.ceil(limit / pool.size) if limit > 0 else math.inf
        await pool.call_all("storm", [(t.host, t.port) for t in via], per_worker_reconnects)
        measured = [g.pid for g in cluster.gateways[1:]]
        if args.storm == "drain":
            measured.append(victim.pid)
        cpu_before = _cpu(cluster, measured)
        kill_at = time.monotonic()
        victim.signal(signal.SIGKILL if args.storm == "kill" else signal.SIGTERM)
        recovered = 0
        with trio.move_on_after(args.timeout):
            while recovered < args.clients:
                await trio.sleep(POLL_SECONDS)
                progress = await pool.call_all("progress", kill_at)
                recovered = sum(p["recovered"] for p in progress)
        storm_seconds = time.monotonic() - kill_at
        cpu = _cpu(cluster, measured)
        say(f"{recovered}/{args.clients} recovered {storm_seconds:.2f} s after the signal")
        await trio.sleep(args.after)
        stop_sending.set()
        # Every acknowledged message reaches the clients within a moment: wait until none
        # arrives any more (bounded).
        last = -1
        with trio.move_on_after(SENDER_WINDOW_SECONDS):
            while True:
                await trio.sleep(0.5)
                total = sum(p["messages"] for p in await pool.call_all("progress", kill_at))
                if total == last:
                    break
                last = total
        nursery.cancel_scope.cancel()
    acked = [sorted(s.acked) for s in senders]
    reports = await pool.call_all("report", acked, kill_at)
    times = sorted(t for r in reports for t in r["recovery_s"])
    lost = sum(r["lost"] for r in reports)
    result.update(
        {
            "recovered": len(times),
            "unrecovered": args.clients - len(times),
            "recovery_s": _percentiles(times),
            "storm_seconds": round(storm_seconds, 3),
            "acknowledged": sum(len(a) for a in acked),
            "publish_errors": sum(s.errors for s in senders),
            "expected_deliveries": sum(len(a) for a in acked) * args.clients,
            "lost": lost,
            "clients_missing_messages": sum(r["clients_missing"] for r in reports),
            "duplicates": sum(r["duplicates"] for r in reports),
            "order_violations": sum(r["order_violations"] for r in reports),
            "samples": [s for r in reports for s in r["samples"]][:10],
            "reconnects": sum(r["reconnects"] for r in reports),
            "closes": _sum_counts(r["closes"] for r in reports),
            "retries": _sum_counts(r["retries"] for r in reports),
            "failures": _sum_counts(r["failures"] for r in reports),
            "header_lines": sum(r["header_lines"] for r in reports),
            "cpu_s": {key: round(cpu[key] - cpu_before[key], 2) for key in cpu},
            "cpu_share": {
                key: round((cpu[key] - cpu_before[key]) / storm_seconds, 2) for key in cpu
            },
        }
    )
    return result


class StormSender:
    """Publishes ``<index>:<seq>`` at a steady pace; keeps the seqs the gateway acknowledged."""

    def __init__(self, index: int, port: int) -> None:
        self.index = index
        self.url = f"ws://127.0.0.1:{port}/?name=storm-sender{index}&announce=0"
        self.acked: set[int] = set()
        self.errors = 0

    async def run(self, interval: float, stop: trio.Event, task_status: Any) -> None:
        async with open_websocket_url(self.url) as ws:
            while json.loads(await ws.get_message()).get("type") != "welcome":
                pass
            task_status.started()
            next_at = trio.current_time()
            seq = 0
            while not stop.is_set():
                await ws.send_message(f"{self.index}:{seq}")
                while True:
                    event = json.loads(await ws.get_message())
                    if event.get("type") == "ack":
                        self.acked.add(seq)
                        break
                    if event.get("type") == "error":
                        self.errors += 1
                        break
                seq += 1
                next_at += interval
                await trio.sleep_until(next_at)


# -- helpers -------------------------------------------------------------------------------


def _cpu(cluster: Cluster, pids: list[int] | None = None) -> dict[str, float]:
    pids = cluster.gateway_pids if pids is None else pids
    return {
        "gateways": sum(cpu_seconds(pid) for pid in pids),
        "redis": cpu_seconds(cluster.redis.pid) if cluster.redis else 0.0,
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    p99 = values[min(len(values) - 1, math.ceil(len(values) * 0.99) - 1)]
    return {
        "p50": round(statistics.median(values), 3),
        "p99": round(p99, 3),
        "max": round(values[-1], 3),
    }


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for each in counts:
        _add(total, each)
    return total


def _print(result: dict[str, Any]) -> None:
    if result["storm"] == "connect":
        ours = result["ours"]
        print(f"settings: {result['config']['settings']}")
        print(
            f"ours: {ours['ready']} connected in {ours['seconds']:.2f} s, {ours['failed']} failed "
            f"{ours['failures'] or ''}, header lines published: {ours['header_lines']}"
        )
        if "baseline" in result:
            base = result["baseline"]
            print(f"baseline (websockets + redis-py): {base['seconds']:.2f} s, {base['failed']} "
                  f"failed; ratio ours/baseline {result['ratio']} (time), "
                  f"{result['cpu_ratio']} (server CPU)")  # fmt: skip
    else:
        r = result
        print(
            f"{r['storm']} storm via {r['via']}: {r['recovered']}/{r['config']['clients']} "
            f"recovered; time to recovered p50 {r['recovery_s']['p50']} s, p99 "
            f"{r['recovery_s']['p99']} s, max {r['recovery_s']['max']} s"
        )
        print(
            f"acknowledged {r['acknowledged']}, lost {r['lost']}, duplicates {r['duplicates']}, "
            f"order violations {r['order_violations']}, retries {r['retries']}"
        )
        print(f"CPU during the storm (s, share of a core): {r['cpu_s']} {r['cpu_share']}")
        for sample in r["samples"]:
            print("  ", sample)
    print("OK" if result["ok"] else "FAILED")
