"""Registered staging slots: the blocks to send are gathered into one contiguous slot, fenced, then written.

A gather runs on the engine thread when a slot is free at once, else on the destination's writer thread; neither
waits for the other. On a GPU the gather first waits for the event the engine recorded after the step that
computed the blocks, runs on a side stream, and its own event is the fence the writer waits on before the write,
so a transfer never reads a slot a kernel is still writing. The blocks of a live request stay allocated until its
KV has landed, so no later step overwrites them while they are read.
"""

from __future__ import annotations

import queue

import numpy as np
import torch


class Fence:
    def __init__(self, event: torch.cuda.Event | None) -> None:
        self.event = event

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def step_event(kv: torch.Tensor) -> torch.cuda.Event | None:
    """Engine thread, after a step: an event that completes once every kernel of the step has run (None on CPU)."""
    if not kv.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(kv.device))
    return event


class StagingBuffer:
    def __init__(self, kv: torch.Tensor, block_nbytes: int, num_slots: int, slot_blocks: int) -> None:
        self.kv = kv
        self.num_slots = num_slots
        self.slot_blocks = slot_blocks
        self.block_nbytes = block_nbytes
        self.buffer = torch.empty((num_slots, slot_blocks, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(num_slots):
            self._free.put(slot)
        # the engine thread's gathers run here; each writer thread has a stream of its own
        self.engine_stream = torch.cuda.Stream(kv.device) if kv.is_cuda else None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def address(self, slot: int, index: int = 0) -> int:
        return self.buffer.data_ptr() + (slot * self.slot_blocks + index) * self.block_nbytes

    def acquire(self, timeout: float) -> int:
        """A free slot; waits for a writer to return one (backpressure), TimeoutError after timeout."""
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no staging slot came free in {timeout:.0f}s: KV transfers are stuck"
            ) from None

    def try_acquire(self) -> int | None:
        """A free slot now, or None."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def gather(
        self,
        slot: int,
        block_ids: list[int],
        after: torch.cuda.Event | None,
        stream: torch.cuda.Stream | None,
    ) -> Fence:
        """Copy kv[block_ids] into the slot, after `after` (the computing step); any thread, each with its own
        side stream on a GPU."""
        assert 0 < len(block_ids) <= self.slot_blocks, f"{len(block_ids)} blocks do not fit a slot"
        out = self.buffer[slot, : len(block_ids)]
        if stream is None:
            _copy_runs(self.kv, out, block_ids)
            return Fence(None)
        from services.engine.kernels.block_copy import gather_blocks

        with torch.cuda.device(self.kv.device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            index = torch.tensor(block_ids, dtype=torch.int64).to(self.kv.device, non_blocking=True)
            gather_blocks(self.kv, index, out)
            event = torch.cuda.Event()
            event.record(stream)
        return Fence(event)


def _copy_runs(kv: torch.Tensor, out: torch.Tensor, block_ids: list[int]) -> None:
    """CPU gather: one single-threaded memcpy per run of consecutive block ids.

    NOTE: single-threaded on purpose. torch's parallel copy takes every core, starving the transfer engine's
    threads that are sending the previous chunk at the same moment.
    """
    src = kv.view(torch.uint8).numpy()
    dst = out.view(torch.uint8).numpy()
    i = 0
    while i < len(block_ids):
        j = i + 1
        while j < len(block_ids) and block_ids[j] == block_ids[j - 1] + 1:
            j += 1
        np.copyto(dst[i:j], src[block_ids[i] : block_ids[i] + j - i])
        i = j
