"""The attention backend interface and the per-batch metadata it consumes.

Metadata is built once per batch by the runner and passed down explicitly with the model call: two micro-batches
(two-batch overlap) each carry their own, so nothing here is global.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from services.engine.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes KV.

    Tokens of sequence i are rows query_start_loc[i]:query_start_loc[i+1] of q/k/v; they are the last
    query_lens[i] positions of a context of seq_lens[i] tokens whose blocks are block_tables[i].
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = do not store
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)


class AttentionBackend(ABC):
    """Stores the new K/V of a layer into the paged cache and attends over each sequence's context."""

    name: str

    def __init__(self, kv_cache: KVCache, scale: float) -> None:
        self.kv_cache = kv_cache
        self.scale = scale

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""


@dataclass(frozen=True)
class BoundAttention:
    """A backend bound to one batch's metadata: what a model's attention layers call."""

    backend: AttentionBackend
    meta: AttentionMetadata

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(layer, q, k, v, self.meta)
