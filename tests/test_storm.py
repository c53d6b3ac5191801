"""Storms at CI size (``broadcast-bench storm``, issue 11): real gateways, Redis and haproxy.

- Kill: 400 clients on one of 3 gateways, senders publishing on the others; SIGKILL that gateway.
  Every client comes back (through haproxy when it is installed) with ``since`` and ``epoch`` and
  must have every acknowledged message exactly once, ids in order.
- Connect: 300 clients, 64 at a time, with the defaults a user gets (join notices and presence
  on): none fails, and no HTTP header line is ever published to the channel; the same storm
  against the plain baseline server (``broadcast[bench]``) works beside it.

Counts only, never speed: the times are reported, not asserted (a shared 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from broadcast.bench.storm_clients import Client, StormSpec, StormWorker

STORM_TIMEOUT_SECONDS = 90


def storm(*args: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "broadcast.bench", "storm", *args, "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=STORM_TIMEOUT_SECONDS,
        check=False,
    )
    assert run.returncode in (0, 1), run.stderr
    return json.loads(run.stdout)


def _frame(event: dict[str, Any]) -> bytes:
    payload = json.dumps(event, separators=(",", ":")).encode()
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


def test_the_storm_counting_sees_a_lost_a_duplicated_and_a_reordered_message() -> None:
    worker = StormWorker(StormSpec(0, wants_presence=True, senders=1))
    client = Client(0, ("127.0.0.1", 1), senders=1)
    worker.clients.append(client)
    ids = ["5-0", "6-0", "6-0", "7-0", "4-0"]
    texts = ["0:0", "0:1", "0:1", "0:3", "0:4"]  # 0:2 never comes; 0:1 twice; 4-0 late
    data = b"".join(
        _frame({"type": "message", "id": i, "epoch": "e1", "text": t})
        for i, t in zip(ids, texts, strict=True)
    )
    worker._feed(client, data[:7])  # a frame split across reads
    worker._feed(client, data[7:])
    report = worker.report([[0, 1, 2, 3, 4]], kill_at=0.0)
    assert (report["lost"], report["duplicates"]) == (1, 1)
    assert report["order_violations"] == 2  # the second 6-0 and 4-0
    assert (client.last_id, client.epoch) == ("7-0", "e1")  # what a reconnect asks for


@pytest.mark.cluster
def test_kill_storm_recovers_every_acknowledged_message_once_in_order() -> None:
    result = storm("kill", "--clients", "400", "--rate", "15", "--before", "1.5")
    assert result["recovered"] == 400, result
    assert result["acknowledged"] > 0 and result["publish_errors"] == 0, result
    assert sum(result["closes"].values()) == 400, result  # each lost its connection once
    assert (result["lost"], result["duplicates"], result["order_violations"]) == (0, 0, 0), result
    assert result["clients_missing_messages"] == 0
    assert result["recovery_s"]["max"] is not None
    assert result["ok"] is True


@pytest.mark.cluster
def test_connect_storm_with_defaults_fails_nobody_and_publishes_no_header() -> None:
    result = storm("connect", "--clients", "300", "--concurrency", "64")
    ours = result["ours"]
    assert "no announce=0" in result["config"]["settings"]
    assert (ours["ready"], ours["failed"]) == (300, 0), ours
    assert ours["header_lines"] == 0, ours["header_samples"]
    # Everyone had a welcome and a presence: the storm was measured with presence on.
    assert ours["events"]["welcome"] >= 300 and ours["events"]["presence"] >= 300, ours
    # The baseline beside it (websockets + redis-py) took the same storm: a ratio, not a speed.
    assert (result["baseline"]["ready"], result["baseline"]["failed"]) == (300, 0)
    assert result["ratio"] > 0 and result["cpu_ratio"] > 0
    assert result["ok"] is True
