"""What the prefix cache gained and lost, in order, numbered: the feed routers index (`WatchKvEvents`).

The allocator appends on the engine thread; readers on other threads take what follows a sequence number. The log
is bounded: a reader that fell further behind than it holds gets None and must start from a snapshot.
"""

from __future__ import annotations

import threading
from collections import deque

CAPACITY = 1 << 17


class KvEventLog:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self._lock = threading.Lock()
        self._events: deque[tuple[int, bool, int]] = deque(maxlen=capacity)  # (seq, stored, block hash)
        self.seq = 0  # the last event's number

    def add(self, stored: bool, block_hash: int) -> None:
        with self._lock:
            self.seq += 1
            self._events.append((self.seq, stored, block_hash))

    def since(self, seq: int) -> list[tuple[int, bool, int]] | None:
        """Events after `seq`, oldest first; None when some of them are no longer held (or seq is unknown)."""
        with self._lock:
            if seq > self.seq:
                return None
            if seq == self.seq:
                return []
            if not self._events or self._events[0][0] > seq + 1:
                return None
            return [e for e in self._events if e[0] > seq]
