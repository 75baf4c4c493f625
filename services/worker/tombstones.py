"""Request ids that were aborted or released, remembered a while so that a call arriving after them is refused
(an Abort or Release may overtake the call it cancels)."""

from __future__ import annotations

import time
from collections import OrderedDict

KEEP_S = 300.0


class Tombstones:
    def __init__(self, keep_s: float = KEEP_S) -> None:
        self.keep_s = keep_s
        self._when: OrderedDict[str, float] = OrderedDict()  # oldest first

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._when.pop(request_id, None)
        self._when[request_id] = now
        while self._when and now - next(iter(self._when.values())) > self.keep_s:
            self._when.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._when
