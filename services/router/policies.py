"""How a router picks a worker of a role for a request (`pdmesh router --policy`).

- round_robin: in turn.
- least_load: the least queued work (prefill and colocated: tokens not computed yet; decode: requests).
- power_of_two: the less loaded of two picked at random.
- kv_aware (default): prefill and colocated workers by cost = prompt tokens it would have to compute (the prompt
  minus the longest prefix it already caches) + its queued tokens; a warm worker that is saturated loses to a cold
  idle one by the same arithmetic, so cache affinity is released where it would hot-spot. Decode workers by load,
  then by the longest cached prefix (fewer blocks to move).

Load is what the worker last reported plus what this replica dispatched to it since that report was requested,
so replicas (and one replica's burst) do not all pile onto the worker that looked idlest a moment ago.
Ties go to the lowest address, so every replica with the same view makes the same choice.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.router.workers import Worker

POLICIES = ("round_robin", "least_load", "power_of_two", "kv_aware")


class Chooser:
    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy '{policy}'; choose one of: {', '.join(POLICIES)}")
        self.policy = policy
        self._cursors: dict[str, itertools.count[int]] = {}
        self._random = random.Random()

    def choose(
        self,
        role: str,
        candidates: Sequence[Worker],
        prompt_len: int,
        cached_blocks: Callable[[], dict[str, int]],
    ) -> tuple[Worker, int]:
        """The worker, and how many leading prompt blocks it caches (0 when the policy does not look)."""
        candidates = sorted(candidates, key=lambda w: w.address)
        if self.policy == "round_robin":
            cursor = self._cursors.setdefault(role, itertools.count())
            return candidates[next(cursor) % len(candidates)], 0
        if self.policy == "least_load":
            return min(candidates, key=lambda w: load(w, role)), 0
        if self.policy == "power_of_two":
            pair = self._random.sample(candidates, 2) if len(candidates) > 1 else list(candidates)
            return min(pair, key=lambda w: (load(w, role), w.address)), 0
        cached = cached_blocks()
        if role == "decode":
            best = min(candidates, key=lambda w: (load(w, role), -cached.get(w.address, 0)))
            return best, cached.get(best.address, 0)

        def cost(w: Worker) -> int:
            block = w.info.block_size if w.info is not None else 1
            return prompt_len - cached.get(w.address, 0) * block + load(w, role)

        best = min(candidates, key=cost)
        return best, cached.get(best.address, 0)


def load(w: Worker, role: str) -> int:
    """Queued work on the worker as this replica sees it: tokens to compute (prefill, colocated) or requests
    (decode), reported plus dispatched since."""
    reported = w.load
    if role == "decode":
        base = (reported.running + reported.waiting + reported.parked) if reported is not None else 0
        return base + len(w.unreported)
    base = reported.pending_tokens if reported is not None else 0
    return base + sum(tokens for _, tokens in w.unreported)
