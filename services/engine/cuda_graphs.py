"""Decode steps replayed from CUDA graphs.

Contract:
- one graph per bucketed batch size, captured largest first into one shared memory pool;
- static input buffers (token ids, positions, slots, context lengths, block tables) are filled before a replay;
  the graph's output is a static logits buffer;
- a batch is padded up to its bucket: padded rows store nothing (slot -1) and attend over one token of block 0,
  so they cannot disturb real sequences, and their logits are ignored;
- only decode batches (one new token per sequence) replay; anything else runs eagerly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from services.engine.attention import AttentionBackend, AttentionMetadata, BoundAttention

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.backend = backend
        self.sizes = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        self.max_batch = max_batch
        n = max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        # host-side staging for one copy per buffer per step
        self._host = torch.zeros((4, n), dtype=torch.int64, pin_memory=True)
        self._host_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, pin_memory=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bs in tqdm(
                sorted(self.sizes, reverse=True),
                desc="Capturing CUDA graphs",
                unit="graph",
                disable=not progress,
            ):
                self._forward(bs)  # warm up: compile kernels, settle allocations
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[bs] = self._forward(bs)
                self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs],
            query_start_loc=self.query_start[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_lens_cpu=(1,) * bs,
            seq_lens_cpu=(1,) * bs,
            num_decode_seqs=bs,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], BoundAttention(self.backend, self._meta(bs))
        )
        return self.model.compute_logits(hidden)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def run(
        self,
        token_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Replay the graph for n = len(token_ids) decode rows; returns logits [n, vocab] (a view of a static
        buffer, valid until the next replay). fill = (rows, tokens) on the device overwrites those input ids: tokens
        sampled by the previous step that the host has not seen."""
        n = len(token_ids)
        bs = self.bucket(n)
        assert bs is not None, f"batch of {n} exceeds the largest captured graph ({self.max_batch})"
        host = self._host
        host[:, :bs] = 0
        host[2, :bs] = -1
        host[3, :bs] = 1
        host[0, :n] = torch.from_numpy(token_ids)
        host[1, :n] = torch.from_numpy(positions)
        host[2, :n] = torch.from_numpy(slots)
        host[3, :n] = torch.from_numpy(seq_lens.astype(np.int64))
        tables = self._host_tables
        tables[:bs] = 0
        tables[:n, : block_tables.shape[1]] = torch.from_numpy(block_tables)
        self.input_ids[:bs].copy_(host[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(host[1, :bs], non_blocking=True)
        self.slots[:bs].copy_(host[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(host[3, :bs], non_blocking=True)
        self.block_tables[:bs].copy_(tables[:bs], non_blocking=True)
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.graphs[bs].replay()
        return self.logits[bs][:n]
