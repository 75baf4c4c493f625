"""Metrics of a run. Every formula is written out in docs/loadtest.md, next to `vllm bench serve`'s."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.loadtest.client import SERVER_PHASES, RequestRecord
from services.loadtest.runner import RunResult

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)


class MetricError(ValueError):
    pass


@dataclass(frozen=True)
class SLO:
    limits: dict[str, float]  # key in SLO_KEYS -> milliseconds

    @classmethod
    def parse(cls, text: str | None) -> SLO | None:
        """'ttft_ms=200,tpot_ms=50' -> SLO; None for no SLO."""
        if not text:
            return None
        limits = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in SLO_KEYS:
                raise MetricError(
                    f"bad --slo entry '{part}': use KEY=MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}"
                )
            try:
                limits[key] = float(value)
            except ValueError:
                raise MetricError(
                    f"bad --slo value '{value}' for {key}: give milliseconds, e.g. {key}=200"
                ) from None
            if limits[key] <= 0:
                raise MetricError(f"--slo {key} must be positive")
        return cls(limits)

    def met(self, r: RequestRecord) -> bool:
        # a one-token answer has no time per output token: it meets any TPOT limit (as in vllm bench serve)
        values = {
            "ttft_ms": _ms(r.ttft),
            "tpot_ms": _ms(tpot(r)) or 0.0,
            "e2el_ms": _ms(r.e2e),
            "itl_ms": max((_ms(g) for g in chunk_gaps(r)), default=0.0),
        }
        return all(values[k] is not None and values[k] <= v for k, v in self.limits.items())


def parse_percentiles(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_PERCENTILES
    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise MetricError(f"--percentiles takes numbers like 50,90,99, got '{text}'") from None
    if not all(0 < p <= 100 for p in values):
        raise MetricError("--percentiles must lie in (0, 100]")
    return values


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def tpot(r: RequestRecord) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
    if r.ttft is None or r.e2e is None or r.output_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.output_tokens - 1)


def chunk_gaps(r: RequestRecord) -> list[float]:
    """Gaps between consecutive token-carrying chunks (vLLM's ITL)."""
    return list(np.diff(r.chunk_times)) if len(r.chunk_times) > 1 else []


def token_gaps(r: RequestRecord) -> list[float]:
    """Per-token ITL: each chunk gap shared evenly by the tokens of the later chunk."""
    out: list[float] = []
    for gap, n in zip(chunk_gaps(r), r.chunk_tokens[1:], strict=True):
        out += [gap / n] * n
    return out


def stats(values: list[float], percentiles: tuple[float, ...], scale: float = 1e3) -> dict[str, float]:
    """mean/median/std/min/max/pNN of values (seconds), reported in milliseconds by default."""
    if not values:
        return {}
    a = np.asarray(values, dtype=float) * scale
    out = {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(a, p))
    return out


def summarize(
    result: RunResult, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES, slo: SLO | None = None
) -> dict[str, Any]:
    records = result.records
    ok = [r for r in records if r.ok]
    duration = result.duration
    input_tokens = sum(r.prompt_tokens or r.expected_prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "arrival": result.arrival.describe(),
        "duration_s": duration,
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.error_kind for r in records if not r.ok)),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "offered_rate": offered_rate(records),
        "served_rate": served_rate(ok),
        "max_concurrency": max_in_flight(ok),
        "ttft_ms": stats([r.ttft for r in ok if r.ttft is not None], percentiles),
        "tpot_ms": stats([t for r in ok if (t := tpot(r)) is not None], percentiles),
        "itl_ms": stats([g for r in ok for g in chunk_gaps(r)], percentiles),
        "itl_per_token_ms": stats([g for r in ok for g in token_gaps(r)], percentiles),
        "e2el_ms": stats([r.e2e for r in ok if r.e2e is not None], percentiles),
        "percentiles": list(percentiles),
    }
    if slo is not None:
        good = sum(1 for r in ok if slo.met(r))
        summary["slo"] = slo.limits
        summary["good_requests"] = good
        summary["request_goodput"] = good / duration
    breakdown = {}
    for phase in SERVER_PHASES:
        values = [r.server[phase] / 1e3 for r in ok if phase in r.server]
        if values:
            breakdown[phase] = stats(values, percentiles)
    client = [r.ttft - r.server["ttft_ms"] / 1e3 for r in ok if r.ttft is not None and "ttft_ms" in r.server]
    if client:
        breakdown["client_network_ms"] = stats(client, percentiles)
    if breakdown:
        summary["ttft_breakdown_ms"] = breakdown
    return summary


def offered_rate(records: list[RequestRecord]) -> float:
    """Requests per second actually sent between the first and the last send (a Poisson run's realized rate)."""
    starts = sorted(r.start for r in records)
    if len(starts) < 2 or starts[-1] <= starts[0]:
        return 0.0
    return (len(starts) - 1) / (starts[-1] - starts[0])


def served_rate(records: list[RequestRecord]) -> float:
    """Completions per second between the first and the last completion: the rate the server kept up with,
    free of the start-up and drain tails that bias completed / duration on short runs."""
    ends = sorted(r.start + r.e2e for r in records if r.e2e is not None)
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return 0.0
    return (len(ends) - 1) / (ends[-1] - ends[0])


def max_in_flight(records: list[RequestRecord]) -> int:
    events = sorted([(r.start, 1) for r in records] + [(r.start + (r.e2e or 0.0), -1) for r in records])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak
