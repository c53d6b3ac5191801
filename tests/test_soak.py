"""A short soak under faults (``broadcast-bench soak``): gateways killed with SIGKILL, Redis
subscribers killed, listeners resuming elsewhere with ``since``. Every acknowledged message must
reach every listener exactly once, in order. Counts only, never speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster


def test_short_soak_loses_nothing_acknowledged() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "broadcast.bench",
            "soak",
            "--seconds",
            "10",
            "--clients",
            "8",
            "--rate",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode in (0, 1), run.stderr
    result = json.loads(run.stdout)
    assert result["acknowledged"] > 0
    assert len(result["faults"]) == 3
    assert result["delivered"] == result["expected_deliveries"], result
    assert (result["duplicates"], result["gaps"], result["order_violations"]) == (0, 0, 0), result
    assert run.returncode == 0
