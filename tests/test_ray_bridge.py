"""The bridge from a Prometheus registry into Ray's metrics, against a recorder: what Ray is given adds up, bucket
by bucket and counter by counter, to the raw observations (counted here independently, with numpy), and gauges
are given their current values only while their series exist."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.raycluster.bridge import RegistryBridge

BUCKETS = (0.005, 0.05, 0.5, 5.0)


class Recorded:
    def __init__(self, kind: str, keys: tuple[str, ...], bounds: list[float] | None = None) -> None:
        self.kind, self.keys, self.bounds = kind, keys, bounds
        self.calls: list[tuple[float, dict[str, str]]] = []

    def _record(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.keys), (tags, self.keys)  # Ray refuses a record missing a declared tag
        self.calls.append((value, tags))

    inc = set = observe = _record


class Recorder:
    def __init__(self) -> None:
        self.metrics: dict[str, Recorded] = {}

    def _make(self, kind: str, name: str, keys: tuple[str, ...], bounds: list[float] | None = None) -> Any:
        assert name not in self.metrics, f"{name} declared twice"
        self.metrics[name] = Recorded(kind, keys, bounds)
        return self.metrics[name]

    def counter(self, name: str, doc: str, keys: tuple[str, ...]) -> Any:
        return self._make("counter", name, keys)

    def gauge(self, name: str, doc: str, keys: tuple[str, ...]) -> Any:
        return self._make("gauge", name, keys)

    def histogram(self, name: str, doc: str, keys: tuple[str, ...], bounds: list[float]) -> Any:
        return self._make("histogram", name, keys, bounds)


def test_bridge_replays_buckets_counts_and_gauges() -> None:
    rng = random.Random(7)
    registry = CollectorRegistry()
    latency = Histogram("t_latency_seconds", "doc", ["phase"], buckets=BUCKETS, registry=registry)
    requests = Counter("t_requests", "doc", ["status"], registry=registry)
    used = Gauge("t_blocks_used", "doc", ["address"], registry=registry)
    skipped = Histogram("t_skipped_seconds", "doc", buckets=BUCKETS, registry=registry)
    Counter("t_never", "doc", ["x"], registry=registry)  # no series yet: nothing to declare
    recorder = Recorder()
    bridge = RegistryBridge(registry, recorder, skip={"t_skipped_seconds"})
    observed: dict[str, list[float]] = defaultdict(list)
    counted: dict[str, float] = defaultdict(float)
    for step in range(6):
        for _ in range(rng.randrange(0, 40)):
            phase = rng.choice(["queue", "prefill"])
            value = rng.choice([0.005, 0.5, 0.0, 12.0]) if rng.random() < 0.2 else rng.expovariate(3.0)
            latency.labels(phase).observe(value)
            observed[phase].append(value)
            skipped.observe(value)
        for status in ("200", "429"):
            n = rng.randrange(0, 3)
            requests.labels(status).inc(n)
            counted[status] += n
        used.labels("a:1").set(step)
        if step < 3:
            used.labels("b:2").set(10 + step)
        elif step == 3:
            used.remove("b:2")  # the worker left
        calls_before = {n: len(m.calls) for n, m in recorder.metrics.items()}
        bridge.step()
        gauge = recorder.metrics["t_blocks_used"]
        fresh = gauge.calls[calls_before.get("t_blocks_used", 0) :]
        expected = {("a:1", float(step))} | ({("b:2", float(10 + step))} if step < 3 else set())
        assert {(tags["address"], value) for value, tags in fresh} == expected

    assert set(recorder.metrics) == {"t_latency_seconds", "t_requests", "t_blocks_used"}
    hist = recorder.metrics["t_latency_seconds"]
    assert hist.bounds == list(BUCKETS) and hist.keys == ("phase",)
    edges = [-np.inf, *BUCKETS, np.inf]
    for phase, values in observed.items():
        replayed = [v for v, tags in hist.calls if tags == {"phase": phase}]
        # Prometheus buckets are (lower, upper]: count x <= upper; numpy's are [lower, upper), so mirror them
        want = np.histogram(-np.array(values), bins=[-e for e in reversed(edges)])[0][::-1]
        got = np.histogram(-np.array(replayed), bins=[-e for e in reversed(edges)])[0][::-1]
        assert got.tolist() == want.tolist(), phase
    total = defaultdict(float)
    for value, tags in recorder.metrics["t_requests"].calls:
        assert value > 0
        total[tags["status"]] += value
    assert dict(total) == {k: v for k, v in counted.items() if v}
