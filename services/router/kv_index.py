"""Which worker holds which KV block: an exact index keyed by the engines' chained block hashes.

Every router replica keeps its own, fed by one `WatchKvEvents` subscription per worker (no router-to-router
protocol): a snapshot when it joins (so a fresh replica sees blocks resident before it started), then each block
stored or removed. A worker whose stream breaks is dropped from the index at once (a restarted worker starts
empty; its old entries must not attract requests), and comes back with the snapshot of its next subscription.

A lookup walks the prompt's block hashes once: a worker's match is the longest run of leading blocks it holds, so
it costs O(prompt blocks x holders), never O(fleet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import grpc
from pdmesh.v1 import worker_pb2 as pb

log = logging.getLogger("pdmesh.router")
KV_EVENTS_INTERVAL_S = 0.05
RESUBSCRIBE_S = (0.2, 0.5, 1.0, 2.0)


class KvIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> addresses of the workers holding it
        self._blocks: dict[str, set[int]] = {}  # address -> its block hashes
        self.instance: dict[str, str] = {}  # address -> the worker process the entries came from
        self.seq: dict[str, int] = {}  # address -> its last event applied
        self.updated: dict[str, float] = {}  # address -> when its last batch arrived (monotonic)

    def reset(self, worker: str, instance: str, seq: int, hashes: Iterable[int]) -> None:
        self.drop(worker)
        self.instance[worker], self.seq[worker] = instance, seq
        blocks = self._blocks[worker] = set(hashes)
        for h in blocks:
            self._holders.setdefault(h, set()).add(worker)
        self.updated[worker] = time.monotonic()

    def apply(self, worker: str, seq: int, events: Iterable[tuple[bool, int]]) -> None:
        blocks = self._blocks.setdefault(worker, set())
        for stored, h in events:
            if stored:
                blocks.add(h)
                self._holders.setdefault(h, set()).add(worker)
            else:
                blocks.discard(h)
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(worker)
                    if not holders:
                        del self._holders[h]
        self.seq[worker] = seq
        self.updated[worker] = time.monotonic()

    def drop(self, worker: str) -> None:
        for h in self._blocks.pop(worker, ()):
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(worker)
                if not holders:
                    del self._holders[h]
        self.instance.pop(worker, None)
        self.seq.pop(worker, None)

    def blocks(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    def matched_blocks(self, hashes: list[int]) -> dict[str, int]:
        """For each worker holding the first block: how many leading blocks of `hashes` it holds in a row."""
        depth: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for w in alive:
                depth[w] = i + 1
        return depth


async def follow(stub, address: str, index: KvIndex) -> None:  # type: ignore[no-untyped-def]
    """Keep `index` in step with one worker's cache for as long as the task lives."""
    failures = 0
    while True:
        try:
            request = pb.WatchKvEventsRequest(interval_s=KV_EVENTS_INTERVAL_S)
            async for batch in stub.WatchKvEvents(request):
                failures = 0
                events = [(e.stored, e.block_hash) for e in batch.events]
                if batch.snapshot or index.instance.get(address) != batch.instance:
                    index.reset(address, batch.instance, batch.seq, (h for stored, h in events if stored))
                else:
                    index.apply(address, batch.seq, events)
        except grpc.aio.AioRpcError as e:
            index.drop(address)  # its entries may be stale (a restart empties a worker's cache)
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("worker %s reports no KV events: routing to it ignores its cache", address)
                return
        else:
            index.drop(address)
        await asyncio.sleep(RESUBSCRIBE_S[min(failures, len(RESUBSCRIBE_S) - 1)])
        failures += 1
