"""Reference attention over the paged cache in plain PyTorch: runs on CPU and GPU, one sequence at a time.

It is the correctness oracle for faster backends and the path CPU tests exercise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention.base import AttentionBackend, AttentionMetadata


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write row t of k/v to slot slot_mapping[t] of the layer's caches; slot -1 is skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]


class TorchAttention(AttentionBackend):
    name = "torch"

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.layer(layer)
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)
        start = 0
        for i, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            blocks = meta.block_tables[i, : (ctx + block_size - 1) // block_size]
            keys = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hkv, ctx, D]
            values = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
            query = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
            mask = None
            if 1 < n < ctx:
                # query j sits at position ctx - n + j and sees keys 0..ctx - n + j
                pos = torch.arange(ctx, device=q.device)
                mask = pos[None, :] <= (pos[ctx - n :, None])
            o = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                attn_mask=mask,
                is_causal=(n == ctx and n > 1),
                scale=self.scale,
                enable_gqa=True,
            )
            out[start : start + n] = o.transpose(0, 1)
            start += n
        return out
