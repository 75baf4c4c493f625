"""The load-test harness's parts on their own: arrival processes (statistically), metric formulas (against
`vllm bench serve`'s definitions, written out here), the sweep's stopping rule, argument errors."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from scipy import stats as st

from services.loadtest.arrival import Arrival
from services.loadtest.client import RequestRecord
from services.loadtest.metrics import SLO, MetricError, summarize
from services.loadtest.runner import RunResult
from services.loadtest.sweep import run_sweep, sweep_rates
from services.loadtest.workloads import LengthRange, WorkloadError


def test_poisson_arrivals_have_exponential_gaps() -> None:
    gaps = Arrival(rate=20.0).gaps(20000, seed=1)
    assert abs(gaps.mean() - 1 / 20) < 0.03 / 20  # mean 1/rate
    assert abs(gaps.var() - 1 / 400) < 0.06 / 400  # variance 1/rate^2
    assert st.kstest(gaps, "expon", args=(0, 1 / 20)).pvalue > 0.01


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_rate_and_changes_the_spread(burstiness: float) -> None:
    rate = 10.0
    gaps = Arrival(rate=rate, burstiness=burstiness).gaps(20000, seed=2)
    assert abs(gaps.mean() - 1 / rate) < 0.05 / rate
    cv2 = gaps.var() / gaps.mean() ** 2  # squared coefficient of variation: 1 / shape
    assert abs(cv2 - 1 / burstiness) < 0.1 / burstiness
    assert st.kstest(gaps, "gamma", args=(burstiness, 0, 1 / (rate * burstiness))).pvalue > 0.01


def test_infinite_rate_and_offsets() -> None:
    assert not Arrival().gaps(5, 0).any()
    offsets = Arrival(rate=2.0).offsets(100, 3)
    assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    with pytest.raises(ValueError, match="rate"):
        Arrival(rate=0)
    with pytest.raises(ValueError, match="concurrency"):
        Arrival(concurrency=0)


def record(i: int, start: float, ttft: float, chunk_gaps: list[float], tokens: list[int]) -> RequestRecord:
    times = [start + ttft]
    for g in chunk_gaps:
        times.append(times[-1] + g)
    return RequestRecord(
        index=i,
        conversation=i,
        turn=0,
        start=start,
        ttft=ttft,
        e2e=times[-1] - start,
        chunk_times=times,
        chunk_tokens=tokens,
        prompt_tokens=10 + i,
        output_tokens=sum(tokens),
        ok=True,
    )


def test_metrics_follow_vllm_definitions() -> None:
    records = [
        record(0, 0.0, 0.100, [0.010, 0.020, 0.030], [1, 1, 1, 1]),
        record(1, 0.5, 0.200, [0.040, 0.040], [1, 2, 1]),
        record(2, 1.0, 0.300, [], [1]),
    ]
    failed = RequestRecord(index=3, conversation=3, turn=0, start=1.2, ok=False, error_kind="http_503")
    result = RunResult([*records, failed], duration=2.0, arrival=Arrival(rate=2.0), warmup_records=[])
    s = summarize(result, (50.0, 99.0), SLO.parse("ttft_ms=250,tpot_ms=25"))
    # vLLM: throughput = completed / duration; tokens from usage of completed requests
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == {"http_503": 1}
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["total_input_tokens"] == 10 + 11 + 12 and s["total_output_tokens"] == 4 + 4 + 1
    assert s["output_throughput"] == pytest.approx(9 / 2.0)
    assert s["total_token_throughput"] == pytest.approx((33 + 9) / 2.0)
    # TTFT per request; TPOT = (e2e - ttft) / (output tokens - 1) for requests with > 1 token
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    tpots = [0.060 / 3, 0.080 / 3]
    assert s["tpot_ms"]["mean"] == pytest.approx(np.mean(tpots) * 1e3)
    assert s["tpot_ms"]["p99"] == pytest.approx(np.percentile(tpots, 99) * 1e3)
    # ITL: every gap between token-carrying chunks, pooled over requests (vLLM's itl list)
    itls = [0.010, 0.020, 0.030, 0.040, 0.040]
    assert s["itl_ms"]["median"] == pytest.approx(np.median(itls) * 1e3)
    # per token: the 2-token chunk's 40 ms gap counts as two 20 ms gaps
    assert s["itl_per_token_ms"]["mean"] == pytest.approx(np.mean([10, 20, 30, 20, 20, 40]))
    assert s["e2el_ms"]["max"] == pytest.approx(300.0)
    # goodput: completed requests meeting every SLO, per second. Request 0 meets both; request 1 misses TPOT
    # (26.7 ms > 25), request 2 misses TTFT (300 ms > 250; its single token meets any TPOT limit)
    assert s["good_requests"] == 1 and s["request_goodput"] == pytest.approx(0.5)


def test_slo_and_length_parsing_errors() -> None:
    for bad in ("ttft=200", "ttft_ms:200", "ttft_ms=fast", "bogus_ms=3", "tpot_ms=-1"):
        with pytest.raises(MetricError, match="slo"):
            SLO.parse(bad)
    assert SLO.parse("ttft_ms=200, e2el_ms=1000").limits == {"ttft_ms": 200.0, "e2el_ms": 1000.0}
    assert LengthRange.parse("64:128", "x") == LengthRange(64, 128)
    for bad in ("0", "9:3", "a", "1:2:3"):
        with pytest.raises(WorkloadError):
            LengthRange.parse(bad, "--input-len")


def test_sweep_goes_from_synchronous_to_max_and_stops_at_saturation() -> None:
    # a fake server: 5 req/s one at a time, 20 req/s when given everything at once, and `sustained` req/s
    # under a steady Poisson load
    sustained = 20.0

    async def measure(arrival: Arrival, label: str) -> dict:
        if arrival.concurrency == 1:
            served = 5.0
        elif math.isinf(arrival.rate):
            served = 20.0
        else:
            served = min(arrival.rate, sustained)
        offered = 80.0 if math.isinf(arrival.rate) else arrival.rate
        calls.append(arrival)
        return {"request_throughput": served, "served_rate": served, "offered_rate": offered}

    calls: list[Arrival] = []
    points = asyncio.run(run_sweep(measure, steps=6, saturation=0.9))
    rates = [p.arrival.rate for p in points[2:]]
    assert points[0].label == "synchronous" and points[1].label == "max"
    assert rates == sorted(rates) and all(5.0 < r < 20.0 for r in rates)
    assert not any(p.saturated for p in points[:-1])
    # at 20 req/s offered the fake server is still keeping up; the sweep never offers more than max
    assert sweep_rates(5.0, 20.0, 6) == pytest.approx(list(np.linspace(5, 20, 8)[1:-1]))

    sustained = 12.0
    calls.clear()
    points = asyncio.run(run_sweep(measure, steps=6, saturation=0.9))
    assert points[-1].saturated and points[-1].arrival.rate > 12.0 / 0.9
    assert not any(p.saturated for p in points[:-1])
    assert len(points) < 8 and len(calls) == len(points), "the sweep went on past saturation"
