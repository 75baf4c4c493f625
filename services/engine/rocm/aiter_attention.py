"""Attention backend `aiter`: aiter's paged decode attention over the engine's cache, and its variable-length
flash attention for prefill. Rotary embedding and the K/V store are the reference's (`AttentionBackend`)."""

from __future__ import annotations

import torch

from services.engine.attention.base import AttentionBackend, AttentionMetadata
from services.engine.kv_cache import KVCache
from services.engine.rocm import require

PARTITION = 256  # paged_attention_v1's context partition


class AiterAttention(AttentionBackend):
    name = "aiter"

    def __init__(self, kv_cache: KVCache, scale: float, max_model_len: int) -> None:
        super().__init__(kv_cache, scale, max_model_len)
        self.aiter = require("aiter", "the aiter attention backend")
        self.block_size = kv_cache.layout.block_size
        if PARTITION % self.block_size:
            raise ValueError(f"aiter's paged attention needs a block size dividing {PARTITION}")
        device = kv_cache.kv.device
        self.kv_scale = torch.ones(1, dtype=torch.float32, device=device)
        self.workspace = torch.empty(0, dtype=torch.uint8, device=device)

    def _workspace(self, seqs: int, heads: int, dim: int, elem: int) -> torch.Tensor:
        parts = -(-self.max_model_len // PARTITION)
        need = seqs * heads * parts * dim * elem + 2 * seqs * heads * parts * 4
        if self.workspace.numel() < need:
            self.workspace = torch.empty(need, dtype=torch.uint8, device=self.workspace.device)
        return self.workspace

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.layer(layer)  # [blocks, block_size, kv heads, dim]: aiter's "NHD"
        out = torch.empty_like(q)
        d = meta.num_decode_seqs
        if d:
            self.aiter.paged_attention_v1(
                out[:d],
                self._workspace(d, q.shape[1], q.shape[2], q.element_size()),
                q[:d],
                k_cache,
                v_cache,
                self.scale,
                meta.block_tables[:d],
                meta.query_start_loc[: d + 1],
                meta.seq_lens[:d],
                self.max_model_len,
                None,
                "auto",
                "NHD",
                0.0,
                self.kv_scale,
                self.kv_scale,
            )
        if d == meta.num_seqs:
            return out
        # prefill: each sequence's whole context, new tokens included, is in the cache already
        keys, values, ctx_start = [], [], [0]
        for i in range(d, meta.num_seqs):
            ctx = meta.seq_lens_cpu[i]
            blocks = meta.block_tables[i, : -(-ctx // self.block_size)].long()
            keys.append(k_cache[blocks].flatten(0, 1)[:ctx])
            values.append(v_cache[blocks].flatten(0, 1)[:ctx])
            ctx_start.append(ctx_start[-1] + ctx)
        first = int(meta.query_start_loc[d]) if d else 0
        cu_q = (meta.query_start_loc[d:] - first).to(torch.int32)
        cu_k = torch.tensor(ctx_start, dtype=torch.int32, device=q.device)
        out[first:] = self.aiter.flash_attn_varlen_func(
            q[first:],
            torch.cat(keys),
            torch.cat(values),
            cu_q,
            cu_k,
            max(meta.query_lens_cpu[d:]),
            max(meta.seq_lens_cpu[d:]),
            softmax_scale=self.scale,
            causal=True,  # aligned bottom-right: the new tokens are the context's last
        )
        return out
