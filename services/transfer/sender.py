"""Prefill side of KV transfer: after each engine step, push the blocks that became complete.

Contract, per request: `begin` with its destination; `push_ready` after every engine step (on the engine thread)
gathers newly completed blocks into a staging slot, fences, and queues one coalesced
`batch_transfer_sync_write` per destination session; `close` once the prompt is done; `wait` returns when every
byte has landed (or raises). Writes run on the transfer thread, so the transfer of chunk k overlaps the compute of
chunk k+1. `cancel` stops further pushes and waits until no write for the request is in flight, after which the
decode worker may safely free its blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from services.engine.kv_cache import KVCache
from services.transfer.checksum import kv_checksum
from services.transfer.destination import KvDestination
from services.transfer.mooncake_engine import MooncakeEngine, TransferError
from services.transfer.staging import Fence, StagingBuffer

log = logging.getLogger("pdmesh.transfer")


@dataclass
class RequestTransfer:
    request_id: str
    destination: KvDestination
    num_blocks: int  # prompt blocks
    next_block: int  # first block not yet pushed
    checksum: bool
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    in_flight: int = 0
    bytes_sent: int = 0
    closed: bool = False
    cancelled: bool = False
    error: str | None = None
    kv_checksum: int | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def _maybe_done(self) -> None:
        if self.in_flight == 0 and (self.closed or self.cancelled or self.error):
            self.finished = self.finished or time.monotonic()
            self.done.set()


@dataclass
class _Job:
    session_id: str
    slot: int
    fence: Fence
    src: list[int]
    dst: list[int]
    lengths: list[int]
    requests: list[tuple[RequestTransfer, int]]  # (request, bytes of it in this job)


def coalesce(src_base: int, dst_addresses: list[int], nbytes: int) -> tuple[list[int], list[int], list[int]]:
    """Descriptors for blocks laid out back to back from src_base: one per run of contiguous destinations."""
    src: list[int] = []
    dst: list[int] = []
    lengths: list[int] = []
    for i, d in enumerate(dst_addresses):
        if dst and dst[-1] + lengths[-1] == d:
            lengths[-1] += nbytes
        else:
            src.append(src_base + i * nbytes)
            dst.append(d)
            lengths.append(nbytes)
    return src, dst, lengths


class KvSender:
    def __init__(
        self, engine: MooncakeEngine, kv_cache: KVCache, staging: StagingBuffer, timeout_s: float
    ) -> None:
        self.engine = engine
        self.kv_cache = kv_cache
        self.staging = staging
        self.timeout_s = timeout_s
        self.block_size = kv_cache.layout.block_size
        self.block_nbytes = kv_cache.layout.block_nbytes
        self.requests: dict[str, RequestTransfer] = {}
        self.bytes_sent = 0
        self.num_writes = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        engine.register(staging.buffer)
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    # ---- engine thread -----------------------------------------------------------------------------------
    def begin(
        self, request_id: str, destination: KvDestination, num_prompt_tokens: int, checksum: bool
    ) -> None:
        num_blocks = -(-num_prompt_tokens // self.block_size)
        if len(destination.block_ids) != num_blocks:
            raise ValueError(
                f"the destination has {len(destination.block_ids)} blocks for a {num_prompt_tokens}-token prompt "
                f"that needs {num_blocks}"
            )
        skip = destination.skip_blocks(self.block_size)
        self.requests[request_id] = RequestTransfer(request_id, destination, num_blocks, skip, checksum)

    def push_ready(self, ready: dict[str, tuple[list[int], int]]) -> None:
        """ready: request id -> (its source block ids, how many leading prompt blocks are complete now)."""
        by_session: dict[str, list[tuple[RequestTransfer, int, int]]] = defaultdict(list)
        for rid, (src_blocks, complete) in ready.items():
            t = self.requests.get(rid)
            if t is None or t.cancelled or t.error or t.closed:
                continue
            upto = min(complete, t.num_blocks)
            for i in range(t.next_block, upto):
                by_session[t.destination.session_id].append((t, src_blocks[i], t.destination.address(i)))
            t.next_block = max(t.next_block, upto)
        for session, items in by_session.items():
            for start in range(0, len(items), self.staging.slot_blocks):
                self._submit(session, items[start : start + self.staging.slot_blocks])

    def close(self, request_id: str, src_blocks: list[int]) -> None:
        """The prompt is complete and every block was pushed; compute the checksum if asked."""
        t = self.requests.get(request_id)
        if t is None:
            return
        if t.checksum:
            t.kv_checksum = kv_checksum(
                self.kv_cache.kv, src_blocks[t.destination.skip_blocks(self.block_size) :]
            )
        with self._lock:
            t.closed = True
            t._maybe_done()

    def _submit(self, session: str, items: list[tuple[RequestTransfer, int, int]]) -> None:
        slot = self.staging.acquire(self.timeout_s)
        fence = self.staging.gather(slot, [src for _, src, _ in items])
        src, dst, lengths = coalesce(self.staging.address(slot), [d for _, _, d in items], self.block_nbytes)
        per_request: dict[str, tuple[RequestTransfer, int]] = {}
        for t, _, _ in items:
            _, n = per_request.get(t.request_id, (t, 0))
            per_request[t.request_id] = (t, n + self.block_nbytes)
        with self._lock:
            for t, _ in per_request.values():
                t.in_flight += 1
        self._jobs.put(_Job(session, slot, fence, src, dst, lengths, list(per_request.values())))

    # ---- any thread --------------------------------------------------------------------------------------
    def wait(self, request_id: str, timeout: float | None = None) -> RequestTransfer:
        """Block until the request's KV has fully landed; raises TransferError / TimeoutError."""
        t = self.requests[request_id]
        if not t.done.wait(self.timeout_s if timeout is None else timeout):
            raise TimeoutError(f"KV transfer of {request_id} did not finish within {self.timeout_s:.0f}s")
        if t.error:
            raise TransferError(t.error)
        return t

    def cancel(self, request_id: str) -> bool:
        """Stop pushing; wait until no write for the request is in flight. True if none remains."""
        t = self.requests.get(request_id)
        if t is None:
            return True
        with self._lock:
            t.cancelled = True
            t._maybe_done()
        return t.done.wait(self.timeout_s)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    # ---- transfer thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            error = None
            try:
                job.fence.wait()
                self.engine.write(job.session_id, job.src, job.dst, job.lengths)
            except (TransferError, RuntimeError) as e:
                error = str(e)
                log.error("%s", e)
            finally:
                self.staging.release(job.slot)
            with self._lock:
                self.num_writes += 1
                for t, nbytes in job.requests:
                    t.in_flight -= 1
                    if error:
                        t.error = t.error or error
                    else:
                        t.bytes_sent += nbytes
                        self.bytes_sent += nbytes
                    t._maybe_done()
