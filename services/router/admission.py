"""Admission control: at most `limit` requests served at once; a request beyond waits up to `wait_s` for a slot
(first come, first served), then is turned away with 429 and a Retry-After."""

from __future__ import annotations

import asyncio
import collections

from services.router.errors import APIError


class Admission:
    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        if self.in_flight < self.limit and not self.waiting:
            self.in_flight += 1
            return
        if self.wait_s > 0:
            slot = asyncio.get_running_loop().create_future()
            self._waiters.append(slot)
            try:
                # NOTE: shielded, so a timeout never cancels a slot that was handed over at the same moment
                await asyncio.wait_for(asyncio.shield(slot), self.wait_s)
                return  # release() handed its slot over: in_flight already counts this request
            except TimeoutError:
                if slot.done():
                    return
                slot.cancel()
            except asyncio.CancelledError:  # the client left while queued
                if slot.done() and not slot.cancelled():
                    self.release()
                else:
                    slot.cancel()
                raise
        raise APIError(
            429,
            f"the router is at its limit of {self.limit} requests in flight"
            + (f" and none finished within {self.wait_s:g}s" if self.wait_s > 0 else "")
            + "; retry later.",
            retry_after=1,
        )

    def release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes to the longest waiter: in_flight is unchanged
                return
        self.in_flight -= 1
