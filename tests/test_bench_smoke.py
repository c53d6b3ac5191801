"""CI runs the benchmark's smoke: it checks the benchmark's counting, never its speed.

``broadcast-bench smoke`` starts two gateways and a private redis-server (one gateway without
redis-server), sends a few hundred messages to a few clients, and exits non-zero when what it
counted is wrong (lost, duplicated or reordered deliveries, or a self-check of its counters).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.cluster

# The smoke itself takes a few seconds; the bound leaves room for a busy 2-core CI machine.
SMOKE_TIMEOUT_SECONDS = 20
STEP_KEYS = {
    "offered_deliveries_per_s", "receivers", "messages_sent", "messages_acked", "expected",
    "delivered", "delivered_ratio", "duplicates", "order_violations", "deliveries_per_s",
    "latency_ms", "cross_node_latency_ms", "server_cpu_s_per_million", "loadgen_cpu_s", "held",
}  # fmt: skip


def test_smoke_counts_every_delivery_once_and_in_order() -> None:
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "broadcast.bench", "smoke", "--json", "--quiet"],
        capture_output=True,
        timeout=SMOKE_TIMEOUT_SECONDS,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 0, completed.stdout.decode() + completed.stderr.decode()
    result = json.loads(completed.stdout)
    assert result["ok"] is True, result["problems"]
    assert {"mode", "machine", "config", "memory", "steps", "delivered", "expected"} <= set(result)
    assert result["delivered"] == result["expected"] > 0
    assert result["duplicates"] == 0
    assert result["order_violations"] == 0
    (step,) = result["steps"]
    assert set(step) >= STEP_KEYS
    assert step["delivered"] == step["expected"] == step["messages_acked"] * step["receivers"]
    assert step["latency_ms"]["samples"] == step["delivered"]
    assert elapsed < SMOKE_TIMEOUT_SECONDS
