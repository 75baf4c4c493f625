"""The attention backend interface and the per-batch metadata it consumes.

Metadata is built once per batch by the runner and passed down explicitly with the model call: two micro-batches
(two-batch overlap) each carry their own, so nothing here is global.

A layer calls, in order: `rope_and_store` (rotate q and k by position, write k and v into the paged cache) and
`attend` (attention of q over each sequence's cached context). Backends may fuse the first step into one kernel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from services.engine.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes KV.

    Tokens of sequence i are rows query_start_loc[i]:query_start_loc[i+1] of q/k/v; they are the last
    query_lens[i] positions of a context of seq_lens[i] tokens whose blocks are block_tables[i]. The first
    num_decode_seqs sequences have exactly one new token each (the scheduler puts decodes first).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = do not store
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    num_decode_seqs: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)


class Rotary(Protocol):
    cos: torch.Tensor  # [max_positions, head_dim / 2] float32
    sin: torch.Tensor

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class HeadNorm(Protocol):
    """An RMSNorm over head_dim (Qwen3's q_norm / k_norm)."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class AttentionBackend(ABC):
    """Stores the new K/V of a layer into the paged cache and attends over each sequence's context."""

    name: str

    def __init__(self, kv_cache: KVCache, scale: float, max_model_len: int) -> None:
        self.kv_cache = kv_cache
        self.scale = scale
        self.max_model_len = max_model_len

    def rope_and_store(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        meta: AttentionMetadata,
        norms: tuple[HeadNorm, HeadNorm] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k/v [T, Hkv, D] -> rotated (q, k), each normed per head first by `norms`; k and v are
        stored at meta.slot_mapping."""
        from services.engine.attention.torch_backend import store_kv

        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        q, k = rotary(positions, q), rotary(positions, k)
        store_kv(*self.kv_cache.layer(layer), k, v, meta.slot_mapping)
        return q, k

    def store_latent(self, layer: int, latent: torch.Tensor, meta: AttentionMetadata) -> None:
        """Latent attention: write each token's latent [T, D] at its slot (slot -1: not stored)."""
        cache = self.kv_cache.latent(layer)
        block_size = cache.shape[1]
        keep = meta.slot_mapping >= 0
        slots = meta.slot_mapping[keep]
        cache[slots // block_size, slots % block_size, 0] = latent[keep].to(cache.dtype)

    def latent_context(self, layer: int, seq: int, meta: AttentionMetadata) -> torch.Tensor:
        """Latent attention: the cached latents of sequence `seq` of the batch, [context, D]."""
        cache = self.kv_cache.latent(layer)
        block_size, ctx = cache.shape[1], meta.seq_lens_cpu[seq]
        blocks = meta.block_tables[seq, : -(-ctx // block_size)].long()
        return cache[blocks].flatten(0, 1)[:ctx, 0]

    def rope_latent(
        self,
        layer: int,
        q_rot: torch.Tensor,
        k_rot: torch.Tensor,
        compressed: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent attention: q_rot [T, H, R] and k_rot [T, R] rotated by position -> (rotated q_rot, the latents
        [T, C + R]: compressed [T, C] then the rotated k_rot), the latents stored at meta.slot_mapping."""
        q_rot = rotary(positions, q_rot)
        latent = torch.cat([compressed, rotary(positions, k_rot.unsqueeze(1)).squeeze(1)], dim=-1)
        self.store_latent(layer, latent, meta)
        return q_rot, latent

    def latent_decode(
        self, layer: int, q: torch.Tensor, q_rope: torch.Tensor, scale: float, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Latent attention, one query token for each of the batch's first S sequences, in two parts: q [S, H, V]
        against the cached latents' first V columns, which are also the values, and q_rope [S, H, R] against the
        rest -> [S, H, V]."""
        value_dim = q.shape[2]
        q = torch.cat([q, q_rope], dim=-1)
        seqs = q.shape[0]
        cache = self.kv_cache.latent(layer)
        block_size = cache.shape[1]
        longest = max(meta.seq_lens_cpu[:seqs])
        blocks = meta.block_tables[:seqs, : -(-longest // block_size)].long()
        context = cache[blocks].flatten(1, 2)[:, :, 0].to(q.dtype)  # [S, N, D], padded to the longest
        scores = torch.einsum("shd,snd->shn", q, context).float() * scale
        valid = torch.arange(context.shape[1], device=q.device) < meta.seq_lens[:seqs, None]
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
        return torch.einsum("shn,snl->shl", scores.softmax(-1).to(q.dtype), context[..., :value_dim])

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D] (k/v: this batch's new [T, Hkv, D], already in the cache) -> [T, Hq, D]."""


Eager = Callable[..., torch.Tensor]  # (BoundAttention, *tensors) -> tensor


@dataclass(frozen=True)
class BoundAttention:
    """A backend bound to one batch's metadata: what a model's attention layers call."""

    backend: AttentionBackend
    meta: AttentionMetadata
    # rows every expert-parallel rank exchanges for this (micro-)batch: the most tokens any data-parallel rank
    # has in it (fixed-shape dispatch); None: exact all-to-all
    dispatch_rows: int | None = None
    # while a forward is captured in pieces (prefill_graphs.py): ends the piece at each `eager` part
    cut: Callable[[Eager, tuple[torch.Tensor, ...]], torch.Tensor] | None = None

    def eager(self, fn: Eager, *inputs: torch.Tensor) -> torch.Tensor:
        """fn(self, *inputs): the part of a layer that reads the batch's sequences (attention over each one's
        context), which a graph captured for a token count cannot replay. Runs now; while a forward is captured
        in pieces, it runs between two of them instead (see prefill_graphs.py), so fn must read the batch only
        through the BoundAttention it is given and the tensors only through `inputs`."""
        if self.cut is None:
            return fn(self, *inputs)
        return self.cut(fn, inputs)

    def rope_and_store(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        norms: tuple[HeadNorm, HeadNorm] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.rope_and_store(layer, q, k, v, positions, rotary, self.meta, norms)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.eager(lambda attn, q, k, v: attn.backend.attend(layer, q, k, v, attn.meta), q, k, v)

    def store_latent(self, layer: int, latent: torch.Tensor) -> None:
        self.backend.store_latent(layer, latent, self.meta)

    def latent_context(self, layer: int, seq: int) -> torch.Tensor:
        return self.backend.latent_context(layer, seq, self.meta)

    def rope_latent(
        self,
        layer: int,
        q_rot: torch.Tensor,
        k_rot: torch.Tensor,
        compressed: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.rope_latent(layer, q_rot, k_rot, compressed, positions, rotary, self.meta)

    def latent_decode(self, layer: int, q: torch.Tensor, q_rope: torch.Tensor, scale: float) -> torch.Tensor:
        return self.backend.latent_decode(layer, q, q_rope, scale, self.meta)
