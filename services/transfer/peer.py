"""One destination session's KV writes, in order, on a thread of their own: staging slot, gather, fence, write.

`submit` (engine thread) gathers a job into a staging slot at once when one is free and this peer holds less than
its share (half the slots), so the gather of chunk k+1 overlaps the write of chunk k; otherwise the writer thread
takes a slot and gathers when the job's turn comes. The engine thread never waits. A writer for a slow or dead
peer blocks only itself (each write has a timeout) and never holds more than its share, so the other peers always
find slots. The thread survives anything a job raises: the job's request gets the error, the next job runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from services.transfer.mooncake_engine import MooncakeEngine
from services.transfer.staging import Fence, StagingBuffer

log = logging.getLogger("pdmesh.transfer")


@dataclass(frozen=True)
class Job:
    request_id: str
    src_blocks: list[int]  # source block ids, in prompt order
    dst_addresses: list[int]  # where each lands on the peer
    after: torch.cuda.Event | None  # the step that computed the blocks (GPU); gathers wait for it
    slot: int | None = None  # set when the engine thread gathered it already
    fence: Fence | None = None


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


class PeerWriter:
    def __init__(
        self,
        session_id: str,
        engine: MooncakeEngine,
        staging: StagingBuffer,
        timeout_s: float,
        start: Callable[[Job], bool],
        end: Callable[[Job, int, str | None], None],
    ) -> None:
        self.session_id = session_id
        self.engine = engine
        self.staging = staging
        self.timeout_s = timeout_s
        self._start = start
        self._end = end
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._held = 0  # staging slots this peer's jobs hold (gathered and queued, or being written)
        # NOTE: at most half the slots (at least one) for one peer: a stalled peer never starves the others
        self.share = max(1, staging.num_slots // 2)
        kv = staging.kv
        self._stream = torch.cuda.Stream(kv.device) if kv.is_cuda else None
        self._thread = threading.Thread(target=self._run, name=f"kv-writer-{session_id}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Engine thread: queue the job, gathered now if a slot is free and this peer's share allows (never waits)."""
        slot = None
        with self._lock:
            if self._held < self.share:
                slot = self.staging.try_acquire()
                self._held += slot is not None
        if slot is not None:
            try:
                fence = self.staging.gather(slot, job.src_blocks, job.after, self.staging.engine_stream)
                job = replace(job, slot=slot, fence=fence)
            except Exception:  # the writer gathers it again and fails the request alone
                self._release(slot)
        self._jobs.put(job)

    def _release(self, slot: int) -> None:
        self.staging.release(slot)
        with self._lock:
            self._held -= 1

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                run = self._start(job)
            except BaseException:
                log.exception(
                    "KV writer for %s: bookkeeping failed; job of %s dropped", self.session_id, job.request_id
                )
                run = False
            if not run:
                if job.slot is not None:
                    self._release(job.slot)
                continue
            nbytes, error = 0, None
            try:
                nbytes = self._write(job)
            except Exception as e:  # the job's request gets the error; the writer goes on
                error = f"KV write to {self.session_id} failed: {e}"
                log.error("%s (request %s)", error, job.request_id)
            except BaseException as e:
                error = f"KV writer for {self.session_id} stopped: {e!r}"
                log.exception("%s", error)
            self._end(job, nbytes, error)

    def _write(self, job: Job) -> int:
        slot, fence = job.slot, job.fence
        if slot is None:
            slot = self.staging.acquire(self.timeout_s)
            with self._lock:
                self._held += 1
        try:
            if fence is None:
                fence = self.staging.gather(slot, job.src_blocks, job.after, self._stream)
            fence.wait()
            nbytes = self.staging.block_nbytes
            src, dst, lengths = coalesce(self.staging.address(slot), job.dst_addresses, nbytes)
            self.engine.write(self.session_id, src, dst, lengths)
        finally:
            self._release(slot)
        return len(job.src_blocks) * nbytes
