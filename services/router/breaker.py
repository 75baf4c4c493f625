"""A circuit breaker per worker: stop sending requests to a worker that keeps failing them, then probe it.

closed -> open after `threshold` consecutive failed calls (a worker that answers its load polls but fails every
request is still cut off); open -> half_open once `cooldown_s` has passed; half_open lets exactly one request
through as a probe: its success closes the breaker, its failure opens it again for twice as long (up to
`max_cooldown_s`). Only failures that are the worker's count (unreachable, crashed, timed out, broken stream):
a full worker, a bad request or a client that left are not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass
class Breaker:
    threshold: int = 3
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0
    failures: int = 0  # consecutive
    opened_at: float = 0.0
    cooldown: float = 0.0  # of the current opening
    probing: bool = False  # half open, and the probe is out
    trips: int = 0  # times opened

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return CLOSED
        return HALF_OPEN if time.monotonic() - self.opened_at >= self.cooldown else OPEN

    def allows(self) -> bool:
        """May a request go to the worker now (without taking the half-open probe)?"""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self.probing)

    def take(self) -> None:
        """A request was sent; in half_open it is the probe, and no other goes until it ends."""
        if self.state == HALF_OPEN:
            self.probing = True

    def success(self) -> None:
        self.failures, self.probing, self.cooldown = 0, False, 0.0

    def failure(self) -> bool:
        """Record a failed call; True when this opened the breaker."""
        was_probe = self.probing
        self.probing = False
        self.failures += 1
        if self.failures < self.threshold:
            return False
        if was_probe or self.failures == self.threshold:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown_s) if was_probe else self.cooldown_s
            self.opened_at = time.monotonic()
            self.trips += 1
            return True
        return False
