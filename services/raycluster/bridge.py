"""Mirror a Prometheus registry into Ray's metrics (`ray.util.metrics`), so Ray's metrics export, its dashboard
and its Grafana show what the registry's own /metrics shows, under the same names with Ray's `ray_` prefix.

Every `interval_s`: counters add what they gained (Ray records no zero, so a counter shows in Ray's export once it
has counted something); gauges are set again (Ray exports a gauge only while it is
being set, so a series that leaves the registry, e.g. a worker that left the fleet, leaves Ray's export too);
histograms replay what each bucket gained, as that many observations of the bucket's midpoint. Ray keeps no more
than that of its own histograms (it aggregates observations into buckets and derives `_sum` from their midpoints),
so its buckets and `_count` match the registry's exactly and its `_sum` is as approximate as for any Ray metric.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

log = logging.getLogger("pdmesh.ray")
# observed per streamed chunk: replaying it would cost Ray one call per chunk (TPOT covers the same ground)
SKIPPED = frozenset({"pdmesh_inter_token_latency_seconds"})
Labels = tuple[tuple[str, str], ...]


class Sink(Protocol):
    """Where mirrored values go (Ray's metrics, or a recorder in tests)."""

    def counter(self, name: str, doc: str, keys: tuple[str, ...]) -> Any: ...
    def gauge(self, name: str, doc: str, keys: tuple[str, ...]) -> Any: ...
    def histogram(self, name: str, doc: str, keys: tuple[str, ...], bounds: list[float]) -> Any: ...


class RaySink:
    def counter(self, name: str, doc: str, keys: tuple[str, ...]) -> Any:
        from ray.util.metrics import Counter

        return Counter(name, doc, tag_keys=keys)

    def gauge(self, name: str, doc: str, keys: tuple[str, ...]) -> Any:
        from ray.util.metrics import Gauge

        return Gauge(name, doc, tag_keys=keys)

    def histogram(self, name: str, doc: str, keys: tuple[str, ...], bounds: list[float]) -> Any:
        from ray.util.metrics import Histogram

        return Histogram(name, doc, boundaries=bounds, tag_keys=keys)


def replay(bounds: list[float], gained: list[float]) -> list[tuple[float, int]]:
    """(value, times) observations that add `gained[i]` to bucket i: (bounds[i-1], bounds[i]], the first from 0,
    the last above every bound."""
    lows = [0.0, *bounds]
    highs = [*bounds, 2 * bounds[-1]]
    return [((lows[i] + highs[i]) / 2, round(n)) for i, n in enumerate(gained) if n > 0]


class RegistryBridge:
    def __init__(
        self,
        registry: CollectorRegistry,
        sink: Sink | None = None,
        skip: Iterable[str] = SKIPPED,
        interval_s: float = 1.0,
    ) -> None:
        self.registry = registry
        self.sink = sink or RaySink()
        self.skip = frozenset(skip)
        self.interval_s = interval_s
        self._metrics: dict[str, Any] = {}
        self._counted: dict[tuple[str, Labels], float] = {}
        self._buckets: dict[tuple[str, Labels], list[float]] = {}  # per bucket, not cumulative
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ray-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # a metric Ray refuses must not end the mirroring of the others
                log.exception("mirroring metrics into Ray failed")

    def step(self) -> None:
        for family in self.registry.collect():
            if family.name in self.skip:
                continue
            mirror: Callable[[Metric], None] | None = getattr(self, f"_{family.type}", None)
            if mirror is not None:
                mirror(family)

    def _metric(self, family: Metric, make: Callable[[tuple[str, ...]], Any]) -> Any | None:
        if family.name not in self._metrics:
            keys = next((s.labels for s in family.samples if "le" not in s.labels), None)
            if keys is None:  # no series yet, so no label names to declare
                return None
            self._metrics[family.name] = make(tuple(k for k in keys))
        return self._metrics[family.name]

    def _counter(self, family: Metric) -> None:
        metric = self._metric(family, lambda keys: self.sink.counter(family.name, family.documentation, keys))
        for s in family.samples:
            if metric is None or not s.name.endswith("_total"):
                continue
            key = (family.name, tuple(sorted(s.labels.items())))
            gained = s.value - self._counted.get(key, 0.0)
            self._counted[key] = s.value
            if gained > 0:
                metric.inc(gained, tags=dict(s.labels))

    def _gauge(self, family: Metric) -> None:
        metric = self._metric(family, lambda keys: self.sink.gauge(family.name, family.documentation, keys))
        for s in family.samples:
            if metric is not None and math.isfinite(s.value):
                metric.set(s.value, tags=dict(s.labels))

    def _histogram(self, family: Metric) -> None:
        series: dict[Labels, list[tuple[float, float]]] = {}
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
        if not series:
            return
        first = sorted(next(iter(series.values())))
        bounds = [le for le, _ in first if le < math.inf]
        metric = self._metrics.get(family.name)
        if metric is None:
            keys = tuple(k for k, _ in next(iter(series)))
            metric = self._metrics[family.name] = self.sink.histogram(
                family.name, family.documentation, keys, bounds
            )
        for labels, buckets in series.items():
            cumulative = [n for _, n in sorted(buckets)]
            now = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]  # per bucket
            key = (family.name, labels)
            before = self._buckets.get(key, [0.0] * len(now))
            self._buckets[key] = now
            tags = dict(labels)
            for value, times in replay(bounds, [b - a for a, b in zip(before, now, strict=True)]):
                for _ in range(times):
                    metric.observe(value, tags=tags)
