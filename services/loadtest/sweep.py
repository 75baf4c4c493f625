"""A rate sweep: the synchronous throughput (one request at a time), the maximum (everything at once), then
Poisson rates between them, low to high, until the server saturates: it completes requests at under
`saturation` times the rate it was offered (both measured in the run itself, between the first and the last
send and completion: see metrics.offered_rate and metrics.served_rate)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.loadtest.arrival import Arrival


@dataclass
class SweepPoint:
    label: str
    arrival: Arrival
    summary: dict[str, Any]
    saturated: bool = False


def sweep_rates(sync_rps: float, max_rps: float, steps: int) -> list[float]:
    """`steps` rates strictly between the synchronous and the maximum throughput, evenly spaced."""
    if max_rps <= sync_rps:
        return [max_rps]
    return [float(r) for r in np.linspace(sync_rps, max_rps, steps + 2)[1:-1]]


async def run_sweep(
    measure: Callable[[Arrival, str], Awaitable[dict[str, Any]]],
    steps: int,
    saturation: float = 0.9,
    burstiness: float = 1.0,
) -> list[SweepPoint]:
    """measure(arrival, label) runs the workload once and returns its summary."""
    points = [
        SweepPoint(
            "synchronous", Arrival(concurrency=1), await measure(Arrival(concurrency=1), "synchronous")
        )
    ]
    points.append(SweepPoint("max", Arrival(math.inf), await measure(Arrival(math.inf), "max throughput")))
    sync_rps = points[0].summary["request_throughput"]
    max_rps = points[1].summary["request_throughput"]
    for rate in sweep_rates(sync_rps, max_rps, steps):
        arrival = Arrival(rate=rate, burstiness=burstiness)
        summary = await measure(arrival, f"{rate:.2f} req/s")
        point = SweepPoint(f"{rate:.3g} req/s", arrival, summary)
        point.saturated = summary["served_rate"] < saturation * summary["offered_rate"]
        points.append(point)
        if point.saturated:
            break  # higher rates only queue more
    return points
