"""The rate search: the highest offered rate the cluster holds (stats.held), found in few steps.

Double from the starting rate until a step is not held, then bisect between the best held and
the lowest failed rate until they are within ``RESOLUTION`` of each other or the step budget is
spent. Clients a failed step lost are reconnected (and re-synchronised) before the next step.
"""

from __future__ import annotations

from typing import Any

from broadcast.bench.runner import Session
from broadcast.bench.stats import format_step

# Stop bisecting once the failing rate is within 15 % of the held one: finer than that is
# below the run-to-run noise of a shared 2-core machine.
RESOLUTION = 1.15


async def search(session: Session, start: float, duration: float, steps: int) -> dict[str, Any]:
    best: float | None = None
    failed: float | None = None
    rate = start
    results = []
    for _ in range(steps):
        result = await session.measure(rate, duration)
        results.append(result)
        session.show(format_step(result))
        if result["held"]:
            best = rate
        else:
            failed = rate
            await session.reopen_closed()
        if failed is None:
            rate *= 2
        elif best is None:
            rate /= 2
        elif failed / best <= RESOLUTION:
            break
        else:
            rate = (best + failed) / 2
    return {
        "best_held_deliveries_per_s": round(best) if best is not None else None,
        "lowest_failed_deliveries_per_s": round(failed) if failed is not None else None,
        "steps": results,
    }
