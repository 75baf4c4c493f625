"""When requests start: a fixed number in flight, or a Poisson process, or a burstier (gamma) one.

Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean 1/rate, as in `vllm bench serve`:
burstiness 1 is a Poisson process (exponential gaps), below 1 is burstier, above 1 more regular.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Arrival:
    rate: float = math.inf  # requests per second; inf: all at once
    burstiness: float = 1.0
    concurrency: int | None = None  # at most this many in flight

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"--rate must be positive, got {self.rate}")
        if self.burstiness <= 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")

    def gaps(self, n: int, seed: int) -> np.ndarray:
        """n inter-arrival gaps in seconds (the first request starts after the first gap's 0)."""
        if math.isinf(self.rate):
            return np.zeros(n)
        rng = np.random.default_rng(seed)
        return rng.gamma(shape=self.burstiness, scale=1.0 / (self.rate * self.burstiness), size=n)

    def offsets(self, n: int, seed: int) -> np.ndarray:
        """Start times relative to the run's start; the first is 0."""
        gaps = self.gaps(n, seed)
        if n:
            gaps[0] = 0.0
        return np.cumsum(gaps)

    def describe(self) -> str:
        parts = []
        if not math.isinf(self.rate):
            kind = "Poisson" if self.burstiness == 1 else f"gamma, burstiness {self.burstiness:g}"
            parts.append(f"{self.rate:g} req/s ({kind})")
        if self.concurrency:
            parts.append(f"concurrency {self.concurrency}")
        return ", ".join(parts) or "all at once"
