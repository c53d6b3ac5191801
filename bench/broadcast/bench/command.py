"""``broadcast-bench``: run the benchmark (``run``, the default), a rate ``--search``, an
``idle`` memory measurement, the CI ``smoke`` that checks the benchmark's own counting, the
connect and kill/drain ``storm``, and the older single-purpose measurements.

    broadcast-bench [run] [--gateways 3 | --url ws://H:P/ ...] [--clients 1500] [--senders 3]
                    [--rate 45000] [--duration 20] [--kind ws|lines] [--search] [--json]
                    [--baseline] [--no-announce] [--python PATH]
    broadcast-bench idle [--gateways 1] [--clients 1000] [--kind ws|lines] [--json]
    broadcast-bench smoke [--json]
    broadcast-bench storm connect|kill|drain [--clients N] [--json] (see storm --help)
    broadcast-bench fanout|roundtrip|soak [...] (each has its own --help)

Rates are deliveries per second offered: messages per second times connected clients.
Receiving clients join with the defaults a user gets (join notices and presence on);
--no-announce measures the variant where they join quietly (announce=0), and says so.
--baseline runs the same load, in the same run, against the plain websockets + redis-py server
(broadcast.bench.baseline; pip install 'broadcast[bench]') and prints the ratios.
See docs/benchmarks.md for the method and the figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import replace
from typing import Any

import trio

import broadcast
from broadcast.bench.harness import Cluster, parse_url, raise_file_limit
from broadcast.bench.runner import Options, Session, channel_for, sender_name_prefix
from broadcast.bench.search import search
from broadcast.bench.selfcheck import check_counting
from broadcast.bench.stats import format_memory, format_step, machine
from broadcast.bench.workers import WorkerPool

COMMANDS = ("run", "idle", "smoke")
# Subcommands with their own parsers, in their own modules (imported only when used).
TOOLS = {
    "storm": "broadcast.bench.storm",
    "fanout": "broadcast.bench.fanout",
    "roundtrip": "broadcast.bench.roundtrip",
    "soak": "broadcast.bench.soak",
}
# Receiving a delivery costs about as much CPU as sending it (a recv per write, measured), so by
# default there are as many receiver processes as gateways: on a shared machine the scheduler then
# gives both sides similar shares. At least two, so one stalled worker shows; at most four.
MIN_WORKERS, MAX_WORKERS = 2, 4
# The smoke: two gateways through Redis (one without redis-server), a few clients, a few hundred
# messages in two seconds: enough to exercise every counter, small enough for CI.
SMOKE_CLIENTS = 6
SMOKE_SENDERS = 2
SMOKE_MESSAGES = 300
SMOKE_SECONDS = 2.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    text = __doc__.replace("``", "")  # the docstring's reST quotes mean nothing in a terminal
    parser = argparse.ArgumentParser(
        prog="broadcast-bench",
        description=text.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=text.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--version", action="version", version=f"broadcast-bench {broadcast.__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure a cluster at a rate, or --search for the best")
    _cluster_options(run, gateways=3)
    run.add_argument(
        "--clients", type=_positive_int, default=1500, help="receiving clients (default 1500)"
    )
    run.add_argument(
        "--senders", type=_positive_int, default=3, help="publishing clients (default 3)"
    )
    run.add_argument(
        "--rate", type=_positive_float, default=45_000,
        help="deliveries/s offered (messages/s x clients); with --search, the first rate tried",
    )  # fmt: skip
    run.add_argument(
        "--duration", type=_positive_float, default=20.0, help="seconds per measured step"
    )
    run.add_argument("--search", action="store_true", help="find the highest rate held")
    run.add_argument(
        "--baseline", action="store_true",
        help="also run the same load against the plain websockets + redis-py server",
    )  # fmt: skip
    run.add_argument(
        "--search-steps", type=_positive_int, default=8, help="step budget of --search"
    )
    idle = commands.add_parser("idle", help="RSS per 1,000 idle clients (and that they all work)")
    _cluster_options(idle, gateways=1)
    idle.add_argument("--clients", type=_positive_int, default=1000)
    smoke = commands.add_parser("smoke", help="a tiny run that checks the benchmark's counting")
    smoke.add_argument("--json", action="store_true", help="one JSON object on stdout")
    smoke.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _cluster_options(parser: argparse.ArgumentParser, gateways: int) -> None:
    parser.add_argument(
        "--gateways", type=_positive_int, default=gateways,
        help=f"gateways to start (default {gateways}); more than one adds a private redis-server",
    )  # fmt: skip
    parser.add_argument("--redis", action="store_true", help="use Redis even with one gateway")
    parser.add_argument(
        "--url", action="append", default=[],
        help="target a running gateway instead (repeat for several); starts nothing",
    )  # fmt: skip
    parser.add_argument(
        "--pid", type=int, action="append", default=[],
        help="with --url: pids of those gateways, to measure their CPU and RSS",
    )  # fmt: skip
    parser.add_argument("--kind", choices=["ws", "lines"], default="ws", help="receiving clients")
    parser.add_argument(
        "--no-announce", action="store_true",
        help="receivers join with announce=0 (a variant: by default notices and presence are on)",
    )  # fmt: skip
    parser.add_argument(
        "--python", help="the gateways' interpreter (another checkout's venv, to compare)"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="receiver processes (default: one per gateway, 2 to 4)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        raise_file_limit()
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    raise_file_limit()
    if args.command == "smoke":
        return smoke(args)
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    options = Options(
        kind=args.kind,
        announce=not args.no_announce,
        clients=args.clients,
        senders=getattr(args, "senders", 1),
        rate=getattr(args, "rate", 0.0),
        duration=getattr(args, "duration", 0.0),
        progress=not args.quiet,
        results_to_stderr=args.json,
    )
    try:
        with _make_cluster(args) as cluster:
            workers = args.workers or max(MIN_WORKERS, min(MAX_WORKERS, len(cluster.targets)))
            result = _run(cluster, options, workers, args.command, args)
        if getattr(args, "baseline", False):
            _say(args, "the same load against the baseline (websockets + redis-py):")
            with Cluster.start(len(cluster.targets), True, module=BASELINE) as base:
                result["baseline"] = _run(base, options, workers, args.command, args)
            result["ratios"] = _ratios(result, result["baseline"])
    except (OSError, RuntimeError, trio.TooSlowError, ExceptionGroup) as error:
        # A cluster that cannot be reached or started is a one-line report; a bug is not.
        errors = _leaves(error) if isinstance(error, ExceptionGroup) else [error]
        if not all(isinstance(e, _EXPECTED) for e in errors):
            raise
        for each in errors:
            print(f"broadcast-bench: {each!r}", file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0


_EXPECTED = (OSError, RuntimeError, trio.TooSlowError)
BASELINE = "broadcast.bench.baseline"
# Figures compared with the baseline, per measured step: ours / baseline.
RATIO_KEYS = ("server_cpu_s_per_million", "deliveries_per_s")


def _ratios(ours: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, float | None]]:
    ratios = []
    for mine, theirs in zip(ours.get("steps", []), baseline.get("steps", []), strict=False):
        ratios.append(
            {
                key: round(mine[key] / theirs[key], 2)
                if mine.get(key) and theirs.get(key)
                else None
                for key in RATIO_KEYS
            }
        )
    return ratios


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The plain exceptions inside (nested) exception groups, for a one-line report each."""
    found: list[BaseException] = []
    for error in group.exceptions:
        found += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return found


def _make_cluster(args: argparse.Namespace) -> Cluster:
    if args.url:
        targets = [parse_url(url) for url in args.url]
        if args.pid and len(args.pid) != len(targets):
            raise SystemExit("--pid: give one per --url, in the same order")
        if args.pid:
            targets = [replace(t, pid=pid) for t, pid in zip(targets, args.pid, strict=True)]
        return Cluster(targets)
    return Cluster.start(args.gateways, args.redis, python=args.python)


def _run(
    cluster: Cluster, options: Options, workers: int, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    token = f"{os.getpid()}{secrets.token_hex(2)}"
    session_pool = WorkerPool.receivers(
        min(workers, max(1, options.clients)),
        options.kind,
        channel_for(options.kind, token),
        sender_name_prefix(token).encode(),
        options.announce,
    )
    try:
        result = trio.run(_session, cluster, options, session_pool, token, mode, args)
    finally:
        session_pool.stop()
    result["gateway_warnings"] = [w for g in cluster.gateways for w in g.warnings()][:10]
    return result


async def _session(
    cluster: Cluster,
    options: Options,
    pool: WorkerPool,
    token: str,
    mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    session = Session(options, cluster, pool, token)
    result: dict[str, Any] = {
        "mode": mode,
        "machine": machine(),
        "config": {
            "gateways": len(cluster.targets),
            "redis": cluster.redis is not None or None,
            "kind": options.kind,
            "receivers_join": "defaults (notices and presence on)"
            if options.announce
            else "variant: announce=0",
            "clients": options.clients,
            "senders": options.senders,
            "rate": options.rate,
            "duration_s": options.duration,
            "workers": pool.size,
        },
    }
    async with trio.open_nursery() as nursery:
        memory = result["memory"] = await session.open_clients()
        session.show(format_memory(memory))
        await session.connect_senders(nursery)
        result["warmup_complete"] = await session.barrier()
        if mode != "smoke":
            idle = result["idle_cpu_s_per_s"] = await session.idle_baseline()
            session.show(
                f"idle: gateways use {idle['gateways']:.4f} CPU-s/s, redis {idle['redis']:.4f}, "
                f"with every client connected and no traffic"
            )
        if mode == "run" and args.search:
            result["search"] = await search(
                session, options.rate, options.duration, args.search_steps
            )
        elif mode in ("run", "smoke"):
            step = await session.measure(options.rate, options.duration)
            session.show(format_step(step))
            result["steps"] = [step]
        await session.close()
        nursery.cancel_scope.cancel()
    return result


def smoke(args: argparse.Namespace) -> int:
    """Exit 1 when the counting is wrong, never because of speed."""
    problems = [f"self-check: {p}" for p in check_counting()]
    gateways = 2 if shutil.which("redis-server") else 1
    options = Options(
        kind="ws",
        clients=SMOKE_CLIENTS,
        senders=SMOKE_SENDERS,
        rate=SMOKE_MESSAGES / SMOKE_SECONDS * SMOKE_CLIENTS,
        duration=SMOKE_SECONDS,
        drain=5.0,
        progress=not args.quiet,
        results_to_stderr=args.json,
    )
    with Cluster.start(gateways, use_redis=gateways > 1) as cluster:
        result = _run(cluster, options, 1, "smoke", args)
    step = result["steps"][0]
    if step["expected"] != SMOKE_MESSAGES * SMOKE_CLIENTS:
        problems.append(f"expected {step['expected']}, planned {SMOKE_MESSAGES * SMOKE_CLIENTS}")
    if step["delivered"] != step["expected"]:
        problems.append(f"delivered {step['delivered']} != expected {step['expected']}")
    for key in ("duplicates", "order_violations", "stale"):
        if step[key]:
            problems.append(f"{key}: {step[key]}")
    if result["warmup_complete"] != SMOKE_CLIENTS:
        problems.append(f"only {result['warmup_complete']} clients got the warm-up")
    for key in ("delivered", "expected", "duplicates", "order_violations"):
        result[key] = step[key]
    result["ok"] = not problems
    result["problems"] = problems
    _print(result, args.json)
    return 0 if result["ok"] else 1


def _print(result: dict[str, Any], as_json: bool) -> None:
    """The end of the report (steps were shown as they finished), or the whole of it as JSON."""
    if as_json:
        print(json.dumps(result))
        return
    if "search" in result:
        found = result["search"]
        print(
            f"search: best rate held {found['best_held_deliveries_per_s']} deliveries/s; "
            f"lowest failed {found['lowest_failed_deliveries_per_s']}"
        )
    for ratio in result.get("ratios", []):
        print(
            "ours / baseline: CPU per million deliveries "
            f"{ratio['server_cpu_s_per_million']}, deliveries/s {ratio['deliveries_per_s']}"
        )
    if "ok" in result:
        print("smoke: counting OK" if result["ok"] else "smoke: FAILED " + str(result["problems"]))
    for warning in result.get("gateway_warnings", []):
        print("gateway:", warning)
