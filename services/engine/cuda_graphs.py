"""Decode steps replayed from CUDA graphs.

Contract:
- one graph per bucketed batch size, captured largest first into one shared memory pool;
- static input buffers (token ids, positions, slots, context lengths, block tables) are filled before a replay;
  the graph's output is a static logits buffer;
- a batch is padded up to its bucket: padded rows store nothing (slot -1) and attend over one token of block 0,
  so they cannot disturb real sequences, and their logits are ignored;
- only decode batches (one new token per sequence) replay; anything else runs eagerly;
- with two-batch overlap, sizes from `split_min` up also get a graph of the two halves' interleaved forwards, so
  the overlap is replayed too; with data-parallel ranks every rank replays the same size (the largest rank's
  batch, agreed per step), so the collectives inside the graphs pair up.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from services.engine.attention import AttentionBackend, AttentionMetadata, BoundAttention
from services.engine.parallel.comm import Stage, run
from services.engine.tbo import interleave

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def default_sizes(max_batch: int) -> list[int]:
    return sorted({b for b in BUCKETS if b < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        sizes: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
        progress: bool = True,
        split_min: int | None = None,
        fixed_dispatch: bool = False,
    ) -> None:
        self.model = model
        self.backend = backend
        self.fixed_dispatch = (
            fixed_dispatch  # expert-parallel ranks exchange a fixed number of rows per batch
        )
        self.sizes = sorted(set(sizes))
        self.max_batch = n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        # host-side staging, one copy per buffer per step; two sets used in turn, so preparing a step never waits
        # for the copies of the step before it (still queued behind the GPU's work) but only for the one before
        self._host = [torch.zeros((4, n), dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._host_tables = [
            torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, pin_memory=True) for _ in range(2)
        ]
        self._turn = 0
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        keys = [(bs, False) for bs in self.sizes]
        if split_min is not None:
            keys += [(bs, True) for bs in self.sizes if bs >= max(2, split_min)]
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for key in tqdm(
                sorted(keys, reverse=True), desc="Capturing CUDA graphs", unit="graph", disable=not progress
            ):
                self._forward(*key)  # warm up: compile kernels, settle allocations, set up communicators
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[key] = self._forward(*key)
                self.graphs[key] = graph
        torch.cuda.synchronize(device)

    def _stages(self, lo: int, hi: int) -> Stage[torch.Tensor]:
        """The forward of rows [lo, hi)."""
        n = hi - lo
        meta = AttentionMetadata(
            slot_mapping=self.slots[lo:hi],
            query_start_loc=self.query_start[: n + 1],  # one row per sequence: 0, 1, ..., n
            seq_lens=self.seq_lens[lo:hi],
            block_tables=self.block_tables[lo:hi],
            query_lens_cpu=(1,) * n,
            seq_lens_cpu=(1,) * n,
            num_decode_seqs=n,
        )
        batch = BoundAttention(self.backend, meta, n if self.fixed_dispatch else None)
        return self.model.stages(self.input_ids[lo:hi], self.positions[lo:hi], batch)

    def _forward(self, bs: int, split: bool) -> torch.Tensor:
        if split:
            half = bs // 2
            hidden = torch.cat(interleave(self._stages(0, half), self._stages(half, bs)))
        else:
            hidden = run(self._stages(0, bs))
        return self.model.compute_logits(hidden)

    def has_split(self, bs: int) -> bool:
        return (bs, True) in self.graphs

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def run(
        self,
        bs: int,
        split: bool,
        token_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Replay graph (bs, split) for n = len(token_ids) <= bs decode rows; returns logits [n, vocab] (a view of
        a static buffer, valid until the next replay). fill = (rows, tokens) on the device overwrites those input
        ids: tokens sampled by the previous step that the host has not seen."""
        n = len(token_ids)
        assert n <= bs and (bs, split) in self.graphs, f"no graph of {bs} rows (split: {split}) for {n} rows"
        self._turn ^= 1
        host, tables = self._host[self._turn], self._host_tables[self._turn]
        if (copied := self._copied[self._turn]) is not None:
            copied.synchronize()
        # NOTE: filled through numpy: torch's CPU ops on buffers this size go multi-threaded, and waking the
        # thread pool next to other ranks' busy processes was seen to stall a step by 10 ms
        h, t = host.numpy(), tables.numpy()
        h[0, :n], h[1, :n], h[2, :n], h[3, :n] = token_ids, positions, slots, seq_lens
        h[0, n:bs], h[1, n:bs], h[2, n:bs], h[3, n:bs] = 0, 0, -1, 1  # padded rows store nothing
        width = block_tables.shape[1]
        t[:n, :width] = block_tables
        t[:n, width:] = 0
        t[n:bs] = 0
        self.input_ids[:bs].copy_(host[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(host[1, :bs], non_blocking=True)
        self.slots[:bs].copy_(host[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(host[3, :bs], non_blocking=True)
        self.block_tables[:bs].copy_(tables[:bs], non_blocking=True)
        self._copied[self._turn] = copied = torch.cuda.Event()
        copied.record()
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.graphs[bs, split].replay()
        return self.logits[bs, split][:n]
