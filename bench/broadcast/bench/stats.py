"""Turning counts from workers, senders and /proc into one step's figures, and printing them.

Kept apart from the code that measures, so what a figure means is written down in one place.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

from broadcast.bench.histogram import Histogram
from broadcast.bench.senders import SendResult

MIB = 1 << 20
# What "held" means in a rate search (issue 4): nearly everything arrives, and quickly.
HELD_DELIVERED_RATIO = 0.999
HELD_P99_MS = 250.0
# The senders must also have kept to the offered rate: a cluster that absorbs a rate only by
# making the senders wait (acks late) did not hold it. Same bound as the delivery latency.
HELD_SENDER_LAG_P99_MS = 250.0


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def per_million(cpu_seconds: float, deliveries: int) -> float | None:
    return round(cpu_seconds / deliveries * 1e6, 2) if deliveries else None


def step_result(
    *,
    step: int,
    offered: float,
    messages_per_s: float,
    duration: float,
    receivers: int,
    sends: list[SendResult],
    reports: list[dict[str, Any]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    """One measured step: what was offered, what arrived, how fast, and what it cost."""
    sent = sum(r.sent for r in sends)
    acked = sum(r.acked for r in sends)
    delivered = sum(r["delivered"] for r in reports)
    expected = acked * receivers
    latency, cross, lag = Histogram(), Histogram(), Histogram()
    for report in reports:
        latency.merge(Histogram.from_wire(report["latency"]))
        cross.merge(Histogram.from_wire(report["cross_latency"]))
    for send in sends:
        lag.merge(send.lag)
    first_send = min((r.first_ns for r in sends if r.first_ns), default=0)
    last_receipt = max((r["last_ns"] for r in reports), default=0)
    window_s = (last_receipt - first_send) / 1e9 if first_send and last_receipt else 0.0
    closed: dict[str, int] = {}
    for report in reports:
        for reason, count in report["closed"].items():
            closed[reason] = closed.get(reason, 0) + count
    result: dict[str, Any] = {
        "step": step,
        "offered_deliveries_per_s": round(offered),
        "offered_messages_per_s": round(messages_per_s, 2),
        "duration_s": duration,
        "receivers": receivers,
        "messages_sent": sent,
        "messages_acked": acked,
        "publish_errors": sum(r.errors for r in sends),
        "publish_error_samples": [e for r in sends for e in r.error_samples][:3],
        "sender_lag_ms": lag.summary_ms(),
        "expected": expected,
        "delivered": delivered,
        "delivered_ratio": round(delivered / expected, 6) if expected else None,
        "duplicates": sum(r["duplicates"] for r in reports),
        "order_violations": sum(r["order_violations"] for r in reports),
        "stale": sum(r["stale"] for r in reports),
        "min_per_client": min((r["min_per_client"] for r in reports), default=0),
        "max_per_client": max((r["max_per_client"] for r in reports), default=0),
        "clients_closed": closed,
        "receiver_backlog_max_kib": round(sum(r["backlog_max"] for r in reports) / 1024, 1),
        "deliveries_per_s": round(delivered / window_s) if window_s > 0 else None,
        "latency_ms": latency.summary_ms(),
        "cross_node_latency_ms": cross.summary_ms(),
        "server_cpu_s": round(cpu["gateways"], 3),
        "server_cpu_s_per_million": per_million(cpu["gateways"], delivered),
        "server_user_cpu_s_per_million": per_million(cpu["gateways_user"], delivered),
        "server_system_cpu_s_per_million": per_million(cpu["gateways_system"], delivered),
        "server_cpu_s_by_gateway": [
            round(cpu[f"gateway{i}"], 3) for i in range(len(cpu)) if f"gateway{i}" in cpu
        ],
        "redis_cpu_s": round(cpu["redis"], 3),
        "redis_cpu_s_per_million": per_million(cpu["redis"], delivered),
        "loadgen_cpu_s": round(cpu["loadgen"], 3),
        "loadgen_cpu_s_per_million": per_million(cpu["loadgen"], delivered),
        "wall_s": round(cpu["wall"], 3),
    }
    if not result["server_cpu_s_by_gateway"]:  # gateways given by URL only: nothing to read
        for key in (
            "server_cpu_s",
            "server_cpu_s_per_million",
            "server_user_cpu_s_per_million",
            "server_system_cpu_s_per_million",
            "redis_cpu_s",
            "redis_cpu_s_per_million",
        ):
            result[key] = None  # fmt: skip
    result["held"], result["why_not_held"] = held(result)
    return result


def held(result: dict[str, Any]) -> tuple[bool, list[str]]:
    reasons = []
    ratio = result["delivered_ratio"]
    if ratio is None or ratio < HELD_DELIVERED_RATIO:
        reasons.append(f"delivered {ratio} < {HELD_DELIVERED_RATIO}")
    p99 = result["latency_ms"]["p99"]
    if p99 is None or p99 > HELD_P99_MS:
        reasons.append(f"p99 {p99} ms > {HELD_P99_MS:g} ms")
    lag = result["sender_lag_ms"]["p99"]
    if lag is not None and lag > HELD_SENDER_LAG_P99_MS:
        reasons.append(f"senders p99 {lag} ms behind schedule")
    if result["messages_sent"] and result["messages_acked"] < result["messages_sent"]:
        reasons.append(f"{result['messages_sent'] - result['messages_acked']} publishes not acked")
    return not reasons, reasons


def format_step(result: dict[str, Any]) -> str:
    lat, cross, lag = result["latency_ms"], result["cross_node_latency_ms"], result["sender_lag_ms"]
    verdict = "held" if result["held"] else "NOT held: " + "; ".join(result["why_not_held"])
    rate = result["deliveries_per_s"]
    lines = [
        f"step {result['step']}: offered {result['offered_deliveries_per_s']:,} deliveries/s "
        f"({result['offered_messages_per_s']:g} msgs/s to {result['receivers']:,} clients) "
        f"for {result['duration_s']:g} s: {verdict}",
        f"  deliveries/s      {rate:,}" if rate is not None else "  deliveries/s      -",
        f"  delivered         {result['delivered']:,} / {result['expected']:,} expected "
        f"({_percent(result['delivered_ratio'])}); duplicates {result['duplicates']}, "
        f"order violations {result['order_violations']}",
        f"  messages          {result['messages_sent']:,} sent, {result['messages_acked']:,} "
        f"acked, {result['publish_errors']} errors; sender lag p99 {lag['p99']} ms"
        + (
            f"; e.g. {result['publish_error_samples'][0]}"
            if result["publish_error_samples"]
            else ""
        ),
        f"  receivers         at most {result['receiver_backlog_max_kib']} KiB left unread "
        f"(sampled each second; small: the load generator kept up)",
        f"  latency ms        p50 {lat['p50']}  p99 {lat['p99']}  max {lat['max']}   "
        + (
            f"(cross-node: p50 {cross['p50']}  p99 {cross['p99']}  max {cross['max']})"
            if cross["samples"]
            else "(no cross-node deliveries: one gateway)"
        ),
    ]
    if result["server_cpu_s"] is None:
        lines.append(
            f"  server CPU        not measured (give --pid with --url); load generator "
            f"{result['loadgen_cpu_s_per_million']} s per million deliveries"
        )
    else:
        lines.append(
            f"  server CPU        {result['server_cpu_s']} s = "
            f"{result['server_cpu_s_per_million']} s per million deliveries "
            f"(user {result['server_user_cpu_s_per_million']}, "
            f"system {result['server_system_cpu_s_per_million']}; "
            f"redis {result['redis_cpu_s_per_million']}, "
            f"load generator {result['loadgen_cpu_s_per_million']})"
        )
    if result["clients_closed"]:
        lines.append(f"  clients closed    {result['clients_closed']}")
    return "\n".join(lines)


def format_memory(memory: dict[str, Any]) -> str:
    per = memory.get("rss_mib_per_1000_idle")
    if per is None:
        return (
            f"memory: {memory['clients']:,} {memory['kind']} clients open; RSS not measured "
            "(no gateway pid: give --pid with --url)"
        )
    return (
        f"memory: {memory['clients']:,} idle {memory['kind']} clients added "
        f"{memory['rss_added_mib']} MiB RSS over {memory['gateways']} gateway(s): "
        f"{per} MiB per 1,000 idle clients"
    )


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.3f} %"
