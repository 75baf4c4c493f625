"""The paged KV cache: one tensor, block-major, so a request's KV moves as few contiguous regions.

Layout (the one place it is written down; kernels, the allocator and KV transfer rely on it):

    kv[num_blocks, num_layers, parts, block_size, num_kv_heads, head_dim]     parts = 2 (K, V)
        block b ─┬─ layer 0 ─┬─ K: block_size x heads x head_dim
                 │           └─ V: block_size x heads x head_dim
                 ├─ layer 1 ─ ...
                 └─ layer L-1

All layers of a block are contiguous (`block_nbytes` bytes), so a run of consecutive block ids is a single
contiguous byte range: KV transfer sends one descriptor per run of blocks, not one per block per layer.
A token's slot is `block_id * block_size + offset`; slot -1 means "do not store" (padding rows).
Per-layer views `kv[:, layer, 0]` are strided tensors [num_blocks, block_size, heads, head_dim] that attention
backends index by block table.

Multi-head latent attention (DeepSeek) caches one compressed latent per token instead of K and V: parts = 1,
one "head" of kv_lora_rank + rope dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.model_config import ModelConfig


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    parts: int = 2  # K and V; 1 for a latent cache

    @property
    def shape(self) -> tuple[int, ...]:
        return (
            self.num_blocks,
            self.num_layers,
            self.parts,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def block_nbytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.parts * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def fingerprint(self, model: str) -> str:
        """What two workers must agree on for KV bytes to be interchangeable (block count excluded)."""
        parts = f"L{self.num_layers}|P{self.parts}|B{self.block_size}|H{self.num_kv_heads}|D{self.head_dim}"
        return f"{model}|{self.dtype}|{parts}"

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, tp: int = 1
    ) -> KVLayout:
        """The layout of one rank's cache: with tensor parallelism it holds num_kv_heads / tp heads."""
        if cfg.mla is not None:
            return cls(num_blocks, cfg.num_layers, block_size, 1, cfg.mla.latent_dim, dtype, parts=1)
        return cls(num_blocks, cfg.num_layers, block_size, cfg.num_kv_heads // tp, cfg.head_dim, dtype)


class KVCache:
    def __init__(self, layout: KVLayout, device: torch.device) -> None:
        self.layout = layout
        self.kv = torch.zeros(layout.shape, dtype=layout.dtype, device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V caches of one layer: [num_blocks, block_size, num_kv_heads, head_dim] each (strided views)."""
        assert self.layout.parts == 2, "a latent cache has no separate K and V: use latent()"
        return self.kv[:, layer, 0], self.kv[:, layer, 1]

    def latent(self, layer: int) -> torch.Tensor:
        """The latent cache of one layer: [num_blocks, block_size, 1, latent_dim] (strided view)."""
        return self.kv[:, layer, 0]

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of whole blocks (all layers), [len(block_ids), num_layers, 2, block_size, heads, head_dim]."""
        return self.kv[torch.tensor(block_ids, device=self.kv.device)]

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv[torch.tensor(block_ids, device=self.kv.device)] = data.to(self.kv.device)
